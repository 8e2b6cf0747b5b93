"""Unit tests for fedguard.tasks: IDX parsing, task loading/fallback, Dirichlet splits, model and training."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
import torch
from torch import nn

from fedguard.tasks import (
    DEFAULT_TRAINING,
    TASKS,
    ModelSpec,
    TaskData,
    build_model,
    dirichlet_split,
    evaluate,
    get_flat_params,
    load_task,
    local_train,
    model_spec,
    read_idx,
    set_flat_params,
    write_idx,
)
from fedguard.tasks import data as data_mod



# ------------------------------------------------------------------------------------------------------ IDX


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_gz(path, payload: bytes) -> None:
    with gzip.open(path, "wb") as fh:
        fh.write(payload)


def test_read_idx_images_and_labels(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    _write_gz(tmp_path / "img.gz", _idx_bytes(images))
    _write_gz(tmp_path / "lab.gz", _idx_bytes(labels))
    got = read_idx(tmp_path / "img.gz", expected_ndim=3)
    assert got.dtype == np.uint8 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab.gz", expected_ndim=1), labels)


def test_read_idx_big_endian_types_and_uncompressed(tmp_path):
    arr = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    (tmp_path / "raw.idx").write_bytes(_idx_bytes(arr.astype(">i4"), code=0x0C))
    got = read_idx(tmp_path / "raw.idx")
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)
    f = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    write_idx(tmp_path / "f.idx.gz", f)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx.gz"), f)


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02", "truncated"),  # 2 of 5 bytes
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated"),  # dims cut short
        (b"\x00\x00", "truncated"),  # magic cut short
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),  # nonzero leading bytes
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "magic"),  # unknown type code
        (b"\x1f\x8b\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "trailing"),
        (b"\x00\x00\x08\x00", "dimensions"),  # zero dimensions
        (b"\x00\x00\x08\x02" + struct.pack(">II", 1 << 20, 1 << 20), "limit"),  # 1 TiB announced
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    path = tmp_path / "bad.gz"
    _write_gz(path, payload)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_read_idx_rejects_wrong_ndim_and_broken_gzip(tmp_path):
    path = tmp_path / "lab.gz"
    _write_gz(path, _idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match="dimensions"):
        read_idx(path, expected_ndim=3)
    blob = gzip.compress(_idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8)))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "notgz.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError):
        read_idx(tmp_path / "notgz.gz")


def _write_fake_fashion(directory, n_train=20, n_test=10, side=28, seed=0):
    rng = np.random.default_rng(seed)
    files = data_mod.FASHION_MNIST_FILES
    write_idx(directory / files["x_train"], rng.integers(0, 256, (n_train, side, side), dtype=np.uint8))
    write_idx(directory / files["y_train"], (np.arange(n_train) % 10).astype(np.uint8))
    write_idx(directory / files["x_test"], rng.integers(0, 256, (n_test, side, side), dtype=np.uint8))
    write_idx(directory / files["y_test"], (np.arange(n_test) % 10).astype(np.uint8))


def test_load_fashion_mnist_from_dir(tmp_path):
    _write_fake_fashion(tmp_path)
    task = load_task("fashion-mnist", data_dir=tmp_path)
    assert task.name == "fashion-mnist" and task.num_classes == 10 and task.input_dim == 784
    assert task.x_train.shape == (20, 784) and task.x_test.shape == (10, 784)
    assert task.x_train.dtype == np.float32 and task.y_train.dtype == np.int64
    assert abs(float(task.x_train.mean())) < 1e-4 and abs(float(task.x_train.std()) - 1) < 1e-3
    assert load_task("fashion-mnist", data_dir=tmp_path) is task  # cached
    with pytest.raises(ValueError):
        task.x_train[0, 0] = 1.0  # shared cache is read-only


def test_load_fashion_mnist_env_var_and_mismatch(tmp_path, monkeypatch):
    _write_fake_fashion(tmp_path, n_train=30)
    monkeypatch.setenv(data_mod.FASHION_MNIST_ENV, str(tmp_path))
    assert load_task("fashion-mnist").x_train.shape == (30, 784)
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_fake_fashion(bad)
    write_idx(bad / data_mod.FASHION_MNIST_FILES["y_train"], np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="labels"):
        load_task("fashion-mnist", data_dir=bad)


def test_fallback_to_digits_when_missing(tmp_path, caplog):
    missing = tmp_path / "nope"
    with caplog.at_level(logging.WARNING, logger="fedguard.tasks.data"):
        task = load_task("fashion-mnist", data_dir=missing)
    assert task.name == "digits"
    text = caplog.text
    assert "digits" in text and str(missing) in text and "apt-get install dataset-fashion-mnist" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedguard.tasks.data"):
        assert load_task("fashion-mnist", data_dir=missing).name == "digits"
    assert not caplog.records  # warned once per directory and process, not once per device
    partial = tmp_path / "partial"
    partial.mkdir()
    _write_fake_fashion(partial)
    (partial / data_mod.FASHION_MNIST_FILES["y_test"]).unlink()
    with caplog.at_level(logging.WARNING, logger="fedguard.tasks.data"):
        assert load_task("fashion-mnist", data_dir=partial).name == "digits"
    assert "t10k-labels-idx1-ubyte.gz" in caplog.text


def test_digits_and_synthetic_deterministic():
    d0 = load_task("digits", seed=0)
    assert (d0.x_train.shape, d0.x_test.shape) == ((1437, 64), (360, 64))
    assert set(np.unique(d0.y_test)) == set(range(10))
    d0b = data_mod._load_digits.__wrapped__(0)  # uncached: same split from the same seed
    np.testing.assert_array_equal(d0.y_train, d0b.y_train)
    assert not np.array_equal(d0.y_train, load_task("digits", seed=1).y_train)
    s = load_task("synthetic", seed=3)
    s2 = data_mod._load_synthetic.__wrapped__(3)
    np.testing.assert_array_equal(s.x_train, s2.x_train)
    assert s.num_classes == 10 and s.input_dim == s.x_train.shape[1]
    assert isinstance(s, TaskData) and set(TASKS) == {"fashion-mnist", "digits", "synthetic"}
    with pytest.raises(ValueError, match="unknown task"):
        load_task("cifar")


# -------------------------------------------------------------------------------------------------- splits


def _label_skew(labels, shards, num_classes):
    """Mean total-variation distance between each client's label distribution and the global one."""
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[s], minlength=num_classes) / len(s) - glob).sum() for s in shards]
    return float(np.mean(tv))


