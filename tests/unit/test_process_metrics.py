"""Metrics belong to their process (issue 13, item 5).

Each service process serves prometheus_client's default registry. A module of another service imported into it
registers that service's metric families there, and they are exported at 0 beside the real ones: the aggregator
used to export every ``fedguard_fleet_*`` family because ``fedguard aggregator`` imported ``producers.fleet`` to
configure torch. Each check runs in a fresh interpreter, so what this test session imported does not count.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_FAMILIES = """
import json
from prometheus_client import REGISTRY
print(json.dumps(sorted({family.name for family in REGISTRY.collect()})))
"""


def families_after(code: str) -> list[str]:
    """Metric family names in the default registry of a fresh interpreter after running ``code``."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code) + _FAMILIES], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_aggregator_service_module_registers_no_fleet_metrics():
    families = families_after("import aggregator.service\n")
    assert "fedguard_model_version" in families  # the aggregator's own are there
    assert not [name for name in families if name.startswith("fedguard_fleet_")]


def test_the_aggregator_command_registers_no_fleet_metrics():
    """What ``fedguard aggregator`` imports before it serves its registry (the service and the HTTP server are
    stubbed: only the imports and the set-up of the command run)."""
    families = families_after("""
        from unittest import mock

        import aggregator.service
        import fedguard.cli as cli

        with mock.patch.object(aggregator.service, "AggregatorService"), \\
                mock.patch("prometheus_client.start_http_server"), \\
                mock.patch.object(cli, "_run_service", return_value=0) as run:
            assert cli.main(["aggregator"]) == 0
            assert run.called
    """)
    assert "fedguard_model_version" in families
    fleet = [name for name in families if name.startswith("fedguard_fleet_")]
    assert not fleet, f"the aggregator process exports the fleet's metrics: {fleet}"


def test_torch_is_configured_from_the_shared_core():
    """``configure_torch`` lives in the core (fedguard.tasks), so a service needs no other service to call it."""
    out = families_after("""
        import sys

        import torch
        from fedguard.tasks import configure_torch

        configure_torch()
        assert torch.get_num_threads() == 1
        assert not [m for m in sys.modules if m.split(".")[0] in ("producers", "processors", "aggregator")]
    """)
    assert not [name for name in out if name.startswith("fedguard_")]
