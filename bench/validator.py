"""Validator throughput against its floor (issue 3, item 7).

For each update size (float32 parameters), the same sealed records go through:

* **floor**: what no validator can avoid: split the envelope, AEAD open (ChaCha20-Poly1305), decode the ``fgt1``
  tensor (a view, no copy). No Kafka, no checks, no Redis.
* **validator**: ``processors.validation.Validator.validate_batch``, the path the Faust agent runs: envelope parse
  and header checks, key lookup, AEAD open, record key, clock, sample count, codec, dtype, shape, finiteness, norm,
  then a Redis Lua call per part of the batch (three parts) for registry status, replay, both token buckets and
  the model version.
* **one by one**: ``Validator.validate`` per record (a batch of one: one Redis round trip per record), for reference.

Redis is a real ``redis-server`` started by this script on a free loopback port (and stopped at the end). Every
record must be accepted (rate limits are raised for the run so they admit everything; the bucket arithmetic still
runs). Floor and validator take turns batch by batch over the same records (:func:`side_by_side`): this VM's speed
drifts by +-20% within seconds, and alternating keeps both measured under the same conditions. The reported ratio is
the median over ``--repeat`` runs of each run's ratio; the rates are the medians of the runs' rates.

    python bench/validator.py --sizes 10000,100000,1000000 --out bench/results/validator.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cryptography  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fedguard import envelope, registry  # noqa: E402
from fedguard.codec import decode_tensor, encode_tensor  # noqa: E402
from fedguard.envelope import UpdateHeader  # noqa: E402
from fedguard.keys import public_to_hex  # noqa: E402
from fedguard.settings import Settings  # noqa: E402
from fedguard.stack import redis_binary, temporary_redis  # noqa: E402
from processors import admission  # noqa: E402
from processors.allocator import keep_freed_memory  # noqa: E402
from processors.validation import ValidUpdate, Validator, byte_bounded  # noqa: E402
from _machine import cpu_model  # bench/ is on sys.path when a bench script runs

DEVICES = 1024  # each batch of 256 records comes from 256 different devices, as in a round of the pipeline
RECORD_OVERHEAD = 400  # envelope prefix, header, nonce, tag, fgt1 header: roughly


def make_records(size: int, count: int, server: X25519PrivateKey, model_id: str, seed: int = 0):
    """``count`` sealed updates of ``size`` float32 parameters from ``DEVICES`` devices, in sequence order."""
    rng = np.random.default_rng(seed)
    tensor = rng.normal(0, 1e-3, size).astype(np.float32)
    payload = encode_tensor(tensor)
    devices = [(f"dev-{i:04d}", X25519PrivateKey.generate()) for i in range(DEVICES)]
    keys = {d: envelope.derive_key(k, server.public_key(), d) for d, k in devices}
    records = []
    for i in range(count):
        device_id = devices[i % DEVICES][0]
        header = UpdateHeader.new(device_id=device_id, seq=i // DEVICES + 1, base_version=0, num_samples=100,
                                  model_id=model_id)
        records.append((envelope.seal(header, payload, keys[device_id]), device_id.encode()))
    publics = {d: public_to_hex(k.public_key()) for d, k in devices}
    return records, keys, publics


def floor_pass(records, aeads: dict[bytes, ChaCha20Poly1305], size: int) -> None:
    """AEAD open + tensor decode only: the least any validator must do with these bytes."""
    for raw, device in records:
        view = memoryview(raw)
        (header_len,) = struct.unpack_from(">H", raw, 4)
        body = 6 + header_len
        plain = aeads[device].decrypt(view[body:body + 12], view[body + 12:], view[:body])
        decode_tensor(plain, size)


class AcceptAll:
    """Diagnostic stand-in for the Redis admission (the interface of ``processors.admission.AdmissionChannel``):
    answers "ok" for every record without Redis. Not a validator: the column it feeds shows what the local work
    alone costs (parse, AEAD, checks, bookkeeping), so the table says how much of the rest is Redis."""

    def __init__(self) -> None:
        self._count = 0

    async def send(self, args: list) -> None:
        self._count = admission.record_count(args)

    async def receive(self) -> str:
        return "\n".join([admission.ACCEPTED] * self._count)

    async def abandon(self) -> None:
        pass


async def side_by_side(records, keys, publics, server, size: int, redis_url: str, prefix: str, batch: int,
                       max_bytes: int) -> dict[str, float]:
    """Records/s of the floor, the validator and the validator with admission skipped (:class:`AcceptAll`), over
    the same records, batch by batch in turns, so all three see the machine in the same state (this VM's speed
    drifts by +-20% over seconds; alternating per batch keeps the ratios steady)."""
    aeads = {d.encode(): ChaCha20Poly1305(k) for d, k in keys.items()}
    validator, client, cleanup = await _validator(publics, server, size, redis_url, prefix, len(records))
    local, local_client, local_cleanup = await _validator(publics, server, size, redis_url, prefix + "-local",
                                                          len(records))
    local._admission = AcceptAll()
    items = [(raw, device, f"0:{i}") for i, (raw, device) in enumerate(records)]
    seconds = {"floor": 0.0, "validator": 0.0, "local": 0.0}
    bad = []  # outcomes are dropped after each batch, as the Faust agent drops them once they are sent
    groups = [group for i in range(0, len(items), batch) for group in byte_bounded(items[i:i + batch], max_bytes)]
    order = list(seconds)
    for n, group in enumerate(groups):
        # Whichever runs later finds the batch's bytes in the CPU cache: take turns going first.
        pairs = [(raw, device) for raw, device, _ in group]
        for step in order[n % 3:] + order[:n % 3]:
            outcomes = []
            started = time.perf_counter()
            if step == "floor":
                floor_pass(pairs, aeads, size)
            else:
                outcomes = await (validator if step == "validator" else local).validate_batch(group)
            seconds[step] += time.perf_counter() - started
            bad += [o for o in outcomes if not isinstance(o, ValidUpdate)]
    await cleanup(bad)
    await local_cleanup([])
    return {step: len(records) / s for step, s in seconds.items()}


def floor_with_the_other_core_busy(records, keys, size: int, repeat: int = 5) -> tuple[float, float]:
    """Floor records/s with the machine otherwise idle and with a process spinning on the other core: how much
    work on one vCPU of this VM (Redis, in the validator's case) slows the other."""
    aeads = {d.encode(): ChaCha20Poly1305(k) for d, k in keys.items()}
    idle, busy = [], []
    for _ in range(repeat):
        for rates, spin in ((idle, False), (busy, True)):
            stop = multiprocessing.Event()
            spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True) if spin else None
            if spinner:
                spinner.start()
                time.sleep(0.2)
            started = time.perf_counter()
            floor_pass(records, aeads, size)
            rates.append(len(records) / (time.perf_counter() - started))
            if spinner:
                stop.set()
                spinner.join()
    return statistics.median(idle), statistics.median(busy)


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x += i


