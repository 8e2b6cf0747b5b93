"""The aggregator's audit logic (aggregator/auditing.py) without Kafka or Redis: when the audit runs, what a verdict
records, the differential reference from the served lineage, the clean-update filter on attribution; and the same
code in the in-process simulation (fedguard eval's ``audit`` option) on digits under a persistent backdoor."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from aggregator.auditing import (CLEAN, FLAGGED, SERVER, SKIPPED, AuditOutcome, Auditor, beyond_clean_update,
                                 carried_over, reference_norms, served_audits, skip_reason, unconfirmed)
from fedguard.simulation import SimulationConfig, simulate
from fedguard.tasks import build_model, get_flat_params, load_task, model_spec


def norms(*values: float) -> dict:
    return {"norms": list(values)}


def test_the_audit_runs_on_image_tasks_with_three_or_more_classes():
    assert skip_reason(load_task("digits"), "neural_cleanse") is None
    assert "no image inputs" in skip_reason(load_task("synthetic"), "neural_cleanse")
    assert "FEDGUARD_AUDIT=none" in skip_reason(load_task("digits"), "none")
    two_classes = SimpleNamespace(name="digits", num_classes=2)
    assert "at least 3" in skip_reason(two_classes, "neural_cleanse")
    with pytest.raises(ValueError, match="unknown audit method"):
        skip_reason(load_task("digits"), "deepsight")


def test_a_skipped_task_records_why_and_runs_nothing():
    task = load_task("synthetic")
    auditor = Auditor(task, model_spec(task))
    params = get_flat_params(build_model(model_spec(task)))
    outcome = auditor.audit_candidate(params, params, {"dev-0000": np.zeros_like(params)})
    assert outcome.verdict == SKIPPED and outcome.scores is None and not outcome.reference
    assert outcome.to_meta() == {"verdict": "skipped", "why": auditor.skipped, "seconds": 0.0, "reference": False}


def test_outcome_metadata():
    with pytest.raises(ValueError):
        AuditOutcome("dirty")
    flagged = AuditOutcome(FLAGGED, scores={"flagged": 0, "norms": [1.0, 2.0, 3.0]}, seconds=1.23456,
                           attributed=[3, "dev-0001"], attribution={"target": 0})
    meta = flagged.to_meta()
    assert meta["attributed"] == ["3", "dev-0001"] and meta["seconds"] == 1.2346 and flagged.flagged_class == 0
    assert meta["attribution"] == {"target": 0} and meta["reference"] is False
    clean = AuditOutcome(CLEAN, scores={"flagged": 2, "norms": [1.0, 2.0, 3.0]}, reference=True)
    assert clean.flagged_class is None and "attributed" not in clean.to_meta()  # a flag explained away is no flag
    carried = carried_over(7)
    assert carried.verdict == SKIPPED and "version 7" in carried.why and not carried.reference


def test_an_unconfirmed_flag_keeps_only_its_strong_attributions():
    # the two honest devices of the matrix (robust z 3.0, 3.3), an attacker at the bound, one caught by the
    # absolute test alone; ints as the simulation's ids (the table's keys are strings)
    table = {"target": 1, "robust_z": {"90": 3.33, "20": 3.02, "7": 4.0, "8": 1.2},
             "reasons": {"90": ["robust_z"], "20": ["robust_z"], "7": ["robust_z"], "8": ["absolute"]}}
    flagged = AuditOutcome(FLAGGED, scores={"flagged": 1}, attributed=[90, 20, 7, 8], attribution=table)
    assert "suspected" not in flagged.to_meta()
    weak = unconfirmed(flagged)
    assert (weak.verdict, weak.attributed, weak.suspected, weak.flagged_class) == (FLAGGED, [7, 8], [90, 20], 1)
    assert weak.to_meta()["attributed"] == ["7", "8"] and weak.to_meta()["suspected"] == ["90", "20"]
    assert weak.attribution == table and flagged.attributed == [90, 20, 7, 8]  # the original untouched
    assert unconfirmed(flagged, z_bound=3.0).attributed == [90, 20, 7, 8]
    assert unconfirmed(flagged, z_bound=5.0).attributed == [8]
    assert unconfirmed(AuditOutcome(FLAGGED)).to_meta()["attributed"] == []  # nobody attributed: nothing suspected
    assert "suspected" not in unconfirmed(AuditOutcome(FLAGGED)).to_meta()


def test_the_reference_follows_the_served_lineage_and_skips_what_was_not_served():
    metas = {
        0: {"parent": None, "audit": {"verdict": "skipped"}},
        1: {"parent": 0, "audit": {"verdict": "skipped", "reference": True, "scores": norms(1, 1, 1)}},  # warm-up
        2: {"parent": 1, "audit": {"verdict": "clean", "reference": True, "scores": norms(2, 2, 2)}},
        3: {"parent": 2, "rule_info": {"params_from": 2}, "audit": {"verdict": "flagged", "scores": norms(9, 9, 9)}},
        4: {"parent": 3, "audit": {"verdict": "clean", "reference": True, "scores": norms(4, 4, 4)}},
        5: {"parent": 4, "rule_info": {"params_from": 2}, "audit": {"verdict": "skipped"}},  # rollback to 2
        6: {"parent": 5, "audit": {"verdict": "clean", "reference": True, "scores": norms(6, 6, 6)}},
    }
    meta_of = metas.__getitem__
    versions = lambda found: [int(a["scores"]["norms"][0]) for a in found]  # noqa: E731
    assert versions(served_audits(meta_of, 4, 3)) == [4, 2, 1]  # the flagged version 3 is not in it
    assert versions(served_audits(meta_of, 6, 3)) == [6, 2, 1]  # the rolled-back-from version 4 is not either
    assert versions(served_audits(meta_of, 6, 1)) == [6]
    assert served_audits(lambda v: (_ for _ in ()).throw(FileNotFoundError(v)), 3, 3) == []
    np.testing.assert_array_equal(reference_norms(served_audits(meta_of, 6, 3), 3), [2, 2, 2])
    assert reference_norms([{"scores": norms(1, 2)}], 3) is None  # another model's classes
    assert reference_norms([], 3) is None


def test_attribution_keeps_only_members_that_beat_the_clean_update():
    result = SimpleNamespace(
        flagged=["a", "b", "c", SERVER],
        reasons={"a": ["robust_z"], "b": ["absolute"], "c": ["absolute"], SERVER: ["absolute"]},
        scores={"a": 4.0, "b": 3.0, "c": 3.5, SERVER: 3.2},
        success_lift={"a": 0.1, "b": 0.9, "c": 0.6, SERVER: 0.3})
    # a: a robust outlier above the server's margin lift; b: below it; c: its success lift is not 0.5 above the
    # server's; the server itself is never blamed
    assert beyond_clean_update(result) == ["a"]
    result.success_lift["c"] = 0.81
    assert beyond_clean_update(result) == ["a", "c"]


def sim(**kw):
    # norm_clip, not the default robust_lr: on this 5-member window the default drops the backdoor before the audit
    # could see it, and these tests are about the audit's response to one that got through
    return simulate(SimulationConfig(**{"rule": "norm_clip", "task": "digits", "num_devices": 10, "per_round": 5, "rounds": 9,
                                        "attack": "constrain_and_scale", "fraction": 0.4, "attack_start": 5,
                                        "seed": 0, "audit": "neural_cleanse", **kw}))


def test_the_simulation_runs_the_audit_and_its_response():
    result = sim()
    rounds = result["rounds"]
    assert [r["audit"] for r in rounds[:3]] == ["skipped"] * 3  # warm-up
    flagged = [r for r in rounds if r["audit"] == "flagged"]
    assert flagged, [(r["round"], r["audit"], r["backdoor_accuracy"]) for r in rounds]
    for r in flagged:
        # not served: the version keeps the parameters of the round before, or, when the look-back found the
        # backdoor in earlier served windows, those of the oldest one's base
        source = r["round"] - 1 if r["rolled_back_to"] is None else r["rolled_back_to"]
        assert source < r["round"]
        before = rounds[source - 1] if source >= 1 else {"main_accuracy": result["initial"]["main_accuracy"],
                                                          "backdoor_accuracy": result["initial"]["backdoor_accuracy"]}
        assert (r["main_accuracy"], r["backdoor_accuracy"]) == (before["main_accuracy"], before["backdoor_accuracy"])
        assert r["candidate_backdoor_accuracy"] > r["backdoor_accuracy"] and not r["served"]
        assert r["attributed_honest"] == 0 and r["looked_back_honest"] == 0
        # attributed (quarantined) only by a flag the look-back confirmed
        if r["attributed_malicious"]:
            assert r["suspected_malicious"] == r["suspected_honest"] == 0
    assert sum(r["screened_honest"] for r in rounds) == 0
    first = flagged[0]
    assert first["attributed_malicious"] >= 1 and first["audit_class"] == 0
    assert first["quarantined_malicious"] >= first["attributed_malicious"]
    assert set(first["quarantined_now"]) <= set(result["compromised"])
    assert rounds[-1]["quarantined_honest"] == 0
    # the attributed devices are quarantined: never sampled again
    gone = set(first["quarantined_now"])
    assert not any(gone & set(r["devices"]) for r in rounds[first["round"]:])


def test_the_simulation_without_the_audit_records_no_verdict():
    rounds = sim(audit="none", rounds=6)["rounds"]
    assert all(r["audit"] is None and r["served"] for r in rounds)
    with pytest.raises(ValueError, match="audit must be one of"):
        SimulationConfig(audit="sometimes")


def test_eval_takes_the_audit_flag_and_keeps_the_keys_of_cells_without_it():
    import hashlib
    import json
    from dataclasses import asdict

    from fedguard.cli import build_parser
    from fedguard.evaluation_matrix import cell_key

    assert build_parser().parse_args(["eval", "--audit", "neural_cleanse"]).audit == "neural_cleanse"
    assert build_parser().parse_args(["eval"]).audit == "none"
    off, on = SimulationConfig(task="digits"), SimulationConfig(task="digits", audit="neural_cleanse")
    # the digest of a cell without the audit is the one it had before the audit's fields existed
    before = {k: v for k, v in asdict(off).items() if not k.startswith("audit")}
    assert cell_key(off).endswith(hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode())
                                  .hexdigest()[:10])
    assert cell_key(on) != cell_key(off)


from tests.unit.test_audit import FAST, world  # noqa: E402,F401 - the backdoored synthetic model and its audit set


def test_the_absolute_test_needs_the_class_norm_well_below_the_median(world):  # noqa: F811
    from dataclasses import replace

    from aggregator.audit import audit_model

    flagged = audit_model(world["backdoored"], world["x_audit"], FAST)
    assert flagged.flagged == 0 and "absolute" in flagged.reasons
    ratio = flagged.norms[0] / np.median(flagged.norms)
    # the same outlier is not flagged once the norm must be below a ratio it does not reach
    unflagged = audit_model(world["backdoored"], world["x_audit"], replace(FAST, abs_max_ratio=ratio * 0.9))
    assert unflagged.anomaly[0] > FAST.threshold and unflagged.flagged is None
    with pytest.raises(ValueError, match="abs_max_ratio"):
        replace(FAST, abs_max_ratio=0.0)


# ------------------------------------------------------------------------- remembered triggers and the look-back

from aggregator.audit import ReversedTrigger  # noqa: E402
from aggregator.auditing import LOOKBACK_WINDOWS, REMEMBERED_TRIGGERS, PastWindow  # noqa: E402
from fedguard.tasks import DEFAULT_TRAINING, apply_trigger, local_train, pixel_pattern, set_flat_params  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    """A trained digits model (the windows' base), 5 honest deltas from it on disjoint slices, one backdoor delta
    (half its slice carries the BadNets square, labelled 0; scaled x5 as model replacement scales), and the true
    trigger as the remembered one: what is under test is which windows and members are screened, not the reverse
    engineering."""
    task = load_task("digits")
    spec = model_spec(task)
    hp = {k: v for k, v in DEFAULT_TRAINING["digits"].items() if k != "hidden"}
    model = build_model(spec, seed=0)
    local_train(model, task.x_train, task.y_train, **{**hp, "epochs": 3}, seed=0)
    parent = get_flat_params(model)
    square = pixel_pattern(task, target=0)

    def delta(rows: slice, seed: int, poison: bool = False) -> np.ndarray:
        x, y = task.x_train[rows].copy(), task.y_train[rows].copy()
        if poison:
            x[: len(x) // 2] = apply_trigger(x[: len(x) // 2], square)
            y[: len(y) // 2] = square.target
        set_flat_params(model, parent)
        local_train(model, x, y, **hp, seed=seed)
        return get_flat_params(model) - parent

    honest = {f"dev-{i}": delta(slice(120 * i, 120 * (i + 1)), seed=i) for i in range(5)}
    backdoor = 5.0 * delta(slice(600, 720), seed=5, poison=True)
    mask = np.zeros(task.input_dim, np.float32)
    mask[square.indices] = 1.0
    pattern = np.zeros(task.input_dim, np.float32)
    pattern[square.indices] = square.value
    return SimpleNamespace(task=task, spec=spec, parent=parent, honest=honest, backdoor=backdoor,
                           trigger=ReversedTrigger(0, mask, pattern))


def test_remember_keeps_the_last_triggers_by_version():
    task = load_task("synthetic")  # remembering needs no audit set: any auditor keeps them

    def trig(v: int) -> ReversedTrigger:
        return ReversedTrigger(v % 3, np.full(4, v, np.float32), np.zeros(4, np.float32))

    auditor = Auditor(task, model_spec(task))
    assert auditor.triggers == [] and REMEMBERED_TRIGGERS == 4
    for v in (5, 2, 9, 7, 3):
        auditor.remember(v, trig(v))
    assert [v for v, _ in auditor.triggers] == [3, 5, 7, 9]
    assert all(t.mask[0] == v for v, t in auditor.triggers)
    auditor.remember(1, trig(1))  # older than every kept one (e.g. reloaded after a restart): not kept
    assert [v for v, _ in auditor.triggers] == [3, 5, 7, 9]
    again = ReversedTrigger(2, np.ones(4, np.float32), np.ones(4, np.float32))
    auditor.remember(7, again)  # the same version again: replaced, not kept twice
    assert [v for v, _ in auditor.triggers] == [3, 5, 7, 9] and dict(auditor.triggers)[7] is again
    auditor.remember(11, trig(11))
    assert [v for v, _ in auditor.triggers] == [5, 7, 9, 11]


def test_screen_needs_a_remembered_trigger_members_and_a_task_the_audit_runs_on(digits):
    auditor = Auditor(digits.task, digits.spec)
    window = {**digits.honest, "dev-bad": digits.backdoor}
    assert auditor.screen(digits.parent, window) is None  # nothing remembered
    auditor.remember(4, digits.trigger)
    assert auditor.screen(digits.parent, {}) is None
    result = auditor.screen(digits.parent, window)
    assert result.screened == ["dev-bad"], result.per_trigger
    assert result.per_trigger[0]["target"] == 0 and set(result.per_trigger[0]["scores"]) == set(window)
    synthetic = load_task("synthetic")
    skipped = Auditor(synthetic, model_spec(synthetic))
    skipped.remember(4, ReversedTrigger(0, np.zeros(synthetic.input_dim, np.float32),
                                        np.zeros(synthetic.input_dim, np.float32)))
    params = get_flat_params(build_model(model_spec(synthetic)))
    assert skipped.skipped and skipped.screen(params, {"dev-0000": np.ones_like(params)}) is None


def test_look_back_returns_the_oldest_window_that_held_a_screened_member(digits):
    """Newest first: the backdoor sits in the windows of versions 9 and 8, not 7: the lineage is served again from
    version 8's base (7), and the member is reported with both windows."""
    auditor = Auditor(digits.task, digits.spec)
    tainted = {**digits.honest, "dev-bad": digits.backdoor}
    windows = [PastWindow(9, digits.parent, tainted), PastWindow(8, digits.parent, tainted),
               PastWindow(7, digits.parent, digits.honest)]
    oldest, culprits = auditor.look_back(digits.trigger, windows)
    assert oldest is windows[1] and culprits == {"dev-bad": [9, 8]}
    # an empty window (e.g. every member screened out) is passed over, not an error
    oldest, culprits = auditor.look_back(digits.trigger, [PastWindow(9, digits.parent, {}), *windows[1:]])
    assert oldest is windows[1] and culprits == {"dev-bad": [8]}


def test_look_back_finds_nothing_in_honest_windows_and_looks_no_further_than_its_limit(digits):
    auditor = Auditor(digits.task, digits.spec)
    honest = [PastWindow(v, digits.parent, digits.honest) for v in range(9, 9 - LOOKBACK_WINDOWS, -1)]
    assert auditor.look_back(digits.trigger, honest) == (None, {})
    # a backdoor one window past the limit is not looked at (and a window that would not even screen is never read)
    beyond = [*honest, PastWindow(9 - LOOKBACK_WINDOWS, digits.parent, {"dev-bad": digits.backdoor}),
              PastWindow(8 - LOOKBACK_WINDOWS, digits.parent[:-1], {"dev-bad": digits.backdoor})]
    assert auditor.look_back(digits.trigger, beyond) == (None, {})
    assert auditor.look_back(digits.trigger, []) == (None, {})


def test_look_back_screens_the_flagged_window_too_without_rolling_back_past_it(digits):
    """The flagged window's own members confirm the trigger (the caller remembers it only then); a backdoor found
    there alone serves the flagged window's base, i.e. nothing older than the parent."""
    auditor = Auditor(digits.task, digits.spec)
    flagged = PastWindow(10, digits.parent, {**digits.honest, "dev-bad": digits.backdoor})
    served = [PastWindow(9, digits.parent, digits.honest)]
    assert auditor.look_back(digits.trigger, served, flagged) == (None, {"dev-bad": [10]})
    tainted = [PastWindow(9, digits.parent, {"dev-old": digits.backdoor, **digits.honest})]
    oldest, culprits = auditor.look_back(digits.trigger, tainted, flagged)
    assert oldest is tainted[0] and culprits == {"dev-bad": [10], "dev-old": [9]}
    # a false alarm: nobody in the flagged window or before it pushes the trigger: nothing to remember
    assert auditor.look_back(digits.trigger, served, PastWindow(10, digits.parent, digits.honest)) == (None, {})


def test_the_flag_event_names_the_suspects_and_why_they_are_not_quarantined():
    from aggregator.service import unconfirmed_note
    assert unconfirmed_note(AuditOutcome(FLAGGED, attributed=["dev-0001"])) == ""
    note = unconfirmed_note(AuditOutcome(FLAGGED, suspected=["dev-0090", "dev-0020"]))
    assert note.startswith(" (suspected dev-0090, dev-0020, not quarantined: weak attribution")
