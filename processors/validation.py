"""Validation of raw records: every check of DESIGN.md and issue 3, each failure mapped to its reason code.

Every byte of a raw record is attacker-controlled. A batch of records is validated in three steps:

1. **Local, before trust** (no Redis): the envelope is parsed within the size bound of this model
   (:func:`fedguard.envelope.parse`), the model id checked, and the record opened with the device's key (AEAD, the
   header as associated data). Keys come from a cache of the registry; a cache miss (or an AEAD failure with a
   cached key, which may have been rotated) costs one pipelined Redis read for the whole batch.
2. **Local, after authentication**: the record key must name the authenticated device; then the content checks of
   :func:`check_content` (clock skew, sample count, codec, tensor, dtype, shape, finiteness, norm).
3. **Admission in Redis**, one Lua call per part of the batch (:mod:`processors.admission`, which owns the
   protocol; :func:`admission_split`): the key used must still be the device's and the device active (revoked /
   quarantined), the sequence number fresh (replay), one token from the device's and the global bucket
   (rate_limited / ingress_limited), then the first local failure if any, the base version (future_version /
   stale), one update per device per base version (window_duplicate), and the sequence number advances. Atomic
   per record, so a revocation, a rotation, a replay or a second seat in a window is decided on the registry's
   state at that moment, across every worker and restart. The rate check sits after
   authentication and the replay check, so neither a forger nor a replayer
   can drain an honest device's bucket, and before anything is accepted.

Nothing in a record is trusted before its AEAD tag verifies; the sequence number advances only for an update that
passed every check; no allocation is proportional to a size the sender declared (the decoder checks declared
element counts against the bytes present and the model size first; the norm needs no float64 copy).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedguard import envelope, registry
from fedguard.codec import CODEC_NAME, decode_tensor, exact_float32_vector, max_encoded_bytes
from fedguard.envelope import SealedEnvelope, UpdateHeader
from fedguard.keys import public_from_hex
from fedguard.reasons import Reason, RejectError
from fedguard.settings import Settings
from processors import admission
from processors.admission import AdmissionChannel, Outage, redis_outage

log = logging.getLogger("fedguard.validation")

CHECKS = ("envelope", "registry", "aead", "record_key", "clock", "sample_count", "codec", "dtype", "shape",
          "finite", "norm", "status", "replay", "rate", "version")
NORM_CHUNK = 1 << 16  # elements per float32 dot product; partial sums are added in float64
# A batch is admitted in three Redis calls (see admission_split): while Redis runs one, this process opens and
# checks the next records, and only the last call's Redis time is waited for. Sizes: half, three eighths, an
# eighth. Each call costs ~0.2 ms of client time (AdmissionChannel) and Redis takes ~5 us per record against
# ~30 us of local work per 10k-parameter record (on the 2-vCPU machine of bench/results), so each part's local work
# covers Redis' time for the part before, and the last part, whose Redis time nothing hides, is small.
SPLIT_AT = (0.5, 0.875)
MIN_SPLIT = 16  # smaller batches go in one call
MAX_CACHED_KEYS = 100_000


class ValidUpdate(NamedTuple):
    """An update that passed every check (a tuple: built once per record on the hot path)."""

    header: UpdateHeader
    tensor: np.ndarray
    norm: float


def sum_of_squares(tensor: np.ndarray) -> float:
    """Sum of squares of a float32 vector without a float64 copy: float32 dot products over chunks of
    ``NORM_CHUNK`` elements (BLAS), their results added in float64.

    NaN or Inf anywhere makes the result NaN or Inf (squares are non-negative, so they cannot cancel); a finite
    result therefore proves every element finite. A chunk whose squares overflow float32 also gives Inf.
    """
    flat = tensor if tensor.ndim == 1 else tensor.reshape(-1)
    if flat.size <= NORM_CHUNK:
        return float(flat.dot(flat))
    return math.fsum(float(np.dot(flat[i:i + NORM_CHUNK], flat[i:i + NORM_CHUNK]))
                     for i in range(0, flat.size, NORM_CHUNK))


def finite_norm(tensor: np.ndarray, bound: float) -> float:
    """The L2 norm of ``tensor``, or :class:`RejectError` ``NON_FINITE`` / ``NORM_BOUND``."""
    squares = sum_of_squares(tensor)
    if not math.isfinite(squares):
        bad = int(tensor.size - np.count_nonzero(np.isfinite(tensor)))
        if bad:
            raise RejectError(Reason.NON_FINITE, f"{bad} NaN/Inf values")
        # Every element is finite but float32 squares overflowed: the exact norm in float64 (rare, and far above
        # any sensible bound, so the copy is only made for records about to be rejected).
        norm = float(np.linalg.norm(tensor.astype(np.float64)))
    else:
        norm = math.sqrt(squares)
    if norm > bound:
        raise RejectError(Reason.NORM_BOUND, f"L2 norm {norm:.4g} above bound {bound:.4g}")
    return norm


def check_content(header: UpdateHeader, payload: bytes, *, num_params: int, settings: Settings,
                  now: float) -> tuple[np.ndarray, float]:
    """The checks of an authenticated update that need no Redis, in order; returns (tensor, norm) or raises."""
    skew = abs(now - header.timestamp)
    if skew > settings.max_clock_skew_s:
        raise RejectError(Reason.CLOCK_SKEW, f"timestamp is {skew:.0f}s from server time, bound "
                                             f"{settings.max_clock_skew_s:.0f}s")
    if not 1 <= header.num_samples <= settings.max_sample_count:
        raise RejectError(Reason.BAD_SAMPLE_COUNT,
                          f"sample count {header.num_samples} not in [1, {settings.max_sample_count}]")
    if header.codec != CODEC_NAME:
        raise RejectError(Reason.UNSUPPORTED_CODEC, f"codec {header.codec!r}, expected {CODEC_NAME!r}")
    tensor = exact_float32_vector(payload, num_params)
    if tensor is not None:  # what every honest update is: the dtype and shape checks below would pass
        return tensor, finite_norm(tensor, settings.max_update_norm)
    tensor = decode_tensor(payload, num_params)
    if tensor.dtype != np.float32:
        raise RejectError(Reason.BAD_DTYPE, f"dtype {tensor.dtype}, expected float32")
    if tensor.shape != (num_params,):
        raise RejectError(Reason.BAD_SHAPE, f"shape {tensor.shape}, expected ({num_params},)")
    return tensor, finite_norm(tensor, settings.max_update_norm)


def byte_bounded(items: list, max_bytes: int, size=lambda item: len(item[0] or b"")) -> list[list]:
    """Split ``items`` (in order) into runs whose sizes add up to at most ``max_bytes`` (a bigger item alone), so
    the plaintexts one :meth:`Validator.validate_batch` call keeps alive stay bounded whatever the record sizes."""
    groups: list[list] = []
    current: list = []
    total = 0
    for item in items:
        n = size(item)
        if current and total + n > max_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        groups.append(current)
    return groups


def admission_split(count: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` ranges of a batch's ``count`` parsed records that go to Redis in one admission call
    each: all at once when there are few, else cut at the shares ``SPLIT_AT``."""
    if count <= MIN_SPLIT:
        return [(0, count)] if count else []
    cuts = [0, *(round(count * share) for share in SPLIT_AT), count]
    return list(zip(cuts, cuts[1:]))


