"""Defences against an enrolled attacker (issue 9), live on the real broker and Redis with the default configuration.

Each test runs the embedded pipeline (processors with the detection ensemble and reputation, aggregator, fleet),
lets it train a few clean rounds, then compromises chosen devices with `fedguard attack` (they keep their valid
keys) and asserts what the model and the honest devices kept:

* every version built from an attacked window is at most 2 percentage points below the version the same window
  would have made without the poison: the admitted honest members' real updates (read back from the update store
  at the references their window names, with the weights the pipeline gave them) and, in the seat of each attacker
  the window admitted, the update that device would have sent honestly (the fleet's training: same shard, same
  seed), aggregated by the pipeline's rule; rejected attackers hold no seat in either. That separates what the
  admitted poison cost from the round-to-round swing of a small non-IID fleet, from a change of rule and from the
  loss of a rejected member;
* no honest member is rejected while the attack runs (at most one, the ensemble's base rate on clean traffic);
* the attacker's influence is at most one member per window: one seat per device, and near-identical copies from
  several devices are rejected together;
* a repeat offender is quarantined: after at most 3 windows in a row in which it was flagged (reputation strikes),
  after one window in a Sybil group, and the validator then refuses its updates with reason code `quarantined`.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import numpy as np

from fedguard import records, registry
from fedguard.modelstore import ModelStore
from fedguard.stack import EmbeddedStack
from fedguard.tasks import build_model, evaluate, load_task, model_spec, set_flat_params
from fedguard.updatestore import UpdateStore
from producers import campaign
from producers.inject import inject
from tests.conftest import json_values, read_topic, wait_until

pytestmark = pytest.mark.e2e

WARM_UP = 3  # clean rounds before the attack
ATTACKED = 8  # rounds under attack


class StoreMirror:
    """Hard links to every tensor the validator writes to the update store, taken while the pipeline runs.

    The aggregator's retention deletes the tensors of a base version some versions after it (keep_from in
    fedguard/updatestore.py, widened by the audit's look-back), and :func:`without_attack_accuracy` reads the
    tensors of every attacked window after the run. A hard link keeps a file's content when retention removes its name from the store; the mirror has the
    store's layout, so a window member's reference names its tensor in it too. A file is in the store under its
    final name only once it is whole (written to a temporary name, then renamed)."""

    def __init__(self, source: Path, target: Path, interval_s: float = 0.1) -> None:
        self.source, self.target, self.interval_s = Path(source), Path(target), interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sweep(self) -> None:
        for directory, _, names in os.walk(self.source):  # os.walk ignores directories deleted meanwhile
            for name in names:
                if not name.endswith(".f32"):
                    continue
                source = Path(directory) / name
                target = self.target / source.relative_to(self.source)
                if target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(source, target)
                except FileNotFoundError:
                    pass  # deleted by retention meanwhile (its window's version was published long ago)
                except FileExistsError:
                    pass
                except OSError:  # a file system without hard links: a copy (an open file outlives its deletion)
                    try:
                        shutil.copyfile(source, target)
                    except FileNotFoundError:
                        pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sweep()

    def __enter__(self) -> "StoreMirror":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.sweep()


@dataclass
class Run:
    settings: object
    versions: list[dict]
    windows: list[dict]
    malicious: set[str]
    rejected: Counter
    events: list[dict]
    attackers: list[str]
    status: dict[str, str]
    tensors: UpdateStore  # every tensor the validator wrote during the run (a mirror of the update store)
    valid_refs: dict[tuple[int, int], str]  # position on fl.updates.valid -> the tensor reference its record names

    def attacked_windows(self) -> list[dict]:
        return [w for w in self.windows if any(m["update_id"] in self.malicious for m in w["members"])]

    def members(self, bad: bool) -> list[dict]:
        return [m for w in self.windows for m in w["members"] if (m["update_id"] in self.malicious) == bad]


def run_attack(settings, kind: str, attackers: list[str], params: dict | None = None, flood: int = 0,
               per_round: int = 5) -> Run:
    settings = settings.with_overrides(num_devices=10, devices_per_round=per_round, window_size=per_round,
                                       window_deadline_s=6.0, round_timeout_s=15.0)
    assert settings.detection == "ensemble"  # the default configuration is what is tested
    store = ModelStore(settings.models_dir)
    client = registry.connect(settings)
    mirror = settings.data_dir.parent / "update-store-mirror"
    with EmbeddedStack(settings, own_broker=False, own_redis=False) as stack, \
            StoreMirror(settings.update_store_dir, mirror):
        def version() -> int:
            assert stack.check_alive() == [], f"{stack.check_alive()} died; logs in {stack.log_dir}"
            return store.versions()[-1] if store.versions() else -1

        wait_until(lambda: version() >= WARM_UP, 180, what=f"{WARM_UP} clean versions")
        started = campaign.start(client, settings, kind, 0.0, params=params, devices=attackers)
        if flood:
            assert inject(settings, "flood", flood, device_id=attackers[0]) == flood
        wait_until(lambda: version() >= started.start_version + ATTACKED, 300, what=f"{ATTACKED} attacked rounds")
        versions = [store.meta(v) for v in store.versions()]
    ledger = campaign.ledger(client, settings)
    valid_refs = {(m.partition, m.offset): records.loads(m.value)["tensor"]
                  for m in read_topic(settings, settings.topics.valid, idle_s=1.0)}
    return Run(settings=settings, versions=versions, windows=json_values(read_topic(settings, settings.topics.windows)),
               malicious={e["update_id"] for e in ledger},
               rejected=Counter(r["reason"] for r in json_values(read_topic(settings, settings.topics.rejected))),
               events=json_values(read_topic(settings, settings.topics.events)), attackers=attackers,
               status={d: registry.get_device(client, settings, d)["status"] for d in attackers},
               tensors=UpdateStore(mirror), valid_refs=valid_refs)


def without_attack_accuracy(run: Run, window: dict, parent: int) -> float:
    """Accuracy of the same window without the poison: the admitted honest members' updates as they were, and in the
    seat of each attacker the window admitted, the update that device would have sent honestly (the fleet's own
    training: same shard, same seed); rejected attackers hold no seat in either. Aggregated from the parent version
    by the pipeline's configured rule (capped sample counts times the window stage's weights). The attacked version
    is held against this: what the admitted poison cost, not the loss of a member or a change of rule."""
    from aggregator.combine import ConfiguredRule
    from aggregator.rules import RULE_SPECS, aggregate
    from fedguard.tasks import DEFAULT_TRAINING, get_flat_params, local_train
    from producers.sampling import fleet_shards, training_seed

    settings = run.settings
    rule = ConfiguredRule(settings.rule, settings.rule_params, settings.sample_count_cap)
    assert set(RULE_SPECS[settings.rule].data) <= {"sample_counts"}, "the reference needs only sample counts"
    # The honest members the pipeline admitted, with the weight it gave them (the window stage's verdicts stand).
    honest = [m for m in window["members"] if m["update_id"] not in run.malicious
              and m["verdict"] != "reject" and m.get("weight", 1.0) > 0]
    base = ModelStore(settings.models_dir).load(parent).params
    for m in honest:  # the member names the tensor its valid record names
        assert run.valid_refs[(m["valid"]["partition"], m["valid"]["offset"])] == m["tensor"], m
    rows = [(run.tensors.get(m["tensor"], base.size), m["num_samples"], m.get("weight", 1.0)) for m in honest]
    task = load_task(settings.task, seed=settings.seed)
    shards = fleet_shards(task.y_train, settings.num_devices, settings.dirichlet_alpha, settings.seed)
    hp = DEFAULT_TRAINING[task.name]
    model = build_model(model_spec(task), seed=settings.seed)
    for m in window["members"]:
        # A rejected attacker holds no seat in either version; an admitted one is replaced by its honest update.
        if m["update_id"] in run.malicious and m["verdict"] != "reject" and m.get("weight", 1.0) > 0:
            index = int(m["device_id"].rsplit("-", 1)[1])
            set_flat_params(model, base)
            local_train(model, task.x_train[shards[index]], task.y_train[shards[index]],
                        epochs=settings.local_epochs or hp["epochs"], lr=settings.local_lr or hp["lr"],
                        batch_size=settings.local_batch_size or hp["batch_size"],
                        seed=training_seed(settings.seed, parent, index), momentum=hp.get("momentum", 0.0))
            rows.append((get_flat_params(model) - base, len(shards[index]), 1.0))
    counts = np.array([min(n, settings.sample_count_cap) * w for _, n, w in rows], dtype=np.float64)
    result = aggregate(settings.rule, np.stack([d for d, _, _ in rows]).astype(np.float64), **rule.config,
                       sample_counts=counts)
    set_flat_params(model, (base + result.vector).astype(np.float32))
    return evaluate(model, task.x_test, task.y_test)[0]


def assert_model_and_honest_kept(run: Run) -> None:
    attacked = run.attacked_windows()
    assert attacked, "no window had an attacker in it"
    for w in attacked:
        made = next((v for v in run.versions if v.get("window_id") == w["window_id"]), None)
        if made is None:
            continue  # the last window, still in flight when the stack stopped
        clean = without_attack_accuracy(run, w, made["parent"])
        assert made["metrics"]["accuracy"] >= clean - 0.02, (w["window_id"], made["metrics"], clean,
                                                               [(m["device_id"], m["verdict"], m["flags"])
                                                                for m in w["members"]])
    # (an attacker's own update seated before its flood is not honest: the flood's copies are equivocation)
    honest_rejected = [m for m in run.members(bad=False) if m["verdict"] == "reject"
                       and not (m["device_id"] in run.attackers and "equivocation" in m["flags"])]
    assert len(honest_rejected) <= 1, honest_rejected
    for w in run.windows:  # one seat per device, always
        assert len({m["device_id"] for m in w["members"]}) == len(w["members"])


def assert_quarantined(run: Run) -> None:
    """Each attacker rejected in 3 windows is quarantined, and the validator refuses it afterwards."""
    for device in run.attackers:
        rejected_windows = [w for w in run.windows for m in w["members"]
                            if m["device_id"] == device and m["verdict"] == "reject"]
        if len(rejected_windows) >= 3:
            assert run.status[device] == registry.QUARANTINED, (device, run.status)
            quarantine = [e for e in run.events if e["type"] == "quarantined" and e["device_id"] == device]
            assert quarantine and quarantine[0]["window_id"] in {w["window_id"] for w in rejected_windows[:3]}
    assert any(s == registry.QUARANTINED for s in run.status.values()), run.status
    # After its quarantine a device holds no seat in any later window (the validator refuses it, the fleet stops
    # sampling it).
    for event in (e for e in run.events if e["type"] == "quarantined"):
        at = int(event["window_id"].rsplit(":", 1)[1])
        later = [w["window_id"] for w in run.windows if w["base_version"] > at
                 and any(m["device_id"] == event["device_id"] for m in w["members"])]
        assert not later, (event["device_id"], later)


def test_sybils_sending_identical_model_replacement_updates_are_rejected_and_quarantined(settings):
    # Every device in every round, as in the case (several enrolled devices send the same update in one
    # window). A lone copy, when only one Sybil is sampled, is a single model-replacement update: the per-window
    # ensemble does not separate it (issue 9's open gap, measured in bench/results/detection.md), so it is not
    # what this test can hold the defence to.
    run = run_attack(settings, "sybil", ["dev-0001", "dev-0004", "dev-0007", "dev-0008"], per_round=10)
    assert_model_and_honest_kept(run)
    # Two or more copies in a window are a Sybil group: all rejected. A lone copy holds one seat at most, and the
    # default rule clips it to the window's median norm: at most one member's influence per window.
    for w in run.attacked_windows():
        bad = [m for m in w["members"] if m["update_id"] in run.malicious]
        admitted = [m for m in bad if m["verdict"] != "reject"]
        if len(bad) >= 2:
            assert not admitted, [(m["verdict"], m["flags"]) for m in bad]
        assert len(admitted) <= 1
    # Not asserted: the backdoor. Lone copies that slip through before FoolsGold has two rounds of history add up
    # over rounds (measured here: up to 61% on this 10-device synthetic fleet); per-window defences cannot stop that
    # accumulation (../shared/THREATS.md), the model audit of issue 14 is meant to.
    assert_quarantined(run)
    # One window in a Sybil group quarantines a device (evidence "sybil"), not three.
    def base(window_id: str) -> int:
        return int(window_id.rsplit(":", 1)[1])

    grouped_at = {}
    for w in run.windows:
        for m in w["members"]:
            if m["device_id"] in run.attackers and "sybil" in m["flags"]:
                grouped_at.setdefault(m["device_id"], w["window_id"])
    assert grouped_at, "no Sybil group formed"
    for device, window_id in grouped_at.items():
        quarantine = [e for e in run.events if e["type"] == "quarantined" and e["device_id"] == device]
        assert run.status[device] == registry.QUARANTINED, (device, run.status)
        assert quarantine and base(quarantine[0]["window_id"]) <= base(window_id), (device, window_id, quarantine)


def test_one_device_stuffing_windows_and_flooding_holds_one_seat(settings):
    run = run_attack(settings, "window_stuffing", ["dev-0003"], params={"count": 10}, flood=100)
    assert_model_and_honest_kept(run)
    assert run.rejected["window_duplicate"] > 0  # the stuffed copies and the flood, refused at admission
    for w in run.windows:
        assert sum(m["device_id"] == "dev-0003" for m in w["members"]) <= 1
    # The copies are equivocation (a second signed update for the base version of the device's seat, also when its
    # bucket is empty and they are rate limited): the seat is rejected too (issue 9, window stuffing), so the
    # stuffer's update never reaches the model, three such windows quarantine it, and nobody else is charged.
    seats = [m for m in run.members(bad=True) if m["device_id"] == "dev-0003"]
    assert seats and all(m["verdict"] == "reject" and "equivocation" in m["flags"] for m in seats), \
        [(m["verdict"], m["flags"]) for m in seats]
    charged = {m["device_id"] for w in run.windows for m in w["members"] if "equivocation" in m["flags"]}
    assert charged == {"dev-0003"}, charged
    if len(seats) >= 3:
        assert run.status["dev-0003"] == registry.QUARANTINED, run.status


def test_updates_along_minus_the_global_update_at_the_honest_norm_are_not_admitted(settings):
    attackers = ["dev-0002", "dev-0005", "dev-0009"]
    run = run_attack(settings, "ipm", attackers, params={"eps": 1.0, "norm": "median_honest", "omniscient": True})
    assert_model_and_honest_kept(run)
    bad = run.members(bad=True)
    assert bad and all(m["verdict"] != "accept" for m in bad), [(m["verdict"], m["flags"]) for m in bad]


def test_sign_flipped_updates_are_rejected_by_their_loss_on_the_servers_clean_data(settings):
    # A sign flip (x4, the library's default) of a non-IID update is nearly orthogonal to the other members and its
    # norm is an ordinary one when the device's own update is small: what gives it away is what it does to the model.
    # The validator measures every update's loss on the server's clean rows applied alone to its base version (read
    # from the model store), and the window stage compares it with the window's median member.
    attackers = ["dev-0002", "dev-0006"]
    run = run_attack(settings, "sign_flip", attackers)
    assert_model_and_honest_kept(run)
    bad = run.members(bad=True)
    assert bad and all(m["verdict"] == "reject" and "behaviour" in m["flags"] for m in bad), \
        [(m["verdict"], m["flags"], m["scores"].get("loss_ratio")) for m in bad]
    # measured live for every member, honest ones included (the base versions' weights were readable)
    members = [m for w in run.windows for m in w["members"]]
    assert all(isinstance(m["loss"], float) and isinstance(m["base_loss"], float) for m in members)
    honest = run.members(bad=False)
    assert max(m["scores"]["loss_ratio"] for m in honest) < min(m["scores"]["loss_ratio"] for m in bad)
    assert not [m for m in honest if "behaviour" in m["flags"]]
    for device in attackers:  # three rejected windows quarantine a device (reputation strikes)
        rejected = [w for w in run.windows for m in w["members"] if m["device_id"] == device
                    and m["verdict"] == "reject"]
        if len(rejected) >= 3:
            assert run.status[device] == registry.QUARANTINED, (device, run.status)
