"""The ``fedguard`` command line.

    fedguard up                 the embedded stack: broker, Redis, processors, aggregator, device fleet
    fedguard demo               the stack for R rounds with a progress bar, a summary and an accuracy plot
    fedguard devices enroll     key pairs for N devices, public keys into the Redis registry
    fedguard inject KIND        attack traffic on the raw topic of a running pipeline (garbage, tamper, replay)
    fedguard topics             create the topics with explicit partition counts
    fedguard processors|aggregator|fleet   one service (what `up` starts as child processes)

Every setting comes from ``FEDGUARD_*`` variables (see fedguard/settings.py); the common ones are flags too.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

from fedguard.settings import Settings, from_env


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("settings (default: FEDGUARD_* environment variables)")
    g.add_argument("--data-dir", help="where keys, model versions and logs live (default .fedguard)")
    g.add_argument("--task", choices=("fashion-mnist", "digits", "synthetic"))
    g.add_argument("--devices", dest="num_devices", type=int, help="number of simulated devices")
    g.add_argument("--per-round", dest="devices_per_round", type=int, help="devices sampled per round")
    g.add_argument("--alpha", dest="dirichlet_alpha", type=float, help="Dirichlet alpha of the non-IID split")
    g.add_argument("--window-size", type=int, help="window closes at this many updates")
    g.add_argument("--window-deadline", dest="window_deadline_s", type=float, help="... or after this many seconds")
    g.add_argument("--local-epochs", type=int)
    g.add_argument("--local-lr", type=float)
    g.add_argument("--local-batch-size", type=int)
    g.add_argument("--rule", help="aggregation rule: fedavg, norm_clip, coordinate_median, trimmed_mean, krum, "
                   "multi_krum, geometric_median, bulyan, centered_clipping, fltrust, flame, dp_gaussian, "
                   "reputation_weighted")
    g.add_argument("--rule-params", help='JSON object of the rule\'s parameters, e.g. \'{"f": 2}\'')
    g.add_argument("--seed", type=int)
    g.add_argument("--broker-port", type=int)
    g.add_argument("--redis-port", type=int)
    g.add_argument("-v", "--verbose", action="store_true")


_SETTING_ARGS = ("data_dir", "task", "num_devices", "devices_per_round", "dirichlet_alpha", "window_size",
                 "window_deadline_s", "local_epochs", "local_lr", "local_batch_size", "rule", "rule_params", "seed",
                 "broker_port",
                 "redis_port")


def settings_from(args: argparse.Namespace) -> Settings:
    return from_env().with_overrides(**{k: getattr(args, k, None) for k in _SETTING_ARGS})


def _stop_event() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def cmd_up(args: argparse.Namespace) -> int:
    from fedguard.stack import EmbeddedStack

    settings = settings_from(args)
    stack = EmbeddedStack(settings, own_broker=not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
                          own_redis=not os.environ.get("REDIS_URL"))
    stop = _stop_event()
    stack.start()
    print(f"fedguard is up: broker {settings.kafka_bootstrap}, redis {settings.redis_url}, data {settings.data_dir}")
    for name, url in stack.endpoints().items():
        print(f"  metrics {name:<11} {url}")
    print(f"  logs in {stack.log_dir}; Ctrl-C stops everything")
    code = 0
    try:
        while not stop.wait(1.0):
            dead = stack.check_alive()
            if dead:
                print(f"fedguard: {', '.join(dead)} exited; stopping the stack (see {stack.log_dir})", file=sys.stderr)
                code = 1
                break
    finally:
        stack.stop()
    print("fedguard stopped")
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from fedguard.demo import run_demo

    return run_demo(settings_from(args), rounds=args.rounds, plot=args.plot, fresh=not args.resume)


def cmd_enroll(args: argparse.Namespace) -> int:
    from producers.enroll import enroll

    settings = settings_from(args)
    created = enroll(settings, args.count)
    print(f"{args.count} devices enrolled ({len(created)} new); keys in {settings.keystore_path}")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from producers.inject import inject

    sent = inject(settings_from(args), args.kind, args.count)
    print(f"sent {sent} {args.kind} records to the raw topic")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from fedguard.stack import create_topics

    created = create_topics(settings_from(args))
    print("created: " + (", ".join(created) or "(all existed)"))
    return 0


def cmd_processors(args: argparse.Namespace) -> int:
    from processors.worker import run_worker

    run_worker(settings_from(args), web_port=args.web_port, metrics_port=args.metrics_port)
    return 0


def _run_service(service, stop: threading.Event) -> int:
    try:
        service.run(stop)
    finally:
        service.close()
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from aggregator.service import AggregatorService
    from producers.fleet import configure_torch

    configure_torch()
    settings = settings_from(args)
    stop = _stop_event()
    start_http_server(args.metrics_port or settings.aggregator_metrics_port, addr=settings.metrics_host)
    return _run_service(AggregatorService(settings), stop)


def cmd_fleet(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from producers.fleet import Fleet, configure_torch

    configure_torch()
    settings = settings_from(args)
    stop = _stop_event()
    start_http_server(args.metrics_port or settings.fleet_metrics_port, addr=settings.metrics_host)
    return _run_service(Fleet(settings), stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedguard", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run the embedded stack until Ctrl-C")
    _common(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="run the embedded stack for R rounds, print a summary, plot accuracy")
    _common(p)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--plot", default="fedguard-demo.png", help="PNG of accuracy per round")
    p.add_argument("--resume", action="store_true", help="keep earlier model versions instead of starting fresh")
    p.set_defaults(func=cmd_demo)

    devices = sub.add_parser("devices", help="device enrollment")
    dsub = devices.add_subparsers(dest="devices_command", required=True)
    p = dsub.add_parser("enroll", help="key pairs for N devices; public keys into the Redis registry")
    _common(p)
    p.add_argument("--count", type=int, required=True)
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("inject", help="send attack traffic to the raw topic of a running pipeline")
    _common(p)
    p.add_argument("kind", choices=("garbage", "tamper", "replay"))
    p.add_argument("--count", type=int, default=10)
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser("topics", help="create the topics")
    _common(p)
    p.set_defaults(func=cmd_topics)

    for name, func in (("processors", cmd_processors), ("aggregator", cmd_aggregator), ("fleet", cmd_fleet)):
        p = sub.add_parser(name, help=f"run the {name} service")
        _common(p)
        p.add_argument("--metrics-port", type=int)
        if name == "processors":
            p.add_argument("--web-port", type=int, help="Faust's web server port (one per worker)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in ("processors", "aggregator", "fleet"):
        logging.getLogger("fedguard").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
