"""Process-wide set-up of the learning runtime, shared by every service that trains or evaluates a model.

It lives in the shared core so a service can call it without importing another service (importing
``producers.fleet`` from the aggregator used to register the fleet's metrics in the aggregator's process).
"""

from __future__ import annotations

import torch


def configure_torch() -> None:
    """One torch thread per process: several services share two cores, and one thread each avoids
    oversubscription."""
    torch.set_num_threads(1)
