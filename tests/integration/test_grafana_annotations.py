"""The annotator (fedguard/annotator.py) against the real embedded broker, a real Redis and a fake Grafana.

No Grafana server can be installed on these machines, so this checks the client side against Grafana's documented
HTTP API: the Grafana here is :class:`tests.unit.test_grafana_client.FakeGrafana`, a local HTTP server that checks
every request against the documentation pages it names and records the annotations. The pipeline's happenings are
real records and real state: security events on the test's ``fl.events``, model versions on its ``fl.models`` (in
the formats processors/defence.py and aggregator/service.py publish), and a campaign started and stopped in Redis
with producers.campaign, as ``fedguard attack`` does.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
from kafka import KafkaProducer

from fedguard import grafana, records, registry
from fedguard.annotator import run_annotator
from fedguard.stack import create_topics
from producers import campaign as campaigns
from tests.conftest import wait_until
from tests.unit.test_grafana_client import TOKEN, FakeGrafana

pytestmark = pytest.mark.integration


@pytest.fixture
def fake():
    server = FakeGrafana()
    yield server
    server.close()


@pytest.fixture
def producer(settings):
    create_topics(settings)
    p = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-tests")
    yield p
    p.close(timeout=5)


def send(producer: KafkaProducer, topic: str, key: str, value: dict) -> None:
    producer.send(topic, key=key.encode(), value=records.dumps(value)).get(timeout=30)


def quarantined(device: str, at: float) -> dict:
    """As processors/defence.py publishes it."""
    return {"type": "quarantined", "device_id": device, "window_id": f"m:{int(at)}", "update_id": "u-1",
            "verdict": "reject", "flags": ["norm"], "reasons": ["norm z 9.1"], "trust": 0.12, "at": at}


def released(device: str, at: float) -> dict:
    return {"type": "released", "device_id": device, "trust": 0.55, "at": at, "reason": "probation over"}


def version(settings, n: int, rule: str, params: dict, at: float) -> dict:
    """As aggregator/service.py publishes it (the fields the annotator reads, and a few more)."""
    return {"model_id": settings.model_id, "version": n, "parent": n - 1 if n else None, "round": n, "rule": rule,
            "rule_params": params, "rule_info": {}, "metrics": {"accuracy": 0.5, "loss": 1.0}, "created_at": at}


class Annotator:
    """run_annotator in a thread, as ``fedguard up`` runs it."""

    def __init__(self, settings, client, since: float) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=run_annotator, args=(settings, self.stop, client),
                                       kwargs={"since": since, "poll_s": 0.2}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the annotator did not stop"


def texts(fake: FakeGrafana) -> list[str]:
    return [a["text"] for a in fake.annotations]


def test_quarantine_attack_and_rule_change_are_annotated_exactly_once_across_an_outage_and_a_restart(
        settings, fake, producer):
    t = settings.topics
    redis_client = registry.connect(settings)
    # Before the annotator starts: never annotated (a restart must not repeat what it sent before).
    long_ago = time.time() - 3600
    send(producer, t.events, "dev-0005", quarantined("dev-0005", long_ago))
    send(producer, t.models, settings.model_id, version(settings, 0, "fedavg", {}, long_ago))

    since = time.time()
    fake.outage = 2  # Grafana answers 503 to the first two attempts
    annotator = Annotator(settings, grafana.connect(fake.url, token=TOKEN), since)
    try:
        now = time.time()
        event = quarantined("dev-0002", now)
        send(producer, t.events, "dev-0002", event)
        send(producer, t.events, "dev-0002", event)  # re-delivered
        send(producer, t.events, "dev-0003", {"type": "flagged", "device_id": "dev-0003", "at": now})

        attack = campaigns.start(redis_client, settings, "sign_flip", 0.5, devices=["dev-0000", "dev-0001"],
                                 start_version=1)
        wait_until(lambda: any(x.startswith("attack started") for x in texts(fake)), 60, 0.2, "attack started")
        campaigns.stop(redis_client, settings)

        send(producer, t.models, settings.model_id, version(settings, 1, "fedavg", {}, time.time()))  # same rule
        send(producer, t.models, settings.model_id, version(settings, 2, "krum", {"f": 1}, time.time()))
        send(producer, t.models, settings.model_id, version(settings, 2, "krum", {"f": 1}, time.time()))  # again
        send(producer, t.events, "dev-0002", released("dev-0002", time.time()))

        expected = {
            "device dev-0002 quarantined: trust 0.120 after window " + event["window_id"],
            f"attack started: sign_flip on 2 devices (campaign {attack.id})",
            f"attack stopped: sign_flip (campaign {attack.id})",
            'aggregation rule changed: fedavg -> krum {"f": 1} (version 2)',
            "device dev-0002 released: probation over, trust 0.550",
        }
        wait_until(lambda: expected <= set(texts(fake)), 90, 0.2, "the expected annotations")
    finally:
        annotator.close()

    assert fake.violations == [] and fake.unknown == []
    assert collections.Counter(texts(fake)) == collections.Counter(expected)  # each once, nothing else
    assert len(fake.seen("POST", "/api/annotations")) == len(expected) + 2  # the two refused during the outage
    by_text = {a["text"]: a for a in fake.annotations}
    assert by_text[f"attack stopped: sign_flip (campaign {attack.id})"]["tags"] == [
        "fedguard", "attack", "sign_flip", "stopped"]
    assert by_text[next(x for x in expected if x.startswith("device dev-0002 q"))]["time"] == round(now * 1000)

    # A restart reads the topics and the campaign again from the start, and annotates only what is new.
    restart = Annotator(settings, grafana.connect(fake.url, token=TOKEN), time.time())
    try:
        send(producer, t.events, "dev-0004", quarantined("dev-0004", time.time()))
        wait_until(lambda: any("dev-0004" in x for x in texts(fake)), 90, 0.2, "the annotation after the restart")
    finally:
        restart.close()
    assert len(fake.annotations) == len(expected) + 1 and fake.violations == []
