"""Run many :func:`fedguard.simulation.simulate` configurations on a small process pool, with one progress bar.

Shared by ``bench/detection.py`` and ``bench/defaults.py``. Each worker uses one torch thread (the machine has two
cores shared with other work); the bar counts rounds over every run and its ETA is tqdm's (rate so far).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from fedguard.simulation import SimulationConfig, simulate  # noqa: E402

_progress_queue: Any = None


def _init(q: Any) -> None:
    global _progress_queue
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _progress_queue = q


def _run(index: int, config: SimulationConfig) -> tuple[int, dict[str, Any]]:
    q = _progress_queue
    result = simulate(config, progress=(lambda _record: q.put(1)) if q is not None else None)
    return index, result


def calibrate(config: SimulationConfig, rounds: int = 3) -> tuple[float, float]:
    """(set-up seconds, seconds per round) of ``config`` in this process (one torch thread): a 0-round run (data,
    model, evaluation set: the set-up), then a ``rounds``-round run; per round = (its time - set-up) / rounds.
    A warm-up run first, so that one-off process costs (imports, the data set's parsing) count in neither."""
    import torch

    torch.set_num_threads(1)
    simulate(SimulationConfig(**{**config.__dict__, "rounds": 0}))  # warm-up
    t = time.perf_counter()
    simulate(SimulationConfig(**{**config.__dict__, "rounds": 0}))
    setup = time.perf_counter() - t
    t = time.perf_counter()
    simulate(SimulationConfig(**{**config.__dict__, "rounds": rounds}))
    return setup, max((time.perf_counter() - t - setup) / rounds, 1e-3)


def run_many(configs: list[SimulationConfig], workers: int = 2, desc: str = "rounds") -> list[dict[str, Any]]:
    """Every config's result, in the order given. Longest runs start first."""
    total = sum(c.rounds for c in configs)
    order = sorted(range(len(configs)), key=lambda i: -configs[i].rounds)
    results: list[dict[str, Any] | None] = [None] * len(configs)
    bar = tqdm(total=total, desc=desc, unit="round", smoothing=0.05, dynamic_ncols=True)
    if workers <= 1:
        _init(None)
        for i in order:
            results[i] = simulate(configs[i], progress=lambda _r: bar.update(1))
        bar.close()
        return results  # type: ignore[return-value]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init, initargs=(q,)) as pool:
            futures = [pool.submit(_run, i, configs[i]) for i in order]
            pending = set(futures)
            while pending:
                try:
                    bar.update(q.get(timeout=0.5))
                    while True:
                        bar.update(q.get_nowait())
                except queue.Empty:
                    pass
                for f in [f for f in pending if f.done()]:
                    pending.discard(f)
                    i, res = f.result()
                    results[i] = res
            while True:  # the last rounds' ticks
                try:
                    bar.update(q.get_nowait())
                except queue.Empty:
                    break
    bar.close()
    return results  # type: ignore[return-value]
