"""Learning tasks: loading, normalisation and non-IID partitioning.

Three tasks, none downloaded at run time:

* ``"fashion-mnist"``: the IDX files of Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist/``), read by the small parser below (gzip + struct + ``np.frombuffer``;
  magic numbers and sizes validated, nothing unpickled). When the files are absent the loader falls back to
  ``"digits"`` with a warning; ``TaskData.name`` always names the task actually used.
* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 samples), split 80/20 stratified by ``seed``.
* ``"synthetic"``: Gaussian class blobs, deterministic from ``seed``, for fast tests and benchmarks.

Features are float32 and standardised with one scalar mean/std taken from the training set (pixels first scaled
to [0, 1]); a single scalar keeps near-constant border pixels from being blown up by a per-pixel std.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("fashion-mnist", "digits", "synthetic")

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "FEDGUARD_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); all multi-byte values big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_MAX_BYTES = 1 << 31  # refuse headers that announce more than 2 GiB of payload


@dataclass(frozen=True)
class TaskData:
    """A loaded task. Arrays are shared by every caller in the process (cached) and therefore read-only:
    index or ``.copy()`` them before modifying."""

    name: str
    x_train: np.ndarray  # float32, (N, D), standardised
    y_train: np.ndarray  # int64, (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_dim: int


# --------------------------------------------------------------------------------------------------------- IDX


def _read_exact(fh, n: int, path: str, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ValueError(f"{path}: truncated IDX file ({what}: expected {n} bytes, got {len(data)})")
    return data


def read_idx(path: str | os.PathLike, *, expected_ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when the name ends in ``.gz``) into a native-endian array.

    Validates the magic number (two zero bytes, a known type code, the number of dimensions), that the payload
    size matches the announced dimensions exactly (no truncation, no trailing bytes) and, if given, the number of
    dimensions. Any violation raises ``ValueError``; nothing is executed or unpickled.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            magic = _read_exact(fh, 4, path, "magic number")
            zero, code, ndim = struct.unpack(">HBB", magic)
            if zero != 0 or code not in _IDX_DTYPES:
                raise ValueError(f"{path}: bad IDX magic number 0x{magic.hex()}")
            if ndim == 0 or (expected_ndim is not None and ndim != expected_ndim):
                want = f", expected {expected_ndim}" if expected_ndim is not None else ""
                raise ValueError(f"{path}: IDX file has {ndim} dimensions{want}")
            dims = struct.unpack(f">{ndim}I", _read_exact(fh, 4 * ndim, path, "dimensions"))
            dtype = _IDX_DTYPES[code]
            count = 1
            for d in dims:
                count *= d
            nbytes = count * dtype.itemsize
            if nbytes > _IDX_MAX_BYTES:
                raise ValueError(f"{path}: IDX header announces {nbytes} bytes (dims {dims}), over the limit")
            payload = _read_exact(fh, nbytes, path, "data")
            if fh.read(1):
                raise ValueError(f"{path}: trailing bytes after IDX data (dims {dims})")
    except (OSError, EOFError, zlib.error) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path}: unreadable IDX file: {exc}") from exc
    return np.frombuffer(payload, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip when the name ends in ``.gz``). Used by tests and tooling."""
    path = os.fspath(path)
    array = np.asarray(array)
    for code, dt in _IDX_DTYPES.items():
        if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize:
            break
    else:
        raise ValueError(f"no IDX type code for dtype {array.dtype}")
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(dt, copy=False).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + body)


# ----------------------------------------------------------------------------------------------------- loaders


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = float(x_train.mean())
    std = float(x_train.std()) or 1.0
    return ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)


def _freeze(name: str, x_train, y_train, x_test, y_test, num_classes: int) -> TaskData:
    arrays = [
        np.ascontiguousarray(x_train, dtype=np.float32),
        np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32),
        np.ascontiguousarray(y_test, dtype=np.int64),
    ]
    for a in arrays:
        a.flags.writeable = False
    return TaskData(name, *arrays, num_classes=num_classes, input_dim=int(arrays[0].shape[1]))


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory used for Fashion-MNIST: ``data_dir``, else ``$FEDGUARD_FASHION_MNIST_DIR``, else Debian's."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR)


@functools.lru_cache(maxsize=4)
def _load_fashion_mnist(directory: str) -> TaskData:
    parts = {}
    for key, fname in FASHION_MNIST_FILES.items():
        parts[key] = read_idx(os.path.join(directory, fname), expected_ndim=3 if key.startswith("x") else 1)
    for split in ("train", "test"):
        x, y = parts[f"x_{split}"], parts[f"y_{split}"]
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{directory}: {split} has {x.shape[0]} images but {y.shape[0]} labels")
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise ValueError(f"{directory}: expected unsigned-byte IDX files for {split}")
        if y.size and int(y.max()) > 9:
            raise ValueError(f"{directory}: {split} label {int(y.max())} out of range 0..9")
    if parts["x_train"].shape[1:] != parts["x_test"].shape[1:]:
        raise ValueError(f"{directory}: train/test image shapes differ")
    x_train = parts["x_train"].reshape(len(parts["x_train"]), -1).astype(np.float32) / 255.0
    x_test = parts["x_test"].reshape(len(parts["x_test"]), -1).astype(np.float32) / 255.0
    x_train, x_test = _standardise(x_train, x_test)
    return _freeze("fashion-mnist", x_train, parts["y_train"], x_test, parts["y_test"], 10)


