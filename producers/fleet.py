"""The simulated device fleet.

Each device owns a non-IID shard of the task's training set (Dirichlet(alpha) split). For every new global version
on ``fl.models`` the fleet samples ``devices_per_round`` devices (a fraction C of the fleet, as in FedAvg), each
trains locally from that version and publishes its delta, sealed in the envelope, to ``fl.updates.raw``. If no new
version arrives within ``round_timeout_s`` (e.g. every update was rejected) it samples again on the same version.

While a poisoning campaign runs (``fedguard attack``, :mod:`producers.campaign`), the compromised devices sampled in
a round do not train honestly: they send what :func:`producers.attacks.live.craft_round` crafts, sealed with their
own valid keys, and each malicious update is recorded in the campaign's ledger (ground truth, outside the pipeline).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from prometheus_client import Counter, Gauge, Histogram

from fedguard import envelope, records, registry
from fedguard.codec import encode_tensor
from fedguard.envelope import UpdateHeader
from fedguard.keys import private_from_hex, public_from_hex
from fedguard.modelstore import load_weights
from fedguard.settings import Settings
from fedguard.topicio import consumer_from_beginning
from fedguard.tasks import (DEFAULT_TRAINING, build_model, configure_torch,  # noqa: F401
                            get_flat_params, load_task, local_train, model_spec, set_flat_params)
from producers import campaign as campaign_mod
from producers.attacks.registry import ATTACKS
from producers.enroll import device_ids
from producers.keystore import Keystore
from producers.sampling import fleet_shards, training_seed

log = logging.getLogger("fedguard.fleet")

SENT = Counter("fedguard_fleet_updates_sent_total", "Updates the fleet published and the broker acknowledged")
SEND_FAILED = Counter("fedguard_fleet_send_failures_total",
                      "Updates the fleet tried to publish that the broker did not acknowledge (not counted as sent)")
TRAIN_SECONDS = Histogram("fedguard_fleet_train_seconds", "Local training time per device and round",
                          buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10))
# Labelled, so a restarted fleet exports nothing (not version 0) until its first round.
ROUND = Gauge("fedguard_fleet_base_version", "Global version the fleet last trained from", ["model_id"])
RESAMPLED = Counter("fedguard_fleet_round_retries_total", "Rounds sampled again after the round timeout")
MALICIOUS_SENT = Counter("fedguard_fleet_malicious_updates_sent_total",
                         "Poisoned updates sent by compromised devices of a live campaign (fedguard attack)", ["kind"])
ATTACK_ACTIVE = Gauge("fedguard_fleet_attack_active", "1 for the kind of the poisoning campaign running against the "
                      "fleet's model (started, not stopped, rounds left), 0 for every other kind", ["kind"])

# Every attack kind exported at 0 from the start: "no attack" is a value, and the first malicious burst is visible
# to rate() and increase().
for _kind in ATTACKS:
    MALICIOUS_SENT.labels(_kind)
    ATTACK_ACTIVE.labels(_kind).set(0)


def running_attack(found: "campaign_mod.Campaign | None", fired: int) -> str | None:
    """The kind of the campaign that is running (started, not stopped, rounds left), or None."""
    if found is None or found.stopped_at is not None or (found.rounds is not None and fired >= found.rounds):
        return None
    return found.kind


def export_attack(kind: str | None) -> None:
    """``fedguard_fleet_attack_active``: 1 for ``kind``, 0 for the others (a kind unknown here gets its own series)."""
    for label in {*ATTACKS, *([kind] if kind else [])}:
        ATTACK_ACTIVE.labels(label).set(1 if label == kind else 0)


def models_consumer(settings: Settings, client_id: str) -> KafkaConsumer:
    """A group-less consumer of ``fl.models`` positioned at the beginning of every partition."""
    return consumer_from_beginning(settings, [settings.topics.models], client_id)


class Fleet:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.keystore = Keystore.load(settings.keystore_path)
        self.ids = device_ids(settings.num_devices)
        missing = [d for d in self.ids if d not in self.keystore.devices]
        if missing:
            raise RuntimeError(f"{len(missing)} devices are not enrolled (e.g. {missing[0]}); "
                               f"run `fedguard devices enroll --count {settings.num_devices}`")
        self.redis = registry.connect(settings)
        server_hex = self.redis.get(registry.server_public_key(settings))
        if not server_hex:
            raise RuntimeError("the server public key is not in Redis; start the stack with `fedguard up`")
        self.server_public = public_from_hex(server_hex)
        self.aead_keys = {d: self._derive(d) for d in self.ids}
        # device -> the highest base version the broker acknowledged an update of it for (one per base version;
        # an update the broker did not acknowledge may be sent again), kept across restarts (load_sent)
        self.last_base: dict[str, int] = self.load_sent()
        self.task = load_task(settings.task, seed=settings.seed)
        self.spec = model_spec(self.task, settings.hidden_widths())
        self.model = build_model(self.spec, seed=settings.seed)
        # The same split and training seeds as the in-process simulation (producers/sampling.py).
        self.shards = fleet_shards(self.task.y_train, settings.num_devices, settings.dirichlet_alpha, settings.seed)
        defaults = DEFAULT_TRAINING[self.task.name]
        self.epochs = settings.local_epochs or defaults["epochs"]
        self.lr = settings.local_lr or defaults["lr"]
        self.batch_size = settings.local_batch_size or defaults["batch_size"]
        self.momentum = defaults.get("momentum", 0.0)
        self.producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, client_id="fedguard-fleet",
                                      acks="all", linger_ms=5, max_request_size=settings.max_payload_bytes)
        self.models = models_consumer(settings, "fedguard-fleet-models")
        self.latest: dict[str, Any] | None = None
        self._unconfirmed: list[tuple[UpdateHeader, Any]] = []  # sends since the last confirm(): (header, future)
        self._attack_state: dict[str, dict] = {}  # per campaign: what an attack keeps across rounds

    def _derive(self, device_id: str) -> bytes:
        return envelope.derive_key(private_from_hex(self.keystore.devices[device_id].private_key), self.server_public,
                                   device_id)

    def sync_keystore(self) -> list[str]:
        """Merge with the key store on disk under its lock: save our sequence numbers, adopt rotated keys.

        Returns the devices whose key was rotated (``fedguard devices rotate``) since the last sync.
        """
        with Keystore.editing(self.settings.keystore_path) as disk:
            rotated = self.keystore.merge_from(disk)
            disk.merge_from(self.keystore)
        for device_id in rotated:
            if device_id in self.aead_keys:
                self.aead_keys[device_id] = self._derive(device_id)
                log.info("device %s: adopted its rotated key", device_id)
        return rotated

    def poll_models(self, timeout_ms: int = 500) -> dict[str, Any] | None:
        for messages in self.models.poll(timeout_ms=timeout_ms).values():
            for message in messages:
                meta = records.loads(message.value)
                if meta.get("model_id") == self.settings.model_id and (
                        self.latest is None or meta["version"] > self.latest["version"]):
                    self.latest = meta
        return self.latest

    def run(self, stop: threading.Event) -> None:
        trained_version, attempt, last_round_at = -1, 0, 0.0
        while not stop.is_set():
            latest = self.poll_models()
            if latest is None:
                continue
            if latest["version"] > trained_version:
                next_attempt = 0
            elif time.monotonic() - last_round_at > self.settings.round_timeout_s:
                next_attempt = attempt + 1
            else:
                continue
            if self.holding(latest["version"], stop):  # asked before a round starts, never in the middle of one
                continue
            if next_attempt:
                RESAMPLED.inc()
                log.warning("no new version %ds after training on %d: sampling again", self.settings.round_timeout_s,
                            latest["version"])
            attempt = next_attempt
            self.run_round(latest, attempt, stop)
            trained_version, last_round_at = latest["version"], time.monotonic()

    def holding(self, version: int, stop: threading.Event) -> bool:
        """The stack asked the fleet to hold (``fedguard up`` recycling the broker): start no round, say on which
        version it holds (everything it sent before is in that version's lineage), and look again shortly."""
        if not self.redis.exists(registry.fleet_hold_key(self.settings)):
            return False
        if self.redis.get(registry.fleet_held_key(self.settings)) is None:
            log.info("holding on version %d: the stack is recycling the broker", version)
        self.redis.set(registry.fleet_held_key(self.settings), version)
        stop.wait(0.5)
        return True

    def active(self) -> list[int]:
        """Indices of the devices whose registry status is ``active`` (one pipelined Redis read): revoked and
        quarantined devices are not sampled, so no round waits for updates the validator will refuse."""
        pipe = self.redis.pipeline(transaction=False)
        for device_id in self.ids:
            pipe.hget(registry.device_key(self.settings, device_id), "status")
        return [i for i, status in enumerate(pipe.execute()) if status == registry.ACTIVE]

    def select(self, version: int, attempt: int, active: list[int] | None = None) -> list[int]:
        """The devices of a round: ``devices_per_round`` of the active ones (all if fewer), drawn with a generator
        seeded by (seed, version, attempt), so the choice depends only on those and the set of active devices
        (with every device active it is the choice of earlier versions of the fleet). The draw is
        :func:`producers.sampling.sample_devices`, which the in-process simulation uses too."""
        from producers.sampling import sample_devices

        if active is None:
            active = self.active()
        return sample_devices(self.settings.seed, version, attempt, self.settings.num_devices,
                              self.settings.devices_per_round, active)

    def run_round(self, meta: dict[str, Any], attempt: int = 0, stop: threading.Event | None = None) -> int:
        self.sync_keystore()
        base = load_weights(meta["path"], meta["sha256"])
        version = int(meta["version"])
        selected = self.select(version, attempt)
        # a device the broker already took an update from for this version (an earlier attempt of the round, or before
        # the fleet restarted) does not send another: that would be equivocation, and cost it the seat it has
        fresh = [i for i in selected if self.last_base.get(self.ids[i], -1) < version]
        if not selected:
            log.warning("no active device to sample on version %d (all revoked or quarantined)", version)
        elif not fresh:
            log.info("every device sampled on version %d (attempt %d) has sent for it already", version, attempt)
        selected = fresh
        campaign = self._campaign(version)
        compromised = [i for i in selected if campaign is not None and self.ids[i] in campaign.devices]
        sent, honest_deltas = 0, []
        for index in selected:
            if stop is not None and stop.is_set():
                break
            if index in compromised:
                continue
            delta, num_samples = self.train(index, base, seed=self._seed(version, index))
            self.publish(self.ids[index], version, delta, num_samples)
            honest_deltas.append(delta)
            sent += 1
        if compromised and not (stop is not None and stop.is_set()):
            sent += self.attack(campaign, compromised, base, version, honest_deltas)
        acknowledged = self.confirm()
        self.save_sent()
        self.sync_keystore()
        ROUND.labels(self.settings.model_id).set(version)
        log.info("trained on version %d (attempt %d): %d updates sent (acknowledged by the broker, of %d)%s",
                 version, attempt, acknowledged, sent,
                 f", {len(compromised)} compromised devices sampled ({campaign.kind})" if compromised else "")
        return acknowledged

    def _seed(self, version: int, index: int) -> int:
        return training_seed(self.settings.seed, version, index)

    def _campaign(self, version: int) -> "campaign_mod.Campaign | None":
        """The running poisoning campaign if it fires in this round (one Redis read per round)."""
        found = campaign_mod.load(self.redis, self.settings)
        fired = campaign_mod.fired(self.redis, self.settings, found) if found is not None else 0
        export_attack(running_attack(found, fired))
        if found is None or not found.fires_at(version, fired):
            return None
        return found

    def attack(self, campaign: "campaign_mod.Campaign", compromised: list[int], base: np.ndarray, version: int,
               honest_deltas: list[np.ndarray]) -> int:
        """The compromised devices of this round send what the attack crafts, sealed with their own valid keys."""
        from producers.attacks.live import AttackContext, craft_round

        ctx = AttackContext(
            base=base, version=version, round_index=campaign_mod.fired(self.redis, self.settings, campaign),
            devices=compromised,
            honest_delta=lambda i: self.train(i, base, seed=self._seed(version, i)),
            shard=lambda i: (self.task.x_train[self.shards[i]], self.task.y_train[self.shards[i]]),
            task=self.task, model=build_model(self.spec, seed=self.settings.seed),
            training={"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "momentum": self.momentum},
            window_size=self.settings.window_size, rng=np.random.default_rng(),
            observed_benign=(lambda: np.stack(honest_deltas)) if honest_deltas else None,
            state=self._attack_state.setdefault(campaign.id, {}))  # e.g. slow drift's fixed direction
        crafted = craft_round(campaign.kind, campaign.params, ctx)
        entries = []
        for index, updates in crafted.items():
            for delta, num_samples in updates:
                header = self.publish(self.ids[index], version, delta, num_samples)
                entries.append({"device_id": self.ids[index], "update_id": header.update_id, "base_version": version,
                                "num_samples": int(num_samples), "norm": float(np.linalg.norm(delta))})
        try:
            self.producer.flush()
        except KafkaError as exc:
            log.warning("flushing the producer failed: %r", exc)
        # The ledger names only what the broker acknowledged (confirm() counts and logs the rest).
        acknowledged = {h.update_id for h, f in self._unconfirmed
                        if not isinstance(f, BaseException) and f.is_done and f.succeeded()}
        entries = [e for e in entries if e["update_id"] in acknowledged]
        campaign_mod.record_round(self.redis, self.settings, campaign, entries)
        MALICIOUS_SENT.labels(campaign.kind).inc(len(entries))
        log.warning("campaign %s (%s): %d devices sent %d malicious updates on version %d", campaign.id,
                    campaign.kind, len(crafted), len(entries), version)
        return len(entries)

    def sent_path(self) -> Path:
        return self.settings.data_dir / "fleet-sent.json"

    def load_sent(self) -> dict[str, int]:
        """What each device sent before a restart (each device's own memory of it, as its sequence number is): the
        base versions of :meth:`save_sent`, if they belong to the model store the stack runs now (a store started
        afresh reuses version numbers), else nothing."""
        try:
            saved = json.loads(self.sent_path().read_text())
            if saved.get("store") != self.redis.get(registry.model_store_key(self.settings)):
                return {}
            return {str(d): int(v) for d, v in saved["last_base"].items()}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # damaged: forget it, and say so
            log.warning("ignoring %s: %r", self.sent_path(), exc)
            return {}

    def save_sent(self) -> None:
        """Write :attr:`last_base` with the model store's id (atomically: a temporary file, then a rename)."""
        path = self.sent_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"store": self.redis.get(registry.model_store_key(self.settings)),
                                   "last_base": self.last_base}))
        os.replace(tmp, path)

    def train(self, index: int, base: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
        shard = self.shards[index]
        set_flat_params(self.model, base)
        started = time.perf_counter()
        local_train(self.model, self.task.x_train[shard], self.task.y_train[shard], epochs=self.epochs, lr=self.lr,
                    batch_size=self.batch_size, seed=seed, momentum=self.momentum)
        TRAIN_SECONDS.observe(time.perf_counter() - started)
        return get_flat_params(self.model) - base, int(len(shard))

    def publish(self, device_id: str, base_version: int, delta: np.ndarray, num_samples: int) -> UpdateHeader:
        keys = self.keystore.devices[device_id]
        # Microseconds since the epoch: strictly increasing even if a crash lost the saved counter.
        keys.seq = max(keys.seq + 1, time.time_ns() // 1000)
        header = UpdateHeader.new(device_id=device_id, seq=keys.seq, base_version=base_version,
                                  num_samples=num_samples, model_id=self.settings.model_id)
        sealed = envelope.seal(header, encode_tensor(delta.astype(np.float32)), self.aead_keys[device_id])
        try:
            future = self.producer.send(self.settings.topics.raw, key=device_id.encode(), value=sealed)
        except KafkaError as exc:  # e.g. no metadata within max_block_ms: the broker is away
            future = exc
        self._unconfirmed.append((header, future))  # counted by confirm(), once the broker acknowledged it
        return header

    def confirm(self) -> int:
        """Flush the producer and count what the broker acknowledged since the last call; returns that number.

        ``fedguard_fleet_updates_sent_total`` counts only acknowledged records; each one the broker did not
        acknowledge (the broker down or restarting, a record refused) is logged and counted in
        ``fedguard_fleet_send_failures_total`` instead. The producer's delivery timeout bounds the wait.
        """
        try:
            self.producer.flush()
        except KafkaError as exc:
            log.warning("flushing the producer failed: %r", exc)
        pending, self._unconfirmed = self._unconfirmed, []
        acknowledged, failed = 0, []
        for header, future in pending:
            if isinstance(future, BaseException):
                failed.append((header, future))
            elif future.is_done and future.succeeded():
                acknowledged += 1
                self.last_base[header.device_id] = max(self.last_base.get(header.device_id, -1), header.base_version)
            else:
                failed.append((header, future.exception if future.is_done else "no answer from the broker"))
        SENT.inc(acknowledged)
        if failed:
            SEND_FAILED.inc(len(failed))
            header, error = failed[-1]
            log.warning("%d of %d updates were not acknowledged by the broker and are not counted as sent "
                        "(devices %s; last error: %r)", len(failed), len(pending),
                        ", ".join(sorted({h.device_id for h, _ in failed})), error)
        return acknowledged

    def close(self) -> None:
        self.sync_keystore()
        self.producer.close(timeout=5)
        self.models.close()
