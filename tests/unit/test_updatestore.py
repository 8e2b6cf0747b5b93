"""The update store (fedguard/updatestore.py): validated tensors beside the log, named by a reference in the record
(claim check). Round trips, references that cannot leave the store, sizes, retention and ``keep_from``."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from fedguard.updatestore import SPARE_DIR, UpdateMissing, UpdateStore, keep_from


@pytest.fixture
def store(tmp_path) -> UpdateStore:
    return UpdateStore(tmp_path / "updates")


def files(store: UpdateStore) -> list[str]:
    """Every file under the store's root, as a path relative to it."""
    return sorted(os.path.relpath(os.path.join(d, f), store.root) for d, _, fs in os.walk(store.root) for f in fs)


# -- put / get --------------------------------------------------------------------------------------------------------
def test_put_then_get_gives_the_exact_values_back_flattened(store):
    tensor = np.array([[0.0, -1.5, 3.25], [np.float32(1e-38), np.float32(3.4e38), -0.0]], dtype=np.float32)
    ref = store.put("m", 7, "dev-1", tensor)
    back = store.get(ref, tensor.size)
    assert back.dtype == np.float32 and back.shape == (6,)
    assert back.tobytes() == tensor.tobytes()  # bit for bit (-0.0 and the extremes included)


def test_the_reference_names_model_version_and_device_and_the_file_holds_only_little_endian_floats(store):
    tensor = np.arange(5, dtype=np.float32)
    ref = store.put("model-A", 12, "dev_9.x", tensor)
    assert re.fullmatch(r"model-A/12/dev_9\.x\.[0-9a-f]{16}\.f32", ref)
    assert files(store) == [ref]  # no temporary file left behind
    assert (store.root / ref).read_bytes() == tensor.astype("<f4").tobytes()


def test_put_converts_other_dtypes_byte_orders_and_layouts_to_float32(store):
    values = np.linspace(-2, 2, 12)
    for tensor in (values.astype(">f8"), values.astype(np.float16), values.reshape(3, 4).T, values.tolist()):
        ref = store.put("m", 0, "dev-1", tensor)
        expected = np.asarray(tensor, dtype=np.float32).ravel()
        np.testing.assert_array_equal(store.get(ref, 12), expected)


def test_two_puts_of_the_same_device_and_version_get_different_references(store):
    first = store.put("m", 3, "dev-1", np.ones(4, np.float32))
    second = store.put("m", 3, "dev-1", np.full(4, 2.0, np.float32))
    assert first != second and files(store) == sorted([first, second])
    np.testing.assert_array_equal(store.get(first, 4), np.ones(4, np.float32))  # neither overwrote the other
    np.testing.assert_array_equal(store.get(second, 4), np.full(4, 2.0, np.float32))