async def one_by_one(records, publics, server, size: int, redis_url: str, prefix: str) -> float:
    """Validator records/s when each record is validated alone (a Redis round trip per record)."""
    validator, client, cleanup = await _validator(publics, server, size, redis_url, prefix, len(records))
    bad = []
    started = time.perf_counter()
    for i, (raw, device) in enumerate(records):
        try:
            await validator.validate(raw, device, f"0:{i}")
        except Exception as exc:  # noqa: BLE001 - counted and reported below
            bad.append(exc)
    elapsed = time.perf_counter() - started
    await cleanup(bad)
    return len(records) / elapsed


async def _validator(publics, server, size: int, redis_url: str, prefix: str, count: int):
    """A validator on a fresh namespace with the devices enrolled, and its clean-up (which checks that every
    record was accepted: rate limits are raised so they admit everything; the bucket arithmetic still runs)."""
    settings = Settings(redis_url=redis_url, redis_prefix=prefix, model_id="bench", max_update_norm=1e9,
                        rate_device_capacity=count, rate_global_capacity=count * 2,
                        one_update_per_window=False)  # many updates per device and version
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    for device_id, public_hex in publics.items():
        registry.register_device(sync, settings, device_id, public_hex)
    sync.set(registry.model_version_key(settings), 0)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    validator = Validator(settings, server, size, client)
    await validator._fetch_keys(set(publics))  # start-up: the registry's keys in the cache

    async def cleanup(bad: list) -> None:
        await client.aclose()
        for key in sync.scan_iter(f"{prefix}:*"):
            sync.delete(key)
        if bad:
            raise RuntimeError(f"{len(bad)} records not accepted, e.g. {bad[0]!r}")

    return validator, client, cleanup