@dataclass(slots=True)
class _Pending:
    """An authenticated record waiting for admission."""

    index: int
    sealed: SealedEnvelope
    tensor: np.ndarray | None
    norm: float
    local: RejectError | None  # the first local check that failed
    line: str  # its record in the admission call (processors.admission.admission_record)


_StaleKey = tuple[int, SealedEnvelope, str]  # a record that failed authentication: index, envelope, key tried


@dataclass(slots=True)
class _Key:
    public_hex: str
    aead: ChaCha20Poly1305


@dataclass
class Validator:
    settings: Settings
    server_private: object  # X25519PrivateKey
    num_params: int
    redis: aioredis.Redis
    _keys: dict[str, _Key] = field(default_factory=dict)  # device id -> its registry key, as last read
    _one_batch_at_a_time: asyncio.Lock = field(default_factory=asyncio.Lock)  # one admission call out at most

    def __post_init__(self) -> None:
        self._admission = AdmissionChannel(self.redis)
        # The largest honest record: a maximal header and the model's parameters in the widest dtype (a float64
        # update must reach the dtype check to get its own reason code). Bigger records are cut off unread.
        self.max_record_bytes = min(self.settings.max_payload_bytes,
                                    envelope.max_record_bytes(max_encoded_bytes(self.num_params)))

    # -- the public API --------------------------------------------------------------------------------------------
    async def validate(self, raw: bytes | None, record_key: bytes | None, position: str = "") -> ValidUpdate:
        """Validate one raw record; ``position`` (raw ``partition:offset``) tells a re-delivery from a replay."""
        (outcome,) = await self.validate_batch([(raw, record_key, position)])
        if isinstance(outcome, RejectError):
            raise outcome
        return outcome

    async def validate_batch(self, items: list[tuple[bytes | None, bytes | None, str]]) -> list:
        """Validate raw records ``(value, record key, position)`` in order; one outcome per record, never raises.

        Each outcome is a :class:`ValidUpdate` or a :class:`RejectError` (reason, detail, device id, whether
        authenticated, and a security event to publish, if any). Records of one device are admitted in the order
        given, so a batch behaves exactly like the same records validated one by one.

        A Redis outage does not end here: every Redis call is retried until Redis answers (:func:`redis_outage`), so
        the batch waits and validation pauses. ``internal_error`` is left for bugs.
        """
        outcomes: list = [None] * len(items)
        try:
            async with self._one_batch_at_a_time:  # the admission channel pairs each reply with the call before it
                await self._validate_into(items, outcomes)
        except Exception as exc:  # a bug (Redis outages are waited out below): never let it stop the pipeline
            log.exception("validator bug: validation of a batch of %d records failed", len(items))
            for i, outcome in enumerate(outcomes):
                if outcome is None or isinstance(outcome, _Pending):
                    outcomes[i] = RejectError(Reason.INTERNAL_ERROR, f"validator error: {exc!r}"[:500])
        return outcomes

    # -- the steps -------------------------------------------------------------------------------------------------
    # Each step takes the batch's ``items`` and ``outcomes`` (one slot per record, filled in place as records are
    # decided, so a bug in a later step still leaves the decided ones, see validate_batch) and returns what the next
    # step needs.
    async def _validate_into(self, items, outcomes: list) -> None:
        now = time.time()
        parsed = self._parse_all(items, outcomes)
        fetched = await self._fetch_missing_keys({sealed.header.device_id for _, sealed in parsed})
        stale_keys = await self._open_and_admit(parsed, items, outcomes, now, fetched)
        if stale_keys:
            await self._retry_stale_keys(stale_keys, items, outcomes, now)

    def _parse_all(self, items, outcomes: list) -> list[tuple[int, SealedEnvelope]]:
        """Parse every record (no Redis): returns ``(index, envelope)`` of those that parse; the others get their
        RejectError in ``outcomes``."""
        parsed: list[tuple[int, SealedEnvelope]] = []
        for i, (raw, _key, _pos) in enumerate(items):
            try:
                parsed.append((i, self._parse(raw)))
            except RejectError as err:
                outcomes[i] = err
            except Exception as exc:  # a bug: the record gets a code, the batch goes on
                outcomes[i] = _internal(exc)
        return parsed

    async def _fetch_missing_keys(self, needed: set[str]) -> set[str]:
        """Read the registry keys of the ``needed`` devices that are not cached (one round trip, none when all are);
        returns the devices whose key was just read. The cache is bounded softly: a batch that would take it past
        ``MAX_CACHED_KEYS`` starts it over with this batch's devices."""
        missing = needed - self._keys.keys()
        if len(self._keys) + len(missing) > MAX_CACHED_KEYS:
            self._keys.clear()
            missing = needed
        return await self._fetch_keys(missing)

    async def _open_and_admit(self, parsed: list[tuple[int, SealedEnvelope]], items, outcomes: list, now: float,
                              fetched: set[str]) -> list[_StaleKey]:
        """Open and check the parsed records part by part (:func:`admission_split`) and admit each part in one Redis
        call, the call of a part out while the next part is opened. Returns the records that failed authentication
        with a key cached before this batch (``fetched``: the keys just read), which may have been rotated since:
        ``(index, envelope, the key tried)``."""
        stale_keys: list[_StaleKey] = []
        inflight: list[_Pending] | None = None  # the part whose admission call is out
        try:
            for start, end in admission_split(len(parsed)):
                pending = []
                for i, sealed in parsed[start:end]:
                    outcome = outcomes[i] = self._open(i, sealed, items[i], now)
                    if isinstance(outcome, _Pending):
                        pending.append(outcome)
                    elif outcome.reason is Reason.AUTH_FAILED and sealed.header.device_id not in fetched:
                        # The cached key may have been rotated: read it again (_retry_stale_keys).
                        stale_keys.append((i, sealed, self._keys[sealed.header.device_id].public_hex))
                if inflight:
                    await self._finish_admission(inflight, items, outcomes, now)
                inflight = await self._start_admission(pending)
            if inflight:
                await self._finish_admission(inflight, items, outcomes, now)
            inflight = None
        finally:
            if inflight:  # failing with a call out: its reply must not be read as the next call's
                await self._admission.abandon()
        return stale_keys

    async def _retry_stale_keys(self, stale_keys: list[_StaleKey], items, outcomes: list, now: float) -> None:
        """Read again the keys of the records :meth:`_open_and_admit` could not open with a cached key; open again
        those whose device's key has changed since, and admit them in one call. The others keep their auth_failed."""
        await self._fetch_keys({sealed.header.device_id for _, sealed, _ in stale_keys})
        pending = []
        for i, sealed, tried in stale_keys:
            current = self._keys.get(sealed.header.device_id)
            if current is not None and current.public_hex != tried:
                outcome = outcomes[i] = self._open(i, sealed, items[i], now)
                if isinstance(outcome, _Pending):
                    pending.append(outcome)
        if await self._start_admission(pending):
            await self._finish_admission(pending, items, outcomes, now)

    async def _start_admission(self, pending: list[_Pending]) -> list[_Pending] | None:
        """Send the admission call of ``pending`` (if any); :meth:`_finish_admission` reads its reply."""
        if not pending:
            return None
        await self._admission.send(admission.admit_args(self.settings, [p.line for p in pending]))
        return pending

    async def _finish_admission(self, pending: list[_Pending], items, outcomes: list, now: float,
                                retry: bool = True) -> None:
        """Read the reply of the call :meth:`_start_admission` sent for ``pending`` and decide each record; records
        opened with a key the registry no longer holds (``rekey``) are opened again with the key it holds now and
        admitted again, once (``retry``)."""
        rekey = []
        for p, line in zip(pending, admission.reply_lines(await self._admission.receive()), strict=True):
            if line == admission.ACCEPTED:
                outcomes[p.index] = ValidUpdate(p.sealed.header, p.tensor, p.norm)
                continue
            code, emit, info = admission.parse_line(line)
            if code == admission.REKEY:
                rekey.append(p)
            else:
                outcomes[p.index] = self._outcome(p, code, info, emit)
        if rekey:
            await self._reopen_rekeyed(rekey, items, outcomes, now, retry)

    async def _reopen_rekeyed(self, rekey: list[_Pending], items, outcomes: list, now: float, retry: bool) -> None:
        """The registry holds another key than the one the ``rekey`` records opened with (a rotation raced the
        cache): read it, open them again and admit them again (``retry``), else they fail authentication."""
        if not retry:
            for p in rekey:
                outcomes[p.index] = RejectError(Reason.AUTH_FAILED, "the device's key changed while validating",
                                                device_id=p.sealed.header.device_id)
            return
        await self._fetch_keys({p.sealed.header.device_id for p in rekey}, only_changed=True)
        again = []
        for p in rekey:
            outcome = self._open(p.index, p.sealed, items[p.index], now)
            if isinstance(outcome, RejectError) and outcome.reason is Reason.AUTH_FAILED:
                outcome = RejectError(Reason.AUTH_FAILED, "sealed with a key that is no longer the device's "
                                      "(rotated)", device_id=p.sealed.header.device_id)
            outcomes[p.index] = outcome
            if isinstance(outcome, _Pending):
                again.append(outcome)
        if await self._start_admission(again):
            await self._finish_admission(again, items, outcomes, now, retry=False)

    def _parse(self, raw: bytes | None) -> SealedEnvelope:
        sealed = envelope.parse(raw, self.max_record_bytes)
        header = sealed.header
        if header.model_id != self.settings.model_id:
            raise RejectError(Reason.WRONG_MODEL, f"model {header.model_id!r}, this pipeline trains "
                                                  f"{self.settings.model_id!r}", device_id=header.device_id)
        return sealed

    def _open(self, index: int, sealed: SealedEnvelope, item, now: float):
        """AEAD open with the cached key, record key, content checks: a :class:`_Pending` or a RejectError."""
        header = sealed.header
        device_id = header.device_id
        try:
            key = self._keys.get(device_id)
            if key is None:
                return RejectError(Reason.UNKNOWN_DEVICE, f"device {device_id!r} is not enrolled",
                                   device_id=device_id)
            try:
                payload = envelope.open_sealed(sealed, key.aead)
            except RejectError as err:
                err.device_id = device_id
                return err
            _raw, record_key, position = item
            if record_key is not None and record_key != device_id.encode():
                return RejectError(Reason.KEY_MISMATCH, f"record key {bytes(record_key[:64])!r} != device "
                                   f"{device_id!r}", device_id=device_id, authenticated=True)
            tensor, norm, local = None, 0.0, None
            try:
                tensor, norm = check_content(header, payload, num_params=self.num_params, settings=self.settings,
                                             now=now)
            except RejectError as err:
                err.device_id, err.authenticated = device_id, True
                local = err
            line = admission.admission_record(device_id, key.public_hex, header.seq,
                                             f"{header.update_id}@{position}",
                                             local.reason.value if local else None, header.base_version)
            return _Pending(index, sealed, tensor, norm, local, line)
        except Exception as exc:  # a bug: this record gets a code, the others go on
            return _internal(exc, device_id)

    async def _fetch_keys(self, device_ids: set[str], only_changed: bool = False) -> set[str]:
        """Read the registry keys of ``device_ids`` (one round trip); returns those now cached (or changed)."""
        if not device_ids:
            return set()
        ids = sorted(device_ids)

        async def read():
            pipe = self.redis.pipeline(transaction=False)
            for device_id in ids:
                pipe.hget(registry.device_key(self.settings, device_id), "public_key")
            return await pipe.execute()

        result = set()
        for device_id, public_hex in zip(ids, await self._with_retries(read)):
            old = self._keys.get(device_id)
            if public_hex is None:
                self._keys.pop(device_id, None)
                continue
            if old is not None and old.public_hex == public_hex:
                if not only_changed:
                    result.add(device_id)
                continue
            try:
                aead_key = envelope.derive_key(self.server_private, public_from_hex(public_hex), device_id)
            except ValueError:  # a registry entry that is not a key: the device cannot authenticate
                self._keys.pop(device_id, None)
                continue
            self._keys[device_id] = _Key(public_hex, ChaCha20Poly1305(aead_key))
            result.add(device_id)
        return result

    def _outcome(self, p: _Pending, code: str, info: str, emit: bool):
        """A record's outcome from its reply code (not ``rekey``): see :func:`processors.admission.rejection`."""
        h = p.sealed.header
        if code == "ok":  # (with an event flag or info: not produced today, but the meaning is the same)
            return ValidUpdate(h, p.tensor, p.norm)
        if p.local is not None and code == p.local.reason.value:
            return p.local
        if code == "unknown_device":
            self._keys.pop(h.device_id, None)
        return admission.rejection(code, info, emit, h, self.settings)

    async def _with_retries(self, call):
        """``await call()`` (an idempotent read), again after each Redis outage, until Redis answers."""
        outage = Outage("registry read")
        while True:
            try:
                result = await call()
            except Exception as exc:
                if not redis_outage(exc):
                    raise
                await outage.wait(exc)
                continue
            outage.over()
            return result


def _internal(exc: Exception, device_id: str | None = None) -> RejectError:
    log.error("validator bug on one record", exc_info=exc)
    return RejectError(Reason.INTERNAL_ERROR, f"validator error: {exc!r}"[:500], device_id=device_id)
