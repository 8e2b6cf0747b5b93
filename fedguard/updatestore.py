"""The update store: validated tensors kept beside the log, referenced from it (the claim-check pattern).

A record of ``fl.updates.valid`` (and of its index, and a member of a window) carries everything about a validated
update except its tensor, and ``tensor``: a reference into this store, where the validator wrote the tensor before it
sent the record. The aggregator reads the window members' tensors from here.

Why not the tensor on the topic (measured, ``bench/pipeline.py`` and ``bench/results/pipeline.md``): with the tensor
on ``fl.updates.valid`` every validated byte crossed the broker three times (raw in, valid in, valid out to the
aggregator); producing it cost the worker a CRC, three copies and a socket write per record, and the broker a second
copy in its memory engine, which never frees records (issue 12). At d = 100k one worker validated 30-33% of the raw
consume rate with it, 41-46% without it. At d = 1M a tensor is 4 MB, past the 1 MB ``max.message.bytes`` a stock
Kafka topic accepts. Large payloads beside the log and a reference in the record is the usual answer (Hohpe & Woolf,
"Enterprise Integration Patterns", 2003: Claim Check).

Layout: ``<root>/<model id>/<base version>/<device id>.<random token>.f32``, the tensor's float32 values in
little-endian order and nothing else. The token (from :mod:`secrets`) gives every write a new name: two devices, or
a re-delivery, or a broker whose memory engine restarted its offsets at 0, never share one, and a name is never used
again. A file is written to a temporary name and renamed, so a reader finds the whole tensor or nothing.

Retention (:meth:`UpdateStore.prune`): the aggregator deletes the directories of base versions no window can still
use and the audit's look-back no longer reads (``aggregator.auditing.LOOKBACK_WINDOWS``), after it published each
version. Their files are not unlinked but renamed into ``<root>/@spare/`` (up to ``spare_bytes`` in all; ``@`` is
outside the id alphabet, so no model id can name it), and :meth:`UpdateStore.put` renames a spare to its temporary
name and writes over it: writing into a file's existing pages costs the kernel a copy, a new file's pages must be
allocated and, once background writeback runs, reclaimed. Measured on this machine (ext4), 400 kB per file, 8,000
files, old files removed as new ones come: 0.37 ms of system CPU per new file against 0.07 ms per overwritten spare;
under the validation stage's write rate the new-file cost rose to 0.9 ms. A spare holds a pruned tensor until it is
reused: the store's directory is as private as before, and the bound limits what it keeps.

Every process that reads or writes must see the same directory: the embedded stack's processes share the data dir;
in compose every fedguard service mounts the same volume; on several hosts it must be shared storage.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

import numpy as np

_SUFFIX = ".f32"
_DTYPE = np.dtype("<f4")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # the wire's id alphabet (fedguard/envelope.py)
SPARE_DIR = "@spare"  # pruned files waiting to be written over; not a valid model id
SPARE_BYTES = 256 << 20  # spares kept at most, in bytes (at d = 159k, 422 files: dozens of windows' writes)
_RESCAN_S = 1.0  # an empty spare list is refilled from the directory at most this often (other processes prune)


class UpdateMissing(LookupError):
    """A reference names no tensor (deleted by retention, or never written)."""


def _component(value: str, what: str) -> str:
    if not _NAME.match(value) or value in (".", ".."):
        raise ValueError(f"{what} {value!r} is not a valid path component")
    return value


class UpdateStore:
    """Tensors of validated updates under ``root`` (see the module docstring)."""

    def __init__(self, root: Path | str, spare_bytes: int = SPARE_BYTES) -> None:
        self.root = Path(root)
        self.spare_bytes = spare_bytes
        self._spares: list[str] = []  # names in the spare directory this process may take (others may take them too)
        self._scanned = -_RESCAN_S
        self._lock = threading.Lock()  # put runs in worker threads

    def put(self, model_id: str, base_version: int, device_id: str, tensor: np.ndarray) -> str:
        """Write ``tensor`` (float32, any shape: stored flat) and return its reference; over a spare file if
        there is one (see the module docstring)."""
        directory = f"{_component(model_id, 'model id')}/{int(base_version)}"
        ref = f"{directory}/{_component(device_id, 'device id')}.{secrets.token_hex(8)}{_SUFFIX}"
        path = self.root / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        reused = self._take_spare(temporary)
        with open(temporary, "r+b" if reused else "wb") as f:
            f.write(np.ascontiguousarray(tensor, dtype=_DTYPE).data)
            if reused:
                f.truncate()  # a spare of a larger model keeps no tail
        os.replace(temporary, path)
        return ref

    def _take_spare(self, temporary: Path) -> bool:
        """Rename a spare file to ``temporary``; ``False`` if there is none (another process may take a name this
        one listed: the rename fails and the next is tried)."""
        spare_dir = self.root / SPARE_DIR
        while True:
            with self._lock:
                if not self._spares and time.monotonic() - self._scanned >= _RESCAN_S:
                    self._scanned = time.monotonic()
                    try:
                        self._spares = os.listdir(spare_dir)
                    except FileNotFoundError:
                        pass
                if not self._spares:
                    return False
                name = self._spares.pop()
            try:
                os.replace(spare_dir / name, temporary)
                return True
            except FileNotFoundError:
                continue

    def get(self, ref: str, num_params: int) -> np.ndarray:
        """The tensor ``ref`` names, as a float32 vector of ``num_params`` values.

        Raises :class:`UpdateMissing` if there is none, ``ValueError`` for a reference outside the store or a file
        of another size."""
        path, expected = self._path(ref), num_params * _DTYPE.itemsize
        data = bytearray(expected + 1)  # one byte more: a longer file is seen, not cut
        try:
            with open(path, "rb") as f:
                size = f.readinto(data)
            # Still there, so not pruned while read: a pruned file leaves its name for good (names are never
            # reused) before it can be a spare written over.
            os.stat(path)
        except FileNotFoundError:
            raise UpdateMissing(f"no update tensor {ref!r} in {self.root} (deleted by retention?)") from None
        if size != expected:
            raise ValueError(f"update tensor {ref!r} holds {'more than ' if size > expected else ''}{size} bytes, "
                             f"the model needs {expected}")
        return np.frombuffer(memoryview(data)[:expected], dtype=_DTYPE).astype(np.float32, copy=False)

    def prune(self, model_id: str, keep_from: int) -> list[int]:
        """Delete the tensors of every base version below ``keep_from``; returns the base versions deleted."""
        model_dir = self.root / _component(model_id, "model id")
        if not model_dir.is_dir():
            return []
        old = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and int(p.name) < keep_from)
        spare_dir = self.root / SPARE_DIR
        room = 0
        if old and self.spare_bytes > 0:
            spare_dir.mkdir(exist_ok=True)
            room = self.spare_bytes - sum(_size(entry) for entry in os.scandir(spare_dir))
        for version in old:
            for entry in os.scandir(model_dir / str(version)):
                # no stat once the spares are full (the steady state): rmtree below removes the file
                if (room > 0 and entry.name.endswith(_SUFFIX) and entry.is_file(follow_symlinks=False)
                        and 0 < (size := _size(entry)) <= room):
                    try:
                        os.replace(entry.path, spare_dir / secrets.token_hex(16))
                        room -= size
                    except FileNotFoundError:
                        pass
            shutil.rmtree(model_dir / str(version), ignore_errors=True)
        with self._lock:
            self._scanned = -_RESCAN_S  # the next put that finds no spare listed looks again at once
        return old

    def _path(self, ref: str) -> Path:
        parts = ref.split("/")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].endswith(_SUFFIX):
            raise ValueError(f"{ref!r} is not an update store reference")
        _component(parts[0], "model id")
        _component(parts[2], "file name")
        return self.root / ref


def _size(entry: os.DirEntry) -> int:
    try:
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:  # taken or pruned by another process meanwhile
        return 0


def keep_from(current_version: int, max_staleness: int) -> int:
    """The oldest base version whose tensors a window can still need once ``current_version`` is published.

    Updates on base versions from ``current_version - max_staleness`` on are admitted; a window of base version
    ``current_version - max_staleness - 1`` can still be closing (its deadline, a slow aggregator) while the version
    after it is published, so one more is kept, and one for a window the aggregator is re-reading after a restart."""
    return max(0, current_version - max_staleness - 2)