@functools.lru_cache(maxsize=8)
def _load_digits(seed: int) -> TaskData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    x_train, x_test = _standardise(x_train, x_test)
    return _freeze("digits", x_train, y_train, x_test, y_test, 10)


SYNTHETIC_CLASSES = 10
SYNTHETIC_DIM = 32
SYNTHETIC_TRAIN = 6000
SYNTHETIC_TEST = 2000


@functools.lru_cache(maxsize=8)
def _load_synthetic(seed: int) -> TaskData:
    """Gaussian blobs: class centres ~ N(0, s^2 I) in 32 dims, unit isotropic noise, a fixed random mixing so
    features are correlated. Overlapping enough that accuracy keeps improving for a few rounds."""
    rng = np.random.default_rng([seed, 0x5EED])
    c, d = SYNTHETIC_CLASSES, SYNTHETIC_DIM
    centres = rng.normal(0.0, 0.55, size=(c, d))
    mixing = np.eye(d) + rng.normal(0.0, 0.3, size=(d, d))
    n = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    y = rng.permutation(np.arange(n) % c)
    x = (centres[y] + rng.normal(size=(n, d))) @ mixing
    x_train, x_test = x[:SYNTHETIC_TRAIN], x[SYNTHETIC_TRAIN:]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return _freeze("synthetic", x_train, y[:SYNTHETIC_TRAIN], x_test, y[SYNTHETIC_TRAIN:], c)


_warned_dirs: set[str] = set()


def load_task(name: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0) -> TaskData:
    """Load a task by name (one of :data:`TASKS`); results are cached per process.

    ``data_dir`` (or ``$FEDGUARD_FASHION_MNIST_DIR``) overrides where Fashion-MNIST is read from. If any of its
    four files is missing the loader warns and returns ``"digits"`` instead; corrupt files raise ``ValueError``.
    ``seed`` selects the digits train/test split and the synthetic data; Fashion-MNIST's split is fixed.
    """
    if name == "fashion-mnist":
        directory = fashion_mnist_dir(data_dir)
        missing = [str(directory / f) for f in FASHION_MNIST_FILES.values() if not (directory / f).is_file()]
        if not missing:
            return _load_fashion_mnist(str(directory.resolve()))
        if str(directory) in _warned_dirs:  # once per directory and process: many devices share a process
            return _load_digits(int(seed))
        _warned_dirs.add(str(directory))
        log.warning(
            "Fashion-MNIST not found (missing %s); falling back to the 'digits' task. Install it with "
            "`apt-get install dataset-fashion-mnist` (files go to %s) or point %s / data_dir at a directory "
            "holding %s. The detection thresholds were measured on Fashion-MNIST: on digits they flag about 9%% "
            "of honest updates and quarantine some honest devices (bench/results/window_size.md).",
            ", ".join(missing),
            DEFAULT_FASHION_MNIST_DIR,
            FASHION_MNIST_ENV,
            ", ".join(FASHION_MNIST_FILES.values()),
        )
        return _load_digits(int(seed))
    if name == "digits":
        return _load_digits(int(seed))
    if name == "synthetic":
        return _load_synthetic(int(seed))
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")


# --------------------------------------------------------------------------------------------------- splitting


def dirichlet_split(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 10,
    max_retries: int = 1000,
) -> list[np.ndarray]:
    """Non-IID partition of sample indices by label, as in Hsu, Qi & Brown (2019), "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification" (arXiv:1909.06335), and used with
    ``alpha = 0.9`` by Bagdasaryan et al. (2020), "How To Backdoor Federated Learning" (AISTATS).

    For every class, proportions ``p ~ Dir(alpha * 1_num_clients)`` are drawn and that class's shuffled indices
    are cut accordingly. Small ``alpha`` gives highly skewed label distributions; large ``alpha`` tends to IID.
    The whole draw is repeated until every client holds at least ``min_size`` samples (at most ``max_retries``
    draws, then ``ValueError``). Returns one sorted int64 index array per client; every index appears exactly
    once across clients. Deterministic given the state of ``rng``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    n = labels.shape[0]
    if n < num_clients * min_size:
        raise ValueError(f"{n} samples cannot give {num_clients} clients at least {min_size} each")
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for _ in range(max_retries):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].append(part)
        out = [np.sort(np.concatenate(parts)).astype(np.int64) for parts in shards]
        if min(len(s) for s in out) >= min_size:
            return out
    raise ValueError(
        f"dirichlet_split: no partition of {n} samples into {num_clients} clients with >= {min_size} samples "
        f"each after {max_retries} draws (alpha={alpha}); lower min_size or num_clients, or raise alpha"
    )
