"""Entry point of one processors worker: metrics endpoint plus the Faust worker."""

from __future__ import annotations

import logging

import faust
from prometheus_client import start_http_server

from fedguard.settings import Settings
from processors.allocator import keep_freed_memory
from processors.app import create_app

log = logging.getLogger("fedguard.processors")


def run_worker(settings: Settings, *, web_port: int | None = None, metrics_port: int | None = None,
               loglevel: str = "warning") -> None:
    keep_freed_memory()  # see processors/allocator.py: plaintext buffers are reused instead of page-faulted again
    start_http_server(metrics_port or settings.processors_metrics_port, addr=settings.metrics_host)
    app = create_app(settings, web_port=web_port)
    log.info("processors worker starting: %s -> %s / %s, metrics on port %d", settings.topics.raw,
             settings.topics.valid, settings.topics.rejected, metrics_port or settings.processors_metrics_port)
    worker = faust.Worker(app, loglevel=loglevel)
    if not wants_spinner(worker.stdout):
        worker.spinner = None  # its frames and cursor codes would fill a log file (`up` writes logs/processors.log)
    worker.execute_from_commandline()


def wants_spinner(stream) -> bool:
    """Faust draws a progress spinner on its stdout; only a terminal should get one."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