def test_a_store_at_the_same_root_reads_what_another_wrote(tmp_path):
    ref = UpdateStore(tmp_path / "u").put("m", 1, "dev-1", np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(UpdateStore(str(tmp_path / "u")).get(ref, 3), [0, 1, 2])


def test_get_of_a_reference_with_no_file_raises_update_missing(store):
    with pytest.raises(UpdateMissing):
        store.get("m/3/dev-1.0123456789abcdef.f32", 4)  # never written (the store's root does not even exist)
    ref = store.put("m", 3, "dev-1", np.ones(4, np.float32))
    (store.root / ref).unlink()
    with pytest.raises(UpdateMissing):
        store.get(ref, 4)
    assert issubclass(UpdateMissing, LookupError)


@pytest.mark.parametrize("stored, asked", [(3, 4), (5, 4), (0, 4), (4, 0)])
def test_get_of_a_file_of_another_size_raises_value_error(store, stored, asked):
    ref = store.put("m", 0, "dev-1", np.ones(stored, np.float32))
    with pytest.raises(ValueError, match="bytes"):
        store.get(ref, asked)


def test_a_file_cut_mid_value_is_refused(store):
    ref = store.put("m", 0, "dev-1", np.ones(4, np.float32))
    with open(store.root / ref, "r+b") as f:
        f.truncate(15)
    with pytest.raises(ValueError):
        store.get(ref, 4)


# -- references and ids that would leave the store ---------------------------------------------------------------------
@pytest.mark.parametrize("ref", [
    "../x", "a/b", "x", "", "m/1/../../etc.f32", "m/../1/x.f32", "../1/x.f32", "m/1/..",
    "/etc/passwd", "/m/1/x.f32", "m/1//x.f32", "m/-1/x.f32", "m/one/x.f32", "m/1/x.bin", "m/1/x.f32/y.f32",
    "m/1/sub/x.f32", "m\\1\\x.f32", "m/1/a b.f32",
])
def test_references_outside_the_store_or_malformed_are_refused(store, tmp_path, ref):
    (tmp_path / "x.f32").write_bytes(b"\0" * 16)  # a file a walk out of the root could reach
    with pytest.raises(ValueError):
        store.get(ref, 4)


@pytest.mark.parametrize("model_id, device_id", [
    ("..", "dev-1"), (".", "dev-1"), ("a/b", "dev-1"), ("", "dev-1"), ("/abs", "dev-1"), ("m" * 129, "dev-1"),
    ("m", ".."), ("m", "a/b"), ("m", ""), ("m", "../x"), ("m", "a b"), ("m", "dév"),
])
def test_put_refuses_ids_that_are_not_a_path_component(store, model_id, device_id):
    with pytest.raises(ValueError):
        store.put(model_id, 1, device_id, np.ones(2, np.float32))
    assert not store.root.exists() or files(store) == []


# -- retention ---------------------------------------------------------------------------------------------------------
def test_prune_deletes_only_base_versions_below_keep_from_and_returns_them(store):
    refs = {v: store.put("m", v, "dev-1", np.full(2, v, np.float32)) for v in (0, 1, 2, 5, 10)}
    other = store.put("other", 0, "dev-1", np.ones(2, np.float32))
    (store.root / "m" / "notes").mkdir()  # not a version directory: left alone
    assert store.prune("m", 5) == [0, 1, 2]
    for v in (0, 1, 2):
        with pytest.raises(UpdateMissing):
            store.get(refs[v], 2)
        assert not (store.root / "m" / str(v)).exists()
    for v in (5, 10):
        np.testing.assert_array_equal(store.get(refs[v], 2), [v, v])
    np.testing.assert_array_equal(store.get(other, 2), [1, 1])  # another model's tensors are not touched
    assert (store.root / "m" / "notes").is_dir()
    assert store.prune("m", 5) == []  # nothing left below 5
    assert store.prune("m", 0) == []
    assert store.prune("m", 11) == [5, 10]


def test_prune_of_a_model_with_no_directory_returns_nothing(store):
    assert store.prune("m", 100) == []  # no root at all
    store.put("other", 0, "dev-1", np.ones(1, np.float32))
    assert store.prune("m", 100) == []  # a root, not this model
    with pytest.raises(ValueError):
        store.prune("..", 100)


@pytest.mark.parametrize("current, staleness, expected", [
    (10, 0, 8), (1, 0, 0), (10, 3, 5), (0, 0, 0), (2, 0, 0), (3, 0, 1), (5, 2, 1), (5, 3, 0), (100, 10, 88),
])
def test_keep_from(current, staleness, expected):
    assert keep_from(current, staleness) == expected


def test_keep_from_keeps_every_base_version_a_device_may_still_send_and_the_one_before():
    for current in range(0, 30):
        for staleness in range(0, 6):
            oldest_admitted = max(0, current - staleness)
            assert keep_from(current, staleness) <= max(0, oldest_admitted - 1)


# -- spares: pruned files written over instead of new ones ------------------------------------------------------------
def spares(store: UpdateStore) -> list[str]:
    spare_dir = store.root / SPARE_DIR
    return sorted(os.listdir(spare_dir)) if spare_dir.is_dir() else []


def test_prune_keeps_spares_up_to_spare_bytes_and_deletes_the_rest(tmp_path):
    store = UpdateStore(tmp_path / "u", spare_bytes=3 * 16)  # three tensors of 4 float32
    for v in (0, 1):
        for d in range(2):
            store.put("m", v, f"dev-{d}", np.ones(4, np.float32))
    (store.root / "m" / "0" / "dev-9.0123456789abcdef.f32.tmp").write_bytes(b"cut")  # a crashed write: deleted
    kept = store.put("m", 2, "dev-0", np.ones(4, np.float32))
    assert store.prune("m", 2) == [0, 1]
    assert len(spares(store)) == 3  # four tensors pruned, three kept
    assert files(store) == sorted([kept] + [f"{SPARE_DIR}/{name}" for name in spares(store)])
    assert store.prune("m", 3) == [2] and len(spares(store)) == 3  # full: the next pruned file is deleted


def test_a_pruned_file_larger_than_the_room_left_is_deleted_and_smaller_ones_still_kept(tmp_path):
    store = UpdateStore(tmp_path / "u", spare_bytes=40)
    store.put("m", 0, "dev-big", np.ones(8, np.float32))  # 32 bytes
    store.prune("m", 1)
    store.put("m", 1, "dev-a", np.ones(3, np.float32))  # takes that spare: 12 bytes now
    store.put("m", 1, "dev-b", np.ones(8, np.float32))  # 32 bytes
    store.put("m", 1, "dev-c", np.ones(2, np.float32))  # 8 bytes
    assert store.prune("m", 2) == [1]
    kept = sorted(os.path.getsize(store.root / SPARE_DIR / name) for name in spares(store))
    # 12 + 32 > 40: whichever of the two comes first is kept, the other deleted, and the 8 bytes still fit
    assert kept in ([8, 12], [8, 32])


def test_a_spare_bound_of_zero_deletes_every_pruned_file(tmp_path):
    store = UpdateStore(tmp_path / "u", spare_bytes=0)
    store.put("m", 0, "dev-0", np.ones(4, np.float32))
    assert store.prune("m", 1) == [0] and files(store) == []


def test_put_writes_over_a_spare_and_a_spare_of_a_larger_tensor_keeps_no_tail(store):
    big = store.put("m", 0, "dev-0", np.arange(1000, dtype=np.float32))
    inode = os.stat(store.root / big).st_ino
    store.prune("m", 1)
    assert len(spares(store)) == 1
    small = np.array([1.5, -2.0, 0.0], dtype=np.float32)
    ref = store.put("m", 1, "dev-1", small)
    assert spares(store) == [] and os.stat(store.root / ref).st_ino == inode  # the same file, renamed
    assert (store.root / ref).read_bytes() == small.astype("<f4").tobytes()
    np.testing.assert_array_equal(store.get(ref, 3), small)
    with pytest.raises(UpdateMissing):
        store.get(big, 1000)  # the pruned reference names nothing, though its file lives on under another name
    assert store.put("m", 1, "dev-2", small) != ref  # no spare left: a new file
    assert ref in files(store) and len(files(store)) == 2


def test_two_stores_on_one_root_never_hand_out_the_same_spare(tmp_path):
    first, second = UpdateStore(tmp_path / "u"), UpdateStore(tmp_path / "u")
    for d in range(4):
        first.put("m", 0, f"dev-{d}", np.ones(2, np.float32))
    first.prune("m", 1)
    taken = [first.put("m", 1, "a", np.full(2, 1.0, np.float32))]  # first lists all four, takes one
    taken += [second.put("m", 1, f"b{i}", np.full(2, 2.0 + i, np.float32)) for i in range(3)]  # second takes three
    taken += [first.put("m", 1, f"c{i}", np.full(2, 9.0 + i, np.float32)) for i in range(2)]  # listed, gone: new
    inodes = {os.stat(first.root / r).st_ino for r in taken}
    assert len(inodes) == len(taken) == 6 and spares(first) == []
    np.testing.assert_array_equal(first.get(taken[0], 2), [1, 1])
    for i, ref in enumerate(taken[1:4]):
        np.testing.assert_array_equal(first.get(ref, 2), [2.0 + i] * 2)


def test_the_spare_directory_is_no_model_id_and_is_never_pruned_as_one(store):
    with pytest.raises(ValueError):
        store.put(SPARE_DIR, 0, "dev-1", np.ones(2, np.float32))
    with pytest.raises(ValueError):
        store.prune(SPARE_DIR, 10)


def test_a_tensor_pruned_and_written_over_while_it_is_read_is_missing_not_mixed(store, monkeypatch):
    import builtins

    import fedguard.updatestore as updatestore
    ref = store.put("m", 0, "dev-0", np.ones(4, np.float32))
    real_open = builtins.open

    class Racing:  # the aggregator's retention and a validator's write land between the read and its check
        def __init__(self, *args):
            self.f = real_open(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, buffer):
            n = self.f.readinto(buffer)
            monkeypatch.setattr(updatestore, "open", real_open, raising=False)
            store.prune("m", 1)
            store.put("m", 1, "dev-1", np.full(4, 7.0, np.float32))
            return n

    monkeypatch.setattr(updatestore, "open", Racing, raising=False)
    with pytest.raises(UpdateMissing, match="retention"):
        store.get(ref, 4)  # not the 7s of the file it read from, nor its 1s: the tensor is gone
