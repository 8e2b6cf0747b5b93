"""Persistent store of global model versions: one safetensors file and one JSON metadata file per version.

The metadata file is written last (atomically, by rename), so it is the commit point: a version whose JSON exists
is complete, and a restart resumes from the highest one.

Retention (:func:`weights_to_keep`, :meth:`ModelStore.prune`): the metadata of every version is kept for ever (the
lineage: parent, window, rule, members, audit verdict; a few kB each), the weights only of the versions that serving,
training and an operator's rollback can need: the last ``keep_last`` versions (devices train from the latest, a stale
update's base is at most ``max_staleness`` back, the aggregator reads the current version's parent), every
``keep_every``-th version as a checkpoint, version 0, and versions pinned in their metadata (``"pinned": true``,
e.g. the audit's last clean versions). Without it the demo's model store grows ~1.1 GB per hour.

Reversed triggers (:meth:`ModelStore.save_trigger`): the model audit keeps the trigger it reverse-engineered from each
flagged version (``t<N>.safetensors``: mask, pattern and target class; 2 x D float32), so that the screening
of later windows against it survives a restart. They are small (6 kB at D = 784) and never pruned.
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


class WeightsPruned(LookupError):
    """The version's metadata exists but retention deleted its weights."""


def weights_to_keep(versions: list[int], keep_last: int, keep_every: int, pinned: set[int] | frozenset = frozenset()
                    ) -> set[int]:
    """The versions whose weights retention keeps: the last ``keep_last``, every ``keep_every``-th (0 included),
    and ``pinned``. ``keep_last`` >= 1: the latest version is always kept."""
    if keep_last < 1 or keep_every < 1:
        raise ValueError(f"keep_last and keep_every must be >= 1 (got {keep_last}, {keep_every})")
    ordered = sorted(versions)
    keep = set(ordered[-keep_last:]) | {v for v in ordered if v % keep_every == 0}
    return keep | (set(pinned) & set(ordered))


class ModelStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _stem(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.root.glob("v*.json"))

    def save_trigger(self, version: int, target: int, mask: np.ndarray, pattern: np.ndarray) -> None:
        """Keep the audit's reversed trigger of flagged ``version`` (written before the version's metadata: a
        trigger without committed metadata is ignored by :meth:`triggers`)."""
        data = st_save({"mask": np.ascontiguousarray(mask, dtype=np.float32),
                        "pattern": np.ascontiguousarray(pattern, dtype=np.float32),
                        "target": np.asarray([int(target)], dtype=np.int64)})
        _atomic_write(self._trigger_path(version), data)

    def _trigger_path(self, version: int) -> Path:
        return self.root / f"t{version:06d}.safetensors"  # not v*: the weights' globs must not see it

    def triggers(self, last: int) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """The ``last`` stored triggers of committed versions, oldest first: ``(version, target, mask, pattern)``."""
        committed = set(self.versions())
        found = sorted(v for v in (int(p.stem[1:]) for p in self.root.glob("t*.safetensors"))
                       if v in committed)
        out = []
        for v in found[-last:] if last > 0 else []:
            arrays = st_load(self._trigger_path(v).read_bytes())
            out.append((v, int(arrays["target"][0]), arrays["mask"], arrays["pattern"]))
        return out

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
        if not Path(meta["path"]).exists():
            raise WeightsPruned(f"the weights of version {version} were deleted by the model store's retention "
                                f"(its metadata is kept); roll back to a version that has them")
        return ModelVersion(meta=meta, params=load_weights(meta["path"], meta["sha256"]))

    def has_weights(self, version: int) -> bool:
        return self._stem(version).with_suffix(".safetensors").exists()

    def prune(self, keep_last: int, keep_every: int) -> list[int]:
        """Delete the weights retention does not keep (see the module docstring); returns the versions pruned.
        Metadata files stay; a version pinned in its metadata keeps its weights."""
        versions = self.versions()
        committed = set(versions)  # (weights whose metadata is not written yet belong to a save in progress)
        candidates = sorted(v for v in (int(p.stem[1:]) for p in self.root.glob("v*.safetensors")) if v in committed)
        if not candidates:
            return []
        keep = weights_to_keep(versions, keep_last, keep_every)
        pinned = {v for v in candidates if v not in keep and self.meta(v).get("pinned")}
        pruned = [v for v in candidates if v not in keep and v not in pinned]
        for v in pruned:
            self._stem(v).with_suffix(".safetensors").unlink(missing_ok=True)
        return pruned

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())

    def identity(self) -> str | None:
        """This store's id, from version 0's record (its creation time and weights), or ``None`` while it is empty:
        a store started afresh reuses version numbers, and whoever keys state by version (the window stage's
        closures, processors/defence.py) tells the two stores apart by this."""
        versions = self.versions()
        if not versions:
            return None
        initial = self.meta(0) if versions[0] == 0 else {}
        return hashlib.sha256(f"{initial.get('created_at')!r}:{initial.get('sha256')}".encode()).hexdigest()[:16]

    def latest(self) -> ModelVersion | None:
        versions = self.versions()
        return self.load(versions[-1]) if versions else None