def machine() -> dict[str, str]:
    cpu = cpu_model()
    server = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version(),
            "numpy": np.__version__, "cryptography": cryptography.__version__, "redis-py": redis.__version__,
            "redis-server": server.split(" sha=")[0], "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="float32 parameters per update")
    parser.add_argument("--records", type=int, default=4000, help="records per size (capped by --max-mb)")
    parser.add_argument("--max-mb", type=int, default=800, help="memory for one size's records")
    parser.add_argument("--batch", type=int, default=Settings().validate_batch_size,
                        help="records per validate_batch call (the processors' validate_batch_size)")
    parser.add_argument("--max-bytes", type=int, default=Settings().validate_batch_max_bytes,
                        help="bytes of records per validate_batch call (the processors' validate_batch_max_bytes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's malloc defaults (the processors worker tunes them, processors/allocator.py)")
    parser.add_argument("--out", default="bench/results/validator.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    tuned = False if args.no_malloc_tuning else keep_freed_memory()

    rows = []
    interference = None
    with tempfile.TemporaryDirectory(prefix="fedguard-bench-redis-") as workdir, temporary_redis(workdir) as redis_url:
        server = X25519PrivateKey.generate()
        bar = tqdm(total=len(sizes) * args.repeat, desc="validator bench", unit="run")
        for size in sizes:
            count = max(20, min(args.records, args.max_mb * 2**20 // (4 * size + RECORD_OVERHEAD)))
            records, keys, publics = make_records(size, count, server, "bench")
            runs, single = [], []
            for r in range(args.repeat):
                bar.set_postfix(size=size, records=count)
                runs.append(asyncio.run(side_by_side(records, keys, publics, server, size, redis_url,
                                                     f"bench{size}b{r}", args.batch, args.max_bytes)))
                single.append(asyncio.run(one_by_one(records, publics, server, size, redis_url, f"bench{size}s{r}")))
                bar.update(1)
            ratios = [run["validator"] / run["floor"] for run in runs]
            row = {"params": size, "record_bytes": len(records[0][0]), "records": count,
                   "floor_per_s": statistics.median(run["floor"] for run in runs),
                   "validator_per_s": statistics.median(run["validator"] for run in runs),
                   "local_per_s": statistics.median(run["local"] for run in runs),
                   "ratio_local": statistics.median(run["local"] / run["floor"] for run in runs),
                   "one_by_one_per_s": statistics.median(single), "ratio": statistics.median(ratios),
                   "ratios": ratios}
            row["ratio_one_by_one"] = row["one_by_one_per_s"] / row["floor_per_s"]
            if size == sizes[0]:
                interference = floor_with_the_other_core_busy(records, keys, size)
            rows.append(row)
            del records
        bar.close()
    write_results(args, rows, Path(args.out), tuned, interference)
    for row in rows:
        print(f"{row['params']:>9,} params: floor {row['floor_per_s']:>9,.0f}/s  validator "
              f"{row['validator_per_s']:>9,.0f}/s ({row['ratio']:.0%})  "
              f"admission skipped {row['local_per_s']:>9,.0f}/s "
              f"({row['ratio_local']:.0%})  one by one {row['one_by_one_per_s']:>9,.0f}/s "
              f"({row['ratio_one_by_one']:.0%})")
    return 0 if all(row["ratio"] >= 0.5 for row in rows) else 1


def write_results(args, rows: list[dict], out: Path, tuned: bool, interference: tuple[float, float] | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    info = machine()
    command = "python bench/validator.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items() if v is not False)
    lines = [
        "# Validator throughput vs. its floor",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['nproc']} cores, {info['cpu']}; {info['platform']}.",
        f"Versions: Python {info['python']}, numpy {info['numpy']}, cryptography {info['cryptography']}, "
        f"redis-py {info['redis-py']}, {info['redis-server']} (local, loopback).",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}; medians of {args.repeat} runs; "
        f"Batches of {args.batch} records split to at most {args.max_bytes:,} bytes per `validate_batch` call "
        f"(the processors' defaults); glibc malloc {'tuned as in the worker (processors/allocator.py)' if tuned else 'defaults'}.",
        "",
        "| float32 params | record bytes | records | floor (AEAD open + decode) /s | validator /s | **validator / "
        "floor** | admission skipped /s (diagnostic) | skipped / floor | one by one /s | one by one / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['params']:,} | {r['record_bytes']:,} | {r['records']:,} | {r['floor_per_s']:,.0f} | "
                     f"{r['validator_per_s']:,.0f} | **{r['ratio']:.0%}** | {r['local_per_s']:,.0f} | "
                     f"{r['ratio_local']:.0%} | {r['one_by_one_per_s']:,.0f} | {r['ratio_one_by_one']:.0%} |")
    lines += ["", "Target (issue 3): validator >= 50% of the floor at every size: "
              + ", ".join(f"{r['params']:,}: {'met' if r['ratio'] >= 0.5 else 'NOT met'}" for r in rows) + ".", ""]
    if interference:
        idle, busy = interference
        lines += [f"The two vCPUs of this machine slow each other down: the floor at {rows[0]['params']:,} parameters "
                  f"runs at {idle:,.0f}/s with the other vCPU idle and {busy:,.0f}/s ({busy / idle - 1:+.0%}) with a "
                  "process spinning on it. Redis runs on that other vCPU.", ""]
    lines += ["Reading the numbers:", "",
              "* The floor is only ChaCha20-Poly1305 open and an `fgt1` view of the same bytes, into one reused "
              "buffer. The validator also parses and checks the binary header, keeps each batch's plaintexts alive "
              "(it returns them), checks the content (clock, sample count, codec, dtype, shape, finiteness and norm "
              "in one float32 pass) and admits every record in Redis (registry status and key, replay, two token "
              "buckets, version, sequence number: one Lua call per part of a batch, three parts).",
              "* *Admission skipped* is not a validator: it is the validator with every Redis call replaced by an "
              "answer of \"accepted\" (`AcceptAll`), run in the same turns. The gap between it and the floor is "
              "the local work (header, checks, keeping the plaintexts, bookkeeping: Python); the gap between it "
              "and the validator is Redis: the admission script's time on the server (~5-7 us per record, "
              "bench/admission.py; most of it Lua), the client's side of three calls per batch, the wait for the "
              "last part, and the slow-down "
              "of this vCPU while Redis works on the other.",
              "* These per-record costs do not grow with the update: they weigh against a ~15 us AEAD open at 10k "
              "parameters and vanish against the ~130 us / 1.3 ms opens at 100k / 1M.",
              "* One by one (a Redis round trip per record) is what batching saves; the Faust agent always "
              "validates in batches.", "",
              "Per-run ratios: " + "; ".join(f"{r['params']:,}: " + ", ".join(f"{x:.2f}" for x in r["ratios"])
                                            for r in rows) + ".", ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": info, "rows": rows,
                                                    "floor_other_core_idle_busy": interference}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
