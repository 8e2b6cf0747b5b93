"""fedguard: streaming federated learning that does not trust its devices.

Run it:
  fedguard up                  the embedded stack (broker, Redis, Prometheus, services, device fleet) until Ctrl-C
  fedguard demo                the stack for R rounds: progress, summary, accuracy plot (--attack KIND to attack it)
  fedguard watch               a live terminal view of a running stack
Attack it:
  fedguard attack KIND         insider poisoning: compromise a fraction of the enrolled devices (status, stop)
  fedguard inject KIND         channel attacks on the raw topic (garbage, tamper, replay, flood)
See what happened:
  fedguard rejected            dead-letter records: counts by reason code, the last ones with detail
  fedguard events              security events (flags, quarantines, replays, rate limits)
  fedguard reasons             the reason codes and what each means
  fedguard devices show ID     a device's trust and its last windows' verdicts
  fedguard versions            the model lineage with the audit's verdicts
Operate:
  fedguard init                topics, server key, operator credential, device enrollment
  fedguard devices enroll|revoke|rotate|list|quarantine|release
  fedguard rollback --to V     serve version V's parameters again
  fedguard grafana push        upload the dashboards to a Grafana (GRAFANA_URL, GRAFANA_TOKEN)
Measure:
  fedguard eval                the attack x defence matrix, in process: tables, heat maps, curves
Services (what `up` starts):
  fedguard processors|aggregator|fleet|infra

Settings come from FEDGUARD_* variables (fedguard/settings.py); the common ones are flags of the commands that use
them. `fedguard COMMAND --help` shows a command's own flags.
Exit codes: 0 success, 1 failure (e.g. an unknown device, a service not reachable), 2 usage error,
3 operator credential missing or rejected.
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

EXIT_FAILURE = 1
EXIT_UNAUTHORIZED = 3


def _connection(parser: argparse.ArgumentParser) -> None:
    """The flags every command that talks to a stack has: where it lives."""
    g = parser.add_argument_group("stack (default: FEDGUARD_* environment variables)")
    g.add_argument("--data-dir", help="where keys, model versions and logs live (default .fedguard)")
    g.add_argument("--broker-port", type=int, help="the embedded broker's port (default 19092; or set "
                                                   "KAFKA_BOOTSTRAP_SERVERS)")
    g.add_argument("--redis-port", type=int, help="the embedded Redis's port (default 16379; or set REDIS_URL)")
    g.add_argument("-v", "--verbose", action="store_true", help="log more")


def _training(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that train or aggregate: the task, the fleet, the window and the rule."""
    g = parser.add_argument_group("training (default: FEDGUARD_* environment variables)")
    g.add_argument("--task", choices=("fashion-mnist", "digits", "synthetic"), help="data set and model")
    g.add_argument("--devices", dest="num_devices", type=int, help="number of simulated devices")
    g.add_argument("--per-round", dest="devices_per_round", type=int, help="devices sampled per round")
    g.add_argument("--alpha", dest="dirichlet_alpha", type=float, help="Dirichlet alpha of the non-IID split "
                                                                       "(smaller: less alike devices)")
    g.add_argument("--window-size", type=int, help="a window closes at this many updates")
    g.add_argument("--window-deadline", dest="window_deadline_s", type=float,
                   help="... or this many seconds after its first update")
    g.add_argument("--local-epochs", type=int, help="local training epochs per round")
    g.add_argument("--local-lr", type=float, help="local learning rate")
    g.add_argument("--local-batch-size", type=int, help="local batch size")
    g.add_argument("--rule", help="aggregation rule (default robust_lr): fedavg, norm_clip, coordinate_median, "
                   "trimmed_mean, krum, multi_krum, geometric_median, bulyan, centered_clipping, fltrust, flame, "
                   "dp_gaussian, reputation_weighted, robust_lr")
    g.add_argument("--rule-params", help='JSON object of the rule\'s parameters, e.g. \'{"f": 2}\'')
    g.add_argument("--seed", type=int, help="seed of the data split and local training (not of protective "
                                            "randomness, which comes from the OS)")


