"""Persistent store of global model versions: one safetensors file and one JSON metadata file per version.

The metadata file is written last (atomically, by rename), so it is the commit point: a version whose JSON exists
is complete, and a restart resumes from the highest one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

_TENSOR = "params"


@dataclass(frozen=True)
class ModelVersion:
    meta: dict[str, Any]
    params: np.ndarray

    @property
    def version(self) -> int:
        return int(self.meta["version"])


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_weights(path: str | Path, sha256: str | None = None) -> np.ndarray:
    """Weights of a version from its safetensors file, checked against ``sha256`` when given."""
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 does not match the published model record")
    return st_load(data)[_TENSOR]


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _stem(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.root.glob("v*.json"))

    def save(self, version: int, params: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
        weights = st_save({_TENSOR: np.ascontiguousarray(params, dtype=np.float32)})
        stem = self._stem(version)
        weights_path = stem.with_suffix(".safetensors")
        _atomic_write(weights_path, weights)
        full = {**meta, "version": version, "path": str(weights_path.resolve()),
                "sha256": hashlib.sha256(weights).hexdigest(), "num_params": int(params.size)}
        _atomic_write(stem.with_suffix(".json"), json.dumps(full, sort_keys=True).encode())
        return full

    def meta(self, version: int) -> dict[str, Any]:
        return json.loads(self._stem(version).with_suffix(".json").read_text())

    def load(self, version: int) -> ModelVersion:
        meta = self.meta(version)
        return ModelVersion(meta=meta, params=load_weights(meta["path"], meta["sha256"]))

    def latest(self) -> ModelVersion | None:
        versions = self.versions()
        return self.load(versions[-1]) if versions else None
