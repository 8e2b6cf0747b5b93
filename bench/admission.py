"""Server time of the admission script per record (issue 3, item 7: where the validator's Redis cost goes).

Runs ``processors.admission.ADMIT_LUA`` on a real ``redis-server`` (started on a free loopback port, stopped at the end)
for calls of ``--records`` records from as many different devices, every record accepted, and reports Redis' own
time for the script (``INFO commandstats``, so no client or network time) per record, together with the same script
cut short after each of its stages: parsing the records, the two ``MGET`` reads, decoding the devices' state, the
per-record decisions, and the ``MSET`` write. The stages' differences say what each costs.

    python bench/admission.py --out bench/results/admission.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedguard import registry  # noqa: E402
from fedguard.settings import Settings  # noqa: E402
from fedguard.stack import temporary_redis  # noqa: E402
from processors import admission  # noqa: E402
from _machine import cpu_model  # bench/ is on sys.path when a bench script runs

# (label, the first line of ADMIT_LUA that the cut-short script no longer runs)
STAGES = [("parse the records", "-- the devices:"), ("+ MGET registry entries and state", "local sseqs, sseq"),
          ("+ decode the devices' state", "local out = {}"), ("+ the decisions", "local writes = {}"),
          ("+ MSET the state (the whole script)", None)]


def cut_after(stage_end: str | None) -> str:
    if stage_end is None:
        return admission.ADMIT_LUA
    return admission.ADMIT_LUA[:admission.ADMIT_LUA.index(stage_end)] + "return ''\n"


def measure(client: redis.Redis, settings: Settings, records: int, calls: int, repeat: int) -> list[tuple[str, float]]:
    public_hex = "ab" * 32
    for i in range(records):
        registry.register_device(client, settings, f"dev-{i:05d}", public_hex)
    client.set(registry.model_version_key(settings), 0)
    scripts = [(label, client.register_script(cut_after(end))) for label, end in STAGES]
    seq = 0
    results: dict[str, list[float]] = {label: [] for label, _ in STAGES}
    for _ in range(repeat):
        for label, script in scripts:  # stages take turns, so they see the machine in the same state
            client.config_resetstat()
            for _ in range(calls):
                seq += 1
                lines = [admission.admission_record(f"dev-{i:05d}", public_hex, seq, f"u{seq}x{i}@0:{seq}", None, 0)
                         for i in range(records)]
                reply = script(args=admission.admit_args(settings, lines))
                if label.startswith("+ MSET") and set(admission.reply_lines(reply)) != {admission.ACCEPTED}:
                    raise RuntimeError(f"records not accepted: {reply[:200]}")
            stats = client.info("commandstats")["cmdstat_evalsha"]
            results[label].append(stats["usec"] / stats["calls"] / records)
    return [(label, statistics.median(results[label])) for label, _ in STAGES]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=128, help="records (and devices) per call")
    parser.add_argument("--calls", type=int, default=100, help="calls per stage per run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="bench/results/admission.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedguard-bench-redis-") as workdir, temporary_redis(workdir) as redis_url:
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        settings = Settings(redis_prefix="bench", model_id="bench", rate_device_capacity=1e12,
                            rate_global_capacity=1e12, one_update_per_window=False)  # many per device
        rows = measure(client, settings, args.records, args.calls, args.repeat)
        server = client.info("server")["redis_version"]
    command = (f"python bench/admission.py --records {args.records} --calls {args.calls} --repeat {args.repeat} "
               f"--out {args.out}")
    lines = ["# Admission script: Redis server time per record", "", f"Command: `{command}`", "",
             f"Machine: {cpu_model()}; Redis {server} (local, loopback). Generated {time.strftime('%Y-%m-%d %H:%M')}; "
             f"medians of {args.repeat} runs of {args.calls} calls of {args.records} records from as many devices, "
             "every record accepted.", "",
             "| the script up to | us per record (server time) | this stage |", "|---|---:|---:|"]
    previous = 0.0
    for label, us in rows:
        lines.append(f"| {label} | {us:.2f} | {us - previous:+.2f} |")
        previous = us
    lines += ["", "Server time from `INFO commandstats` (no client or network time). The stages are the script cut "
              "short: their differences are what each stage costs, to within the run-to-run spread.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