def test_dirichlet_split_partition_and_determinism():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    shards = dirichlet_split(labels, 50, 0.9, np.random.default_rng(1), min_size=10)
    assert len(shards) == 50
    allidx = np.concatenate(shards)
    assert allidx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(allidx), np.arange(len(labels)))  # each index exactly once
    assert min(len(s) for s in shards) >= 10
    again = dirichlet_split(labels, 50, 0.9, np.random.default_rng(1), min_size=10)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    other = dirichlet_split(labels, 50, 0.9, np.random.default_rng(2), min_size=10)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_split_skew_depends_on_alpha():
    labels = np.repeat(np.arange(10), 600)
    skewed = dirichlet_split(labels, 20, 0.1, np.random.default_rng(0), min_size=5)
    iid = dirichlet_split(labels, 20, 100.0, np.random.default_rng(0), min_size=5)
    s_lo, s_hi = _label_skew(labels, skewed, 10), _label_skew(labels, iid, 10)
    assert s_lo > 0.5 and s_hi < 0.1 and s_lo > 5 * s_hi


def test_dirichlet_split_errors():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(ValueError):
        dirichlet_split(labels, 5, 0.5, np.random.default_rng(0), min_size=5)  # 20 < 25: impossible
    with pytest.raises(ValueError, match="draws"):
        dirichlet_split(labels, 4, 0.01, np.random.default_rng(0), min_size=5, max_retries=5)
    with pytest.raises(ValueError):
        dirichlet_split(labels, 2, 0.0, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("hidden", [(), (7,), (200,), (256, 128), (5, 4, 3)])
def test_num_params_matches_torch(hidden):
    spec = ModelSpec("synthetic", 13, 4, hidden)
    model = build_model(spec, seed=0)
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert len(get_flat_params(model)) == spec.num_params


def test_model_spec_defaults():
    for name in TASKS:
        spec = model_spec(name)
        assert spec.task == name and spec.hidden == tuple(DEFAULT_TRAINING[name]["hidden"])
        assert {"epochs", "lr", "batch_size", "momentum", "hidden"} <= set(DEFAULT_TRAINING[name])
    fm = model_spec("fashion-mnist")
    assert (fm.input_dim, fm.num_classes) == (784, 10)
    digits = load_task("digits")
    assert model_spec(digits, hidden=[16]) == ModelSpec("digits", 64, 10, (16,))
    assert model_spec("synthetic", hidden=8).hidden == (8,)
    syn = load_task("synthetic")
    assert model_spec(syn) == model_spec("synthetic")  # constants agree with the data
    with pytest.raises(ValueError, match="unknown task"):
        model_spec("cifar")


def test_build_model_deterministic_and_leaves_global_rng():
    spec = ModelSpec("synthetic", 10, 3, (8,))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = get_flat_params(build_model(spec, seed=5))
    assert torch.rand(1).item() == before.item()  # global RNG untouched
    np.testing.assert_array_equal(a, get_flat_params(build_model(spec, seed=5)))
    assert not np.array_equal(a, get_flat_params(build_model(spec, seed=6)))


def test_flat_params_round_trip():
    spec = ModelSpec("synthetic", 6, 3, (5,))
    model = build_model(spec, seed=0)
    flat = get_flat_params(model)
    assert flat.dtype == np.float32 and flat.ndim == 1
    flat[0] += 100.0  # a copy: the model is unaffected
    assert get_flat_params(model)[0] != flat[0]
    new = np.arange(spec.num_params, dtype=np.float64) / 10
    set_flat_params(model, new)
    np.testing.assert_array_equal(get_flat_params(model), new.astype(np.float32))
    first = next(model.parameters())
    assert first.shape == (5, 6) and first[0, 1].item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="length"):
        set_flat_params(model, np.zeros(spec.num_params + 1, dtype=np.float32))
    with pytest.raises(ValueError):
        set_flat_params(model, np.zeros((1, spec.num_params), dtype=np.float32))