def _common(parser: argparse.ArgumentParser) -> None:
    _connection(parser)
    _training(parser)


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
                          own_redis=not os.environ.get("REDIS_URL"), say=lambda line: print(line, flush=True),
                          prometheus=not args.no_prometheus)
    stop = _stop_event()
    try:
        stack.start()
    except RuntimeError as exc:  # a missing binary or a taken port: one line with a hint
        print(f"fedguard up: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"fedguard is up: broker {settings.kafka_bootstrap}, redis {settings.redis_url}, data {settings.data_dir}")
    if stack.prometheus_url:
        print(f"  prometheus          {stack.prometheus_url}  (alerts: {stack.prometheus_url}/alerts)")
    for name, url in stack.endpoints().items():
        if name != "prometheus":
            print(f"  metrics {name:<11} {url}")
    from fedguard.operator import TOKEN_ENV, token_path

    print(f"  operator token (fedguard devices enroll|revoke|rotate): "
          f"{'$' + TOKEN_ENV if os.environ.get(TOKEN_ENV) else token_path(settings)}")
    print(f"  logs in {stack.log_dir}; a process that exits is restarted (docs/operations.md); Ctrl-C stops "
          f"everything", flush=True)
    annotator = _start_annotator(settings)
    from fedguard.watch import RoundReporter

    reporter = RoundReporter(settings)  # one status line per new version (`fedguard watch` for the full view)
    try:
        while not stop.wait(1.0):  # only Ctrl-C or SIGTERM ends this loop
            stack.supervise()
            for line in reporter.poll():
                print(line, flush=True)
    finally:
        reporter.close()
        if annotator is not None:
            annotator[1].set()
            annotator[0].join(10)
        stack.stop()
    print("fedguard stopped")
    return 0


def _start_annotator(settings: Settings):
    """Grafana annotations of the pipeline's happenings when GRAFANA_URL is set (docs/grafana.md); a wrong
    credential or URL is one warning line, not a stopped stack."""
    if not os.environ.get("GRAFANA_URL"):
        return None
    from fedguard import annotator
    from fedguard.grafana import GrafanaError

    try:
        started = annotator.start_thread(settings)
    except GrafanaError as exc:
        print(f"fedguard: no Grafana annotations: {exc}", flush=True)
        return None
    print(f"  grafana annotations to {os.environ['GRAFANA_URL']} (attacks, quarantines, rule changes)", flush=True)
    return started


def cmd_demo(args: argparse.Namespace) -> int:
    import json

    from fedguard.demo import AttackPlan, run_demo

    attack = None
    if args.attack and args.attack != "none":
        try:
            params = json.loads(args.attack_params) if args.attack_params else {}
        except json.JSONDecodeError as exc:
            print(f"fedguard demo: --attack-params is not JSON ({exc}); e.g. '{{\"target\": 0}}'", file=sys.stderr)
            return 2
        attack = AttackPlan(args.attack, args.fraction, start_round=args.attack_start, rounds=args.attack_rounds,
                            params=params)
    return run_demo(settings_from(args), rounds=args.rounds, plot=args.plot, fresh=not args.resume, attack=attack,
                    monitor=args.monitor)


def _operator_call(fn):
    """Run an operator command: a missing or wrong credential exits 3, an unknown device exits 1."""
    from fedguard.operator import OperatorAuthError

    try:
        return fn()
    except OperatorAuthError as exc:
        print(f"fedguard: {exc}", file=sys.stderr)
        return EXIT_UNAUTHORIZED
    except (KeyError, ValueError) as exc:
        print(f"fedguard: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_FAILURE


def cmd_init(args: argparse.Namespace) -> int:
    from fedguard.operator import token_path
    from fedguard.stack import initialize

    settings = settings_from(args)

    def run() -> int:
        done = initialize(settings, enroll_devices=not args.no_enroll)
        print(f"topics created: {', '.join(done['topics_created']) or '(all existed)'}")
        print(f"server public key published to Redis; operator credential ready "
              f"(token: $FEDGUARD_OPERATOR_TOKEN or {token_path(settings)})")
        if done["version_restored"] is not None:
            print(f"model version key restored from the model store: {done['version_restored']}")
        if not args.no_enroll:
            print(f"{settings.num_devices} devices enrolled ({len(done['devices_new'])} new; revoked devices stay "
                  f"revoked, enrolled devices keep their registry keys)")
        return 0

    return _operator_call(run)


def cmd_enroll(args: argparse.Namespace) -> int:
    from producers.enroll import enroll

    settings = settings_from(args)

    def run() -> int:
        created = enroll(settings, args.count)
        print(f"{args.count} devices enrolled ({len(created)} new); keys in {settings.keystore_path}")
        return 0

    return _operator_call(run)


def cmd_revoke(args: argparse.Namespace) -> int:
    from producers.enroll import revoke

    settings = settings_from(args)

    def run() -> int:
        entry = revoke(settings, args.device_id, reason=args.reason)
        print(f"{args.device_id} revoked ({entry.get('status_reason') or 'no reason given'}); its updates are "
              f"now rejected with reason code 'revoked'")
        return 0

    return _operator_call(run)


def cmd_show(args: argparse.Namespace) -> int:
    import json

    from fedguard import registry
    from processors.defence import device_report

    settings = settings_from(args)
    try:
        report = device_report(registry.connect(settings), settings, args.device_id, last=args.last)
    except KeyError as exc:
        print(f"fedguard: {exc.args[0]}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    rep = report["reputation"]
    print(f"{report['device_id']}: {report['status']}"
          f"{' (' + report['status_reason'] + ')' if report['status_reason'] else ''}, key {report['fingerprint']}")
    print(f"  trust {report['trust']:.3f} (beta reputation: positive evidence {rep['r']:.2f}, negative "
          f"{rep['s']:.2f}; {rep['windows']} windows, {rep['strikes']} flagged in a row, quarantined "
          f"{rep['quarantines']} times{', on probation' if rep['probation'] else ''})")
    if not report["history"]:
        print("  no window has judged this device yet")
    for h in report["history"]:
        why = "; ".join(h["reasons"]) or "-"
        print(f"  {time.strftime('%H:%M:%S', time.localtime(h['at']))} window {h['window_id']:<24} "
              f"{h['verdict']:<10} weight {h['weight']:.2f} trust {h['trust']:.3f}  {why}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    from fedguard import operator, registry
    from processors.defence import operator_quarantine

    settings = settings_from(args)

    def run() -> int:
        client = registry.connect(settings)
        operator.verify(client, settings)
        operator_quarantine(client, settings, args.device_id, args.reason)
        print(f"{args.device_id} quarantined: its updates are rejected with reason code 'quarantined' until "
              f"`fedguard devices release {args.device_id}`")
        return 0

    return _operator_call(run)


def cmd_release(args: argparse.Namespace) -> int:
    from fedguard import operator, registry
    from processors.defence import operator_release

    settings = settings_from(args)

    def run() -> int:
        client = registry.connect(settings)
        operator.verify(client, settings)
        trust = operator_release(client, settings, args.device_id)
        print(f"{args.device_id} released on probation (trust {trust:.3f}: its next updates are down-weighted, "
              f"and one rejection quarantines it again)")
        return 0

    return _operator_call(run)


def cmd_rotate(args: argparse.Namespace) -> int:
    from producers.enroll import rotate

    settings = settings_from(args)

    def run() -> int:
        r = rotate(settings, args.device_id, public_key_hex=args.public_key)
        where = f"new private key in {settings.keystore_path}" if r.in_keystore else "public key from the device"
        print(f"{r.device_id} key rotated: {r.old_fingerprint} -> {r.new_fingerprint} ({where}); updates sealed "
              f"with the old key are now rejected with reason code 'auth_failed'")
        return 0

    return _operator_call(run)


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from producers.enroll import list_devices

    rows = list_devices(settings_from(args))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'device':<16} {'status':<12} {'key fingerprint':<24} {'key v':>5}  {'enrolled':<19}  last seq")
    for row in rows:
        enrolled = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(row.get("enrolled_at") or 0)))
        status = row.get("status", "?")
        if row.get("status_reason"):
            status += "*"
        print(f"{row['device_id']:<16} {status:<12} {row['fingerprint']:<24} {row.get('key_version', '1'):>5}  "
              f"{enrolled:<19}  {row['last_seq']}")
    counts = {}
    for row in rows:
        counts[row.get("status", "?")] = counts.get(row.get("status", "?"), 0) + 1
    print(f"{len(rows)} devices: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def summarize_rejected(records_: list[dict], last: int) -> str:
    """The text ``fedguard rejected`` prints: counts by reason code, then the last records with their detail."""
    from collections import Counter

    from fedguard.reasons import Reason

    counts = Counter(r.get("reason") for r in records_)
    lines = [f"{len(records_)} rejected records"]
    if counts:
        lines.append(f"  {'reason':<20} {'count':>8}  meaning")
        for reason, n in counts.most_common():
            try:
                meaning = Reason(reason).meaning
            except ValueError:
                meaning = "(not a code of this version)"
            lines.append(f"  {str(reason):<20} {n:>8}  {meaning[:70]}")
    shown = sorted(records_, key=lambda r: r.get("rejected_at", 0))[-last:] if last > 0 else []
    if shown:
        lines.append(f"last {len(shown)}:")
        for r in shown:
            at = time.strftime("%H:%M:%S", time.localtime(r.get("rejected_at", 0)))
            raw = r.get("raw") or {}
            device = (r.get("device_id") or "-") + ("" if r.get("authenticated") else "?")
            lines.append(f"  {at}  {raw.get('partition', '?')}:{raw.get('offset', '?'):<8} {device:<18} "
                         f"{r.get('reason', '?'):<18} {r.get('detail', '')}")
    return "\n".join(lines)


def cmd_rejected(args: argparse.Namespace) -> int:
    import json

    from fedguard import records

    from fedguard.reasons import Reason

    if args.reason and args.reason not in {r.value for r in Reason}:
        print(f"fedguard: unknown reason code {args.reason!r}; `fedguard reasons` lists them", file=sys.stderr)
        return 2
    settings = settings_from(args)
    from fedguard.topicio import read_until_idle

    messages = read_until_idle(settings, settings.topics.rejected, args.idle, client_id="fedguard-cli")
    rows = [records.loads(m.value) for m in messages]
    if args.reason:
        rows = [r for r in rows if r.get("reason") == args.reason]
    if args.json:
        print(json.dumps(rows[-args.last:] if args.last else rows, indent=1))
        return 0
    print(f"{settings.topics.rejected}: ", end="")
    print(summarize_rejected(rows, args.last))
    print("(device ids with ? are claimed, not authenticated)")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from fedguard import records

    settings = settings_from(args)
    from fedguard.topicio import read_until_idle

    messages = read_until_idle(settings, settings.topics.events, args.idle, client_id="fedguard-cli")
    rows = sorted((records.loads(m.value) for m in messages), key=lambda r: r.get("at", 0))
    print(f"{settings.topics.events}: {len(rows)} security events")
    for r in rows[-args.last:] if args.last > 0 else []:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("at", 0)))
        print(f"  {at}  {r.get('type', '?'):<16} {r.get('device_id') or '-':<16} {r.get('detail', '')}")
    return 0


