"""Run many :func:`fedguard.simulation.simulate` configurations on a small process pool, with one progress bar.

Shared by ``bench/detection.py`` and ``bench/defaults.py``; the pool itself lives in :mod:`fedguard.evaluation_matrix`
(``fedguard eval`` uses it too). Each worker uses one torch thread (the machine has two cores shared with other
work); the bar counts rounds over every run and its ETA is tqdm's (rate so far).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedguard.evaluation_matrix import calibrate, run_many  # noqa: E402,F401

__all__ = ["calibrate", "run_many"]