# ------------------------------------------------------------------------------------------------- training


def _synthetic_subset(n=400):
    task = load_task("synthetic", seed=0)
    return task, task.x_train[:n], task.y_train[:n]


def test_local_train_deterministic_and_lowers_loss():
    task, x, y = _synthetic_subset()
    spec = model_spec(task)
    hp = {k: v for k, v in DEFAULT_TRAINING["synthetic"].items() if k != "hidden"}
    results = []
    for _ in range(2):
        model = build_model(spec, seed=0)
        out = local_train(model, x, y, seed=42, **hp)
        results.append((out, get_flat_params(model)))
    (out1, p1), (out2, p2) = results
    assert out1 == out2 and np.array_equal(p1, p2)
    assert out1["steps"] == hp["epochs"] * int(np.ceil(len(x) / hp["batch_size"]))
    model = build_model(spec, seed=0)
    _, loss_before = evaluate(model, x, y)
    local_train(model, x, y, seed=7, **hp)
    acc_after, loss_after = evaluate(model, x, y)
    assert loss_after < 0.8 * loss_before and acc_after > 0.5
    other = build_model(spec, seed=0)
    local_train(other, x, y, seed=8, **hp)
    assert not np.array_equal(get_flat_params(model), get_flat_params(other))  # the seed drives shuffling


def test_local_train_accepts_readonly_arrays_and_validates():
    task, x, y = _synthetic_subset(50)
    assert not x.flags.writeable
    model = build_model(model_spec(task), seed=0)
    assert local_train(model, x, y, epochs=1, lr=0.01, batch_size=64, seed=0)["steps"] == 1
    assert local_train(model, x, y, epochs=0, lr=0.01, batch_size=64, seed=0)["steps"] == 0
    with pytest.raises(ValueError):
        local_train(model, x[:0], y[:0], epochs=1, lr=0.01, batch_size=8, seed=0)
    with pytest.raises(ValueError):
        local_train(model, x, y[:10], epochs=1, lr=0.01, batch_size=8, seed=0)


class _Fixed(nn.Module):
    def __init__(self, logits_fn):
        super().__init__()
        self.fn = logits_fn

    def forward(self, x):
        return self.fn(x)


def test_evaluate_perfect_and_constant_models():
    y = np.array([0, 1, 2, 1, 0, 2, 2, 1], dtype=np.int64)
    x = np.eye(3, dtype=np.float32)[y] * 50.0  # one-hot * 50: identity logits are ~certain and right
    acc, loss = evaluate(_Fixed(lambda t: t), x, y, batch_size=3)
    assert acc == 1.0 and loss < 1e-6
    acc, loss = evaluate(_Fixed(lambda t: torch.zeros(t.shape[0], 3)), x, y)
    assert acc == pytest.approx(2 / 8)  # ties: argmax picks class 0, the label of 2 of 8 samples
    assert loss == pytest.approx(np.log(3), rel=1e-6)
    model = _Fixed(lambda t: torch.tensor([[0.0, 0.0, 5.0]]).expand(t.shape[0], 3))
    model.train()
    acc, _ = evaluate(model, x, y)
    assert acc == pytest.approx(3 / 8) and model.training  # mode restored


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 1e-3)])
def test_local_train_matches_torch_sgd(momentum, weight_decay):
    task, x, y = _synthetic_subset(100)
    spec = model_spec(task, hidden=(16,))
    ours = build_model(spec, seed=1)
    out = local_train(ours, x, y, epochs=2, lr=0.05, batch_size=32, seed=3, momentum=momentum,
                      weight_decay=weight_decay)
    ref = build_model(spec, seed=1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(3)
    xt, yt = torch.tensor(x), torch.tensor(y)
    steps = 0
    for _ in range(2):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 32):
            idx = perm[start : start + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(ref(xt[idx]), yt[idx]).backward()
            opt.step()
            steps += 1
    assert out["steps"] == steps
    np.testing.assert_allclose(get_flat_params(ours), get_flat_params(ref), rtol=0, atol=1e-6)