def cmd_reasons(args: argparse.Namespace) -> int:
    from fedguard.reasons import Reason, markdown_table

    if args.markdown:
        print(markdown_table(), end="")
        return 0
    for reason in Reason:
        print(f"{reason.value:<20} {reason.stage:<10} {reason.meaning}")
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from producers.inject import inject

    sent = inject(settings_from(args), args.kind, args.count, device_id=args.device)
    print(f"sent {sent} {args.kind} records to the raw topic")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import json

    from fedguard import registry
    from producers import campaign

    settings = settings_from(args)
    client = registry.connect(settings)
    if args.kind == "stop":
        stopped = campaign.stop(client, settings)
        print("no campaign is running" if stopped is None else
              f"campaign {stopped.id} ({stopped.kind}) stopped; the fleet trains honestly from the next round")
        return 0
    if args.kind == "status":
        running = campaign.load(client, settings)
        if running is None:
            print("no campaign (start one with: fedguard attack KIND --fraction F)")
            return 0
        sent = campaign.ledger(client, settings)
        mine = [e for e in sent if e.get("campaign") == running.id]
        state = "stopped" if running.stopped_at else "running"
        print(f"campaign {running.id}: {running.kind} ({state}), {len(running.devices)} compromised devices "
              f"({running.fraction:g} of the fleet), from version {running.start_version}, fired in "
              f"{campaign.fired(client, settings, running)}"
              f"{'' if running.rounds is None else f'/{running.rounds}'} rounds, {len(mine)} malicious updates sent")
        print(f"  params {json.dumps(running.params)}")
        print(f"  devices {', '.join(running.devices)}")
        return 0
    try:
        params = json.loads(args.params) if args.params else {}
        if not isinstance(params, dict):
            raise ValueError("--params must be a JSON object")
        started = campaign.start(client, settings, args.kind, args.fraction, params=params,
                                 start_version=args.start_round, rounds=args.rounds,
                                 devices=args.compromise.split(",") if args.compromise else None)
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"fedguard attack: {exc} (fedguard attack --help lists the kinds)", file=sys.stderr)
        return 2
    print(f"campaign {started.id}: {started.kind} on {len(started.devices)} compromised devices from version "
          f"{started.start_version}{'' if started.rounds is None else f' for {started.rounds} round(s)'}; "
          f"`fedguard attack status` to follow, `fedguard attack stop` to end it")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    import json

    from fedguard import lineage
    from fedguard.modelstore import ModelStore

    settings = settings_from(args)
    rows = lineage.lineage(ModelStore(settings.models_dir), last=args.last)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no model versions in {settings.models_dir}; start the pipeline first (fedguard up)")
        return 0
    print("\n".join(lineage.format_lineage(rows)))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from fedguard import lineage, registry
    from fedguard.modelstore import ModelStore

    settings = settings_from(args)

    def run() -> int:
        request = lineage.request_rollback(registry.connect(settings), settings, ModelStore(settings.models_dir),
                                           args.to, args.reason or "")
        print(f"rollback requested: the aggregator publishes version {request['from'] + 1} with the parameters of "
              f"version {args.to} before its next window (`fedguard versions` shows it)")
        return 0

    return _operator_call(run)  # a missing credential exits 3; an unknown or pruned version is one line, exit 1


