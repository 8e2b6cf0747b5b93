"""Entry point of one processors worker: metrics endpoint plus the Faust worker."""

from __future__ import annotations

import faust
from prometheus_client import start_http_server

from fedguard.settings import Settings
from processors.allocator import keep_freed_memory
from processors.app import create_app


def run_worker(settings: Settings, *, web_port: int | None = None, metrics_port: int | None = None,
               loglevel: str = "warning") -> None:
    keep_freed_memory()  # see processors/allocator.py: plaintext buffers are reused instead of page-faulted again
    start_http_server(metrics_port or settings.processors_metrics_port, addr=settings.metrics_host)
    app = create_app(settings, web_port=web_port)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()
