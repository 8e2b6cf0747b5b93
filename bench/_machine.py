"""What every benchmark reports about the machine it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def simulation_machine(load_start: tuple[float, ...]) -> dict:
    """The ``machine`` entry of a simulation benchmark's report: CPU, cores, versions, and the load average at the
    start (``load_start``, from :func:`os.getloadavg`) and now."""
    import numpy as np
    import torch

    return {"cpu": cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "load_start": load_start,
            "load_end": tuple(round(x, 2) for x in os.getloadavg())}