def cmd_watch(args: argparse.Namespace) -> int:
    from fedguard.watch import metrics_endpoints, run_watch

    settings = settings_from(args)
    try:
        endpoints = metrics_endpoints(settings, args.metrics or "")
    except ValueError as exc:
        print(f"fedguard watch: {exc} (e.g. --metrics processors=http://processors:19464/metrics)", file=sys.stderr)
        return 2
    run_watch(settings, _stop_event(), interval_s=max(0.2, args.interval), once=args.once, endpoints=endpoints)
    return 0


def cmd_infra(args: argparse.Namespace) -> int:
    from fedguard.infra_metrics import main as infra_main

    return infra_main(["--port", str(args.metrics_port)] if args.metrics_port else [])


def cmd_grafana_push(args: argparse.Namespace) -> int:
    from fedguard import grafana

    client = grafana.connect(args.url)  # None: GRAFANA_URL with GRAFANA_TOKEN or GRAFANA_USER/GRAFANA_PASSWORD
    pushed = grafana.push_dashboards(client, args.dir or grafana.DASHBOARDS_DIR, folder=args.folder,
                                     datasource_uid=args.datasource_uid)
    for title, _uid, url in pushed:
        print(f"{title:<32} {url}")
    print(f"{len(pushed)} dashboards pushed to folder {args.folder!r}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from fedguard.stack import create_topics

    created = create_topics(settings_from(args))
    print("created: " + (", ".join(created) or "(all existed)"))
    return 0


def cmd_processors(args: argparse.Namespace) -> int:
    from processors.worker import run_worker, run_workers

    settings = settings_from(args)
    count = settings.processors_workers if args.workers is None else args.workers
    if count < 1:
        print(f"fedguard processors: --workers must be at least 1, got {count} (e.g. --workers 2; "
              f"FEDGUARD_PROCESSORS_WORKERS sets the default)", file=sys.stderr)
        return 2
    if count > 1:  # a parent process that runs and restarts `count` single workers
        return run_workers(settings, count, web_port=args.web_port, metrics_port=args.metrics_port)
    run_worker(settings, web_port=args.web_port, metrics_port=args.metrics_port)
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
    from fedguard.tasks import configure_torch

    configure_torch()
    settings = settings_from(args)
    stop = _stop_event()
    start_http_server(args.metrics_port or settings.aggregator_metrics_port, addr=settings.metrics_host)
    return _run_service(AggregatorService(settings), stop)


def cmd_fleet(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from fedguard.tasks import configure_torch
    from producers.fleet import Fleet

    configure_torch()
    settings = settings_from(args)
    stop = _stop_event()
    start_http_server(args.metrics_port or settings.fleet_metrics_port, addr=settings.metrics_host)
    return _run_service(Fleet(settings), stop)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedguard")
    except PackageNotFoundError:  # (run from a source tree that was never installed)
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedguard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedguard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    p = sub.add_parser("up", help="run the embedded stack until Ctrl-C")
    _common(p)
    p.add_argument("--no-prometheus", action="store_true", help="do not start the embedded Prometheus (which "
                   "scrapes every service with monitoring/alerts.yml on 127.0.0.1:FEDGUARD_PROMETHEUS_PORT)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="run the embedded stack for R rounds, print a summary, plot accuracy")
    _common(p)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--plot", default="fedguard-demo.png", help="PNG of accuracy per round")
    p.add_argument("--resume", action="store_true", help="keep earlier model versions instead of starting fresh")
    p.add_argument("--monitor", action="store_true", help="also start Prometheus (with monitoring/alerts.yml) and "
                   "the infrastructure exporter, and print Prometheus's URL")
    from producers.attacks import ATTACKS

    p.add_argument("--attack", choices=(*ATTACKS, "none"), help="run an insider poisoning campaign during the demo "
                   "('none': no attack)")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the fleet compromised (default 0.2)")
    p.add_argument("--attack-start", type=int, default=5, help="first attacked round (default 5)")
    p.add_argument("--attack-rounds", type=int, help="rounds in which the attack fires (default: every round; "
                                                     "model_replacement: 1)")
    p.add_argument("--attack-params", help="JSON object of the attack's parameters (docs/attacks.md)")
    p.set_defaults(func=cmd_demo)

    devices = sub.add_parser("devices", help="device enrollment, revocation, key rotation (operator credential: "
                                             "$FEDGUARD_OPERATOR_TOKEN or <data dir>/operator.token)")
    dsub = devices.add_subparsers(dest="devices_command", required=True)
    p = dsub.add_parser("enroll", help="key pairs for N devices; public keys into the Redis registry")
    _connection(p)
    p.add_argument("--count", type=int, required=True)
    p.set_defaults(func=cmd_enroll)
    p = dsub.add_parser("revoke", help="revoke a device: its updates are rejected 'revoked' from now on")
    _connection(p)
    p.add_argument("device_id")
    p.add_argument("--reason", default="", help="why (kept in the registry and the audit list)")
    p.set_defaults(func=cmd_revoke)
    p = dsub.add_parser("rotate", help="give a device a new key pair (or the public key it made itself)")
    _connection(p)
    p.add_argument("device_id")
    p.add_argument("--public-key", help="hex X25519 public key generated on the device; default: a new pair in "
                                        "the key store")
    p.set_defaults(func=cmd_rotate)
    p = dsub.add_parser("show", help="why a device is trusted or not: reputation and its last windows' verdicts")
    _connection(p)
    p.add_argument("device_id")
    p.add_argument("--last", type=int, default=10, help="how many of its last windows to show")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_show)
    p = dsub.add_parser("quarantine", help="quarantine a device by hand (its updates are rejected 'quarantined')")
    _connection(p)
    p.add_argument("device_id")
    p.add_argument("--reason", default="", help="why (kept in the registry and the audit list)")
    p.set_defaults(func=cmd_quarantine)
    p = dsub.add_parser("release", help="release a quarantined device on probation")
    _connection(p)
    p.add_argument("device_id")
    p.set_defaults(func=cmd_release)
    p = dsub.add_parser("list", help="enrolled devices: status, key fingerprint, last sequence number")
    _connection(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inject", help="send channel attack traffic to the raw topic of a running pipeline",
                       description="Channel attacks on the raw topic; the validator rejects each record with a reason code "
                       "(`fedguard rejected` shows them) while honest traffic keeps flowing. Kinds: garbage: COUNT "
                       "records of random bytes; tamper: COUNT real updates captured from the raw topic with one "
                       "ciphertext bit flipped; replay: COUNT real updates captured from the raw topic, sent again "
                       "unchanged; flood: one enrolled device (--device) sends COUNT authentic updates as fast as "
                       "it can (rate_limited past its token bucket, window_duplicate past one per window). "
                       "Poisoned updates from enrolled devices: `fedguard attack`.")
    _connection(p)
    p.add_argument("--task", choices=("fashion-mnist", "digits", "synthetic"), help="the model whose size "
                   "flood updates have")
    p.add_argument("kind", choices=("garbage", "tamper", "replay", "flood"), help="garbage, tamper, replay or flood")
    p.add_argument("--count", type=int, default=10, help="how many records to send (default 10)")
    p.add_argument("--device", default="dev-0000", help="flood: the enrolled device that floods (its key from the "
                   "fleet's key store; default dev-0000)")
    p.set_defaults(func=cmd_inject)

    from producers.attacks import ATTACKS

    p = sub.add_parser("attack", help="compromise enrolled devices of a running stack with a poisoning attack",
                       description="Insider poisoning: a fraction of the enrolled devices keep their valid keys and "
                       "send poisoned updates from the next round on. Kinds: " +
                       "; ".join(f"{name}: {spec.summary}" for name, spec in ATTACKS.items()) +
                       ". 'status' shows the running campaign, 'stop' ends it.")
    _connection(p)
    p.add_argument("--devices", dest="num_devices", type=int, help="size of the fleet the fraction is taken of (default: FEDGUARD_NUM_DEVICES)")
    p.add_argument("kind", choices=(*ATTACKS, "status", "stop"), metavar="KIND|status|stop")
    p.add_argument("--fraction", type=float, default=0.2, help="share of the fleet compromised (default 0.2)")
    p.add_argument("--start-round", type=int, help="first base version attacked (default: the next round)")
    p.add_argument("--rounds", type=int, help="rounds in which the attack fires (default: every round; "
                                              "model_replacement: 1)")
    p.add_argument("--params", help="JSON object of the attack's parameters (docs/attacks.md)")
    p.add_argument("--compromise", metavar="IDS", help="comma-separated device ids to compromise instead of a "
                                                        "random --fraction")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("init", help="one-shot set-up: topics, server key, operator credential, enrollment")
    _common(p)
    p.add_argument("--no-enroll", action="store_true", help="do not enroll the fleet's devices")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("rejected", help="dead-letter records: counts by reason code, the last ones with detail")
    _connection(p)
    p.add_argument("--last", type=int, default=10, help="how many of the latest records to print")
    p.add_argument("--reason", help="only this reason code")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--idle", type=float, default=1.5, help="stop reading after this many seconds without news")
    p.set_defaults(func=cmd_rejected)

    p = sub.add_parser("events", help="security events on fl.events (rate limits, ingress bound, replays)")
    _connection(p)
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--idle", type=float, default=1.5)
    p.set_defaults(func=cmd_events)

    from fedguard.evaluation_matrix import add_eval_parser  # fedguard eval: the attack x defence matrix
    add_eval_parser(sub, _common)
    p = sub.add_parser("reasons", help="the reason codes of rejected records and what each means")
    p.add_argument("--markdown", action="store_true", help="the table of docs/reason-codes.md")
    p.set_defaults(func=cmd_reasons)

    p = sub.add_parser("versions", help="the model lineage: each version's parent, window, rule, accuracy and audit",
                       description="Each version with its parent, window, rule, main and backdoor accuracy and the "
                       "audit's verdict (clean, flagged: not served, skipped), and where its parameters came from "
                       "(a flagged candidate, a failed window or a rollback carries earlier parameters).")
    _connection(p)
    p.add_argument("--last", type=int, default=20, help="how many of the latest versions (default 20)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("rollback", help="serve an earlier version's parameters again (operator credential)",
                       description="Asks the aggregator (the only writer of versions) to publish the next version "
                       "with the parameters of version TO, so the chain stays gapless; it does so before its next "
                       "window. TO must still have its weights (retention keeps the last 50 and every 100th).")
    _connection(p)
    p.add_argument("--to", type=int, required=True, metavar="VERSION", help="the version whose parameters to serve")
    p.add_argument("--reason", default="", help="why (kept in the version's metadata)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("watch", help="a live terminal view of a running stack (embedded or compose)",
                       description="Versions with main and backdoor accuracy (sparklines), the active attack, "
                       "rejections by reason, detector flags, trust and quarantines, and which sources are down. "
                       "Reads fl.models, Redis and the services' metrics endpoints; Ctrl-C ends it.")
    _connection(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit (scripts)")
    p.add_argument("--metrics", help="metrics URLs as NAME=URL,... (NAME: processors, aggregator, fleet; a name "
                   "given twice: two URLs); default: 127.0.0.1 and the FEDGUARD_*_METRICS_PORT ports")
    p.set_defaults(func=cmd_watch)

    from fedguard import grafana as grafana_defaults

    grafana_p = sub.add_parser("grafana", help="Grafana from Python: upload the dashboards to a running Grafana",
                               description="Talks to an existing Grafana (GRAFANA_URL; credential GRAFANA_TOKEN, a "
                               "service account token, or GRAFANA_USER and GRAFANA_PASSWORD). `fedguard up` also "
                               "annotates the dashboards (attack started or stopped, device quarantined or released, "
                               "rule changed) when GRAFANA_URL is set. docs/grafana.md.")
    gsub = grafana_p.add_subparsers(dest="grafana_command", required=True, metavar="push")
    p = gsub.add_parser("push", help="upload monitoring/grafana/dashboards into a folder of the Grafana")
    p.add_argument("--url", help="Grafana's root URL (default: $GRAFANA_URL)")
    p.add_argument("--folder", default=grafana_defaults.DEFAULT_FOLDER, help="folder to create or reuse "
                   f"(default {grafana_defaults.DEFAULT_FOLDER!r})")
    p.add_argument("--datasource-uid", default=grafana_defaults.PROVISIONED_DATASOURCE_UID,
                   help="uid of that Grafana's Prometheus data source the panels will query "
                        f"(default {grafana_defaults.PROVISIONED_DATASOURCE_UID!r}, the one compose provisions)")
    p.add_argument("--dir", help="directory of dashboard JSON files (default: the repository's)")
    p.set_defaults(func=cmd_grafana_push)

    p = sub.add_parser("infra", help="run the infrastructure exporter: broker, Redis and model-store metrics",
                       description="Prometheus metrics of what the services run on: broker up (and the embedded "
                       "broker's memory), Redis health, memory and persistence, model-store size and free disk. "
                       "`fedguard up` runs it; compose runs it as the infra service.")
    _connection(p)
    p.add_argument("--metrics-port", type=int, help="default: FEDGUARD_INFRA_METRICS_PORT (19467)")
    p.set_defaults(func=cmd_infra)

    p = sub.add_parser("topics", help="create the topics")
    _connection(p)
    p.set_defaults(func=cmd_topics)

    for name, func in (("processors", cmd_processors), ("aggregator", cmd_aggregator), ("fleet", cmd_fleet)):
        p = sub.add_parser(name, help=f"run the {name} service")
        _common(p)
        p.add_argument("--metrics-port", type=int)
        if name == "processors":
            p.add_argument("--web-port", type=int, help="Faust's web server port (one per worker)")
            p.add_argument("--workers", type=int, help="Faust worker processes sharing the partitions (default 1, "
                           "or FEDGUARD_PROCESSORS_WORKERS); worker i listens on --web-port + i and --metrics-port + "
                           "i, skipping the other services' ports")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command in ("processors", "aggregator", "fleet"):
        logging.getLogger("fedguard").setLevel(logging.INFO)
    else:  # one-shot commands: the Kafka client's own reconnect logging would bury the one-line error below
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # an operational error a user can fix: one line with a hint, not a traceback
        message = explain(exc, args)
        if message is None:
            raise
        print(f"fedguard: {message}", file=sys.stderr)
        return EXIT_FAILURE


def explain(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line for the errors a user can act on (a service not reachable, a bad setting); None for bugs."""
    import kafka.errors as kafka_errors
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from aggregator.rules import RuleConfigError

    try:
        settings = settings_from(args)
    except ValueError as bad:
        return f"{bad} (check the FEDGUARD_* variables and flags; fedguard {args.command} --help)"
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        return (f"cannot reach Redis at {settings.redis_url}; start the stack with `fedguard up`, or point "
                f"REDIS_URL at a running Redis")
    # (the class names differ between kafka-python versions)
    unreachable = tuple(getattr(kafka_errors, name) for name in ("NoBrokersAvailable", "KafkaConnectionError")
                        if hasattr(kafka_errors, name))
    if isinstance(exc, unreachable) or (
            isinstance(exc, kafka_errors.KafkaTimeoutError) and "bootstrap" in str(exc).lower()):
        return (f"cannot reach the Kafka broker at {settings.kafka_bootstrap}; start the stack with `fedguard up`, "
                f"or point KAFKA_BOOTSTRAP_SERVERS at a running Kafka")
    from fedguard.grafana import GrafanaError

    if isinstance(exc, GrafanaError):  # (already one line with a hint)
        return str(exc)
    if isinstance(exc, RuleConfigError):
        return f"{exc} (set it with --rule / FEDGUARD_RULE and --rule-params / FEDGUARD_RULE_PARAMS)"
    return None


if __name__ == "__main__":
    sys.exit(main())
