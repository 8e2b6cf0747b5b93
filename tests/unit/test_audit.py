"""Unit tests for aggregator.audit: Neural Cleanse audit (absolute and differential), attribution, helpers.

Small and fast: the synthetic task (32 features, 10 classes) with a 32-unit MLP; a backdoor on the last two features
(BadNets-style, target 0) is planted by data poisoning.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aggregator import audit as audit_mod
from aggregator.audit import (AuditConfig, AuditResult, ReversedTrigger, anomaly_index, attribute, audit_model,
                              median_reference, select_audit_set)
from fedguard.tasks import (apply_trigger, backdoor_accuracy, build_model, get_flat_params, load_task, local_train,
                            model_spec, pixel_pattern, set_flat_params)

TRAIN = dict(epochs=3, lr=0.05, batch_size=32, momentum=0.9)
FAST = AuditConfig(steps=100, audit_size=64, time_budget_s=30.0)




@pytest.fixture(scope="module")
def world():
    """A clean model, a backdoored one (20% of its training data carries the trigger), the audit set (held-out
    training rows), and the trigger (which the audit never sees)."""
    task = load_task("synthetic")
    spec = model_spec(task, hidden=32)
    trigger = pixel_pattern(task, size=2, target=0)
    x, y = task.x_train[:3000], task.y_train[:3000]
    clean = build_model(spec, seed=0)
    local_train(clean, x, y, seed=0, **TRAIN)
    xp, yp = x.copy(), y.copy()
    xp[:600] = apply_trigger(xp[:600], trigger)
    yp[:600] = trigger.target
    backdoored = build_model(spec, seed=0)
    local_train(backdoored, xp, yp, seed=0, **TRAIN)
    assert backdoor_accuracy(backdoored, task.x_test, task.y_test, trigger) > 0.9
    assert backdoor_accuracy(clean, task.x_test, task.y_test, trigger) < 0.2
    pool_x, pool_y = task.x_train[3000:], task.y_train[3000:]
    x_audit = pool_x[select_audit_set(pool_x, pool_y, 128, seed=0)]
    return {"task": task, "spec": spec, "trigger": trigger, "clean": clean, "backdoored": backdoored,
            "x_audit": x_audit}


@pytest.fixture(scope="module")
def audits(world):
    return {name: audit_model(world[name], world["x_audit"], FAST) for name in ("clean", "backdoored")}


# ---------------------------------------------------------------------------------------------------- helpers


def test_anomaly_index_is_the_mad_score_below_the_median():
    v = np.array([10.0, 11.0, 9.0, 10.0, 12.0, 8.0, 2.0])
    med, mad = 10.0, 1.0  # |v - 10| = 0 1 1 0 2 2 8 -> median 1
    np.testing.assert_allclose(anomaly_index(v), (med - v) / (1.4826 * mad))
    assert anomaly_index(v)[-1] == pytest.approx(8 / 1.4826)
    assert anomaly_index(v)[4] < 0  # above the median: negative


def test_anomaly_index_floor_and_zero_spread():
    v = np.array([1.0, 1.0, 1.0, 1.0, 0.5])
    out = anomaly_index(v)
    assert out[:4].tolist() == [0.0] * 4 and out[4] == np.inf
    assert anomaly_index(v, mad_floor=0.25)[4] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        anomaly_index(np.array([1.0, np.nan]))


def test_select_audit_set_is_balanced_deterministic_and_prefix_balanced():
    y = np.repeat(np.arange(10), [50, 40, 30, 60, 50, 50, 50, 50, 50, 50])
    x = np.zeros((len(y), 3))
    idx = select_audit_set(x, y, 100, seed=3)
    assert len(set(idx.tolist())) == 100
    assert np.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert np.bincount(y[idx[:30]], minlength=10).tolist() == [3] * 10
    assert np.array_equal(idx, select_audit_set(x, y, 100, seed=3))
    assert not np.array_equal(idx, select_audit_set(x, y, 100, seed=4))
    with pytest.raises(ValueError):
        select_audit_set(x, y, len(y) + 1)


def test_reversed_trigger_applies_the_neural_cleanse_blend():
    mask = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    pattern = np.array([9.0, 2.0, -1.0], dtype=np.float32)
    t = ReversedTrigger(1, mask, pattern)
    x = np.array([[4.0, 4.0, 4.0]])
    np.testing.assert_allclose(t.apply(x), (1 - mask) * x + mask * pattern)
    assert t.l1 == pytest.approx(1.5)
    assert t.top_features(2) == [2, 1]
    with pytest.raises(ValueError):
        ReversedTrigger(0, mask, pattern[:2])


@pytest.mark.parametrize("kwargs", [{"steps": 0}, {"audit_size": 0}, {"lr": 0}, {"threshold": -1},
                                    {"drop_ratio": 1.0}, {"attack_success": 0}, {"lambda_up": 1.0},
                                    {"pattern_range": (1.0, 1.0)}, {"steps": 2.5}, {"time_budget_s": float("nan")}])
def test_audit_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AuditConfig(**kwargs)


def test_hand_written_adam_matches_the_adam_algorithm():
    """Against Adam as documented for torch.optim.Adam (Kingma & Ba 2015, Alg. 1), in float64 numpy; not against
    torch.optim.Adam itself, whose first construction imports torch._dynamo (seconds; the reason for _Adam)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(5, 7, generator=gen)
    a = torch.randn(5, 7, generator=gen).requires_grad_(True)
    ref = a.detach().double().numpy().copy()
    m = np.zeros_like(ref)
    v = np.zeros_like(ref)
    lr, b1, b2, eps = 0.1, 0.5, 0.9, 1e-8
    ours = audit_mod._Adam([a], lr, (b1, b2))
    for t in range(1, 21):
        a.grad = None
        ((a.tanh() - target) ** 2).sum().backward()
        g = a.grad.double().numpy()
        ours.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        ref = ref - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        # the gradient is taken at our iterate; keep the reference on it so float32 drift does not compound
        np.testing.assert_allclose(a.detach().double().numpy(), ref, rtol=1e-5, atol=1e-5)
        ref = a.detach().double().numpy().copy()


# ------------------------------------------------------------------------------------------------------ audit


def test_audit_flags_the_backdoored_class_and_not_the_clean_model(world, audits):
    clean, bad = audits["clean"], audits["backdoored"]
    assert clean.flagged is None and clean.reasons == [] and clean.trigger is None
    assert bad.flagged == world["trigger"].target
    assert bad.reasons == ["absolute"]
    assert bad.anomaly[0] > 2 and bad.anomaly[0] == bad.anomaly.max()
    assert bad.norms[0] < 0.7 * np.median(bad.norms)
    # the reversed trigger sits on the true trigger's features and works on held-out audit inputs
    assert set(bad.trigger.top_features(2)) & set(world["trigger"].indices.tolist())
    with torch.no_grad():
        pred = world["backdoored"](torch.tensor(bad.trigger.apply(world["x_audit"][64:]))).argmax(1)
    assert float((pred == 0).float().mean()) > 0.8


def test_audit_is_deterministic_and_leaves_the_model_untouched(world, audits):
    before = get_flat_params(world["backdoored"])
    again = audit_model(world["backdoored"], world["x_audit"], FAST)
    assert np.array_equal(before, get_flat_params(world["backdoored"]))
    assert np.array_equal(again.norms, audits["backdoored"].norms)
    assert np.array_equal(again.masks, audits["backdoored"].masks)
    assert all(p.requires_grad for p in world["backdoored"].parameters())  # the audit froze a copy, not the model


def test_audit_result_shapes_and_json_summary(world, audits):
    r = audits["backdoored"]
    k, d = 10, world["task"].input_dim
    assert r.norms.shape == r.anomaly.shape == r.attack_success.shape == (k,)
    assert r.masks.shape == r.patterns.shape == (k, d)
    assert ((r.masks >= 0) & (r.masks <= 1)).all()
    lo, hi = float(world["x_audit"].min()), float(world["x_audit"].max())
    assert (r.patterns >= lo - 1e-5).all() and (r.patterns <= hi + 1e-5).all()
    assert r.steps == FAST.steps and not r.truncated and r.seconds > 0 and r.cpu_seconds > 0
    d = r.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert len(text) < 3000
    assert d["flagged"] == 0 and d["trigger"]["target"] == 0 and len(d["norms"]) == k
    assert d["ratios"] is None and d["config"]["steps"] == FAST.steps


def test_differential_flags_a_class_whose_trigger_shrank(world, audits):
    clean = audits["clean"]
    # against itself: every ratio is 1, nothing flagged
    same = audit_model(world["clean"], world["x_audit"], FAST, reference=clean)
    np.testing.assert_allclose(same.ratios, 1.0)
    assert same.flagged is None
    # a reference in which class 3's trigger was 3x larger: class 3 shrank by 2/3, alone -> differential flag
    ref = clean.norms.copy()
    ref[3] *= 3.0
    r = audit_model(world["clean"], world["x_audit"], FAST, reference=ref)
    assert r.flagged == 3 and r.reasons == ["differential"]
    assert r.ratios[3] == pytest.approx(1 / 3) and r.diff_anomaly[3] >= FAST.diff_threshold
    assert r.trigger.target == 3
    # the same shrink in every class is a global change, not a backdoor
    r_all = audit_model(world["clean"], world["x_audit"], FAST, reference=clean.norms * 3.0)
    assert r_all.flagged is None
    # both tests firing on the backdoored model against the clean one
    both = audit_model(world["backdoored"], world["x_audit"], FAST, reference=clean)
    assert both.flagged == 0 and both.reasons == ["absolute", "differential"]
    assert json.dumps(both.to_dict(), allow_nan=False)


def test_audit_time_budget_truncates(world, monkeypatch):
    clock = iter(range(10_000))
    monkeypatch.setattr(audit_mod.time, "process_time", lambda: float(next(clock)))
    # c0 = 0; the checks before steps 1, 2, 3 read 1, 2, 3 (> 2.5): two steps are run
    r = audit_model(world["clean"], world["x_audit"], AuditConfig(steps=50, time_budget_s=2.5))
    assert r.truncated and r.steps == 2
    assert r.to_dict()["truncated"] is True
    clock2 = iter(range(0, 10_000, 5))
    monkeypatch.setattr(audit_mod.time, "process_time", lambda: float(next(clock2)))
    with pytest.raises(TimeoutError):
        audit_model(world["clean"], world["x_audit"], AuditConfig(steps=50, time_budget_s=1.0))


def test_a_loaded_machine_delays_the_audit_but_does_not_cut_it_short(world, monkeypatch):
    """The budget is CPU time: wall time running 100 s per reading (other processes on the cores) changes nothing."""
    wall = iter(range(0, 10_000_000, 100))
    monkeypatch.setattr(audit_mod.time, "perf_counter", lambda: float(next(wall)))
    r = audit_model(world["clean"], world["x_audit"], AuditConfig(steps=20, time_budget_s=2.0))
    assert not r.truncated and r.steps == 20 and r.seconds >= 100


def test_audit_rejects_bad_inputs(world):
    with pytest.raises(ValueError):
        audit_model(world["clean"], world["x_audit"][:, :5], FAST)
    with pytest.raises(ValueError):
        audit_model(world["clean"], np.full((4, 32), np.nan), FAST)
    with pytest.raises(ValueError):
        audit_model(world["clean"], world["x_audit"], FAST, reference=np.ones(9))
    two = torch.nn.Linear(32, 2)
    with pytest.raises(ValueError, match="3 classes"):
        audit_model(two, world["x_audit"], FAST)


# ------------------------------------------------------------------------------------------------ attribution


@pytest.fixture(scope="module")
def window(world):
    """Parent = the clean model; 6 honest deltas (clean training on disjoint slices) and 2 backdoor deltas."""
    task, trig = world["task"], world["trigger"]
    parent = get_flat_params(world["clean"])
    net = build_model(world["spec"], seed=1)
    deltas, bad = {}, set()
    for i in range(8):
        sl = slice(3000 + 300 * i, 3300 + 300 * i)
        x, y = task.x_train[sl].copy(), task.y_train[sl].copy()
        if i in (2, 5):
            x[:120] = apply_trigger(x[:120], trig)
            y[:120] = trig.target
            bad.add(f"dev{i}")
        set_flat_params(net, parent)
        local_train(net, x, y, seed=i, epochs=2, lr=0.05, batch_size=32, momentum=0.9)
        deltas[f"dev{i}"] = get_flat_params(net) - parent
    return parent, deltas, bad


def test_attribution_blames_the_backdoor_members(world, window, audits):
    parent, deltas, bad = window
    reversed_trigger = audits["backdoored"].trigger  # reverse-engineered, not the true trigger
    res = attribute(parent, deltas, world["clean"], reversed_trigger, world["x_audit"])
    assert set(res.flagged) == bad
    assert res.target == 0 and 0 < res.inputs <= len(world["x_audit"])
    assert min(res.scores[m] for m in bad) > 0 > max(res.scores[m] for m in deltas if m not in bad)
    assert min(res.robust_z[m] for m in bad) >= 3
    assert res.success_lift["dev2"] == pytest.approx(res.success["dev2"] - res.parent_success)
    assert json.dumps(res.to_dict(), allow_nan=False)
    assert res.to_dict()["flagged"] == sorted(bad)


def test_attribution_absolute_threshold_when_attackers_are_the_majority(world, window, audits):
    parent, deltas, bad = window
    trig = audits["backdoored"].trigger
    # 2 honest + the 2 attackers 3 times each (positions as ids): the median is an attacker's lift
    arr = np.stack([deltas["dev0"], deltas["dev1"]] + [deltas[m] for m in sorted(bad)] * 3)
    lifts = attribute(parent, deltas, world["clean"], trig, world["x_audit"]).success_lift
    bar = 0.9 * min(lifts[m] for m in bad)  # on this toy the lifts are small (the reversed trigger already works
    assert bar > max(lifts[m] for m in deltas if m not in bad)  # partly on the parent); real values: docs/audit.md
    res = attribute(parent, arr, world["clean"], trig, world["x_audit"], abs_threshold=bar)
    assert set(res.flagged) == set(range(2, 8))
    assert all("absolute" in res.reasons[i] for i in res.flagged)


def test_attribution_is_pure_and_validates(world, window, audits):
    parent, deltas, _ = window
    trig = audits["backdoored"].trigger
    before = get_flat_params(world["clean"])
    attribute(parent, deltas, world["clean"], trig, world["x_audit"])
    assert np.array_equal(before, get_flat_params(world["clean"]))
    with pytest.raises(ValueError):
        attribute(parent[:-1], deltas, world["clean"], trig, world["x_audit"])
    with pytest.raises(ValueError):
        attribute(parent, {"a": parent[:-1]}, world["clean"], trig, world["x_audit"])
    with pytest.raises(ValueError):
        attribute(parent, deltas, world["clean"], (trig.mask, trig.pattern), world["x_audit"])
    honest_only = {m: v for m, v in deltas.items() if m not in ("dev2", "dev5")}
    res = attribute(parent, honest_only, world["clean"], trig, world["x_audit"])
    assert res.flagged == []


def test_audit_result_trigger_for_any_class(audits):
    r: AuditResult = audits["clean"]
    t = r.trigger_for(4)
    assert t.target == 4 and np.array_equal(t.mask, r.masks[4])


def test_median_reference_is_the_per_class_median(audits):
    a, b = audits["clean"], audits["backdoored"]
    c = a.norms * 2
    np.testing.assert_allclose(median_reference([a, b, c]), np.median(np.stack([a.norms, b.norms, c]), axis=0))
    np.testing.assert_allclose(median_reference([a]), a.norms)
    with pytest.raises(ValueError):
        median_reference([])
    with pytest.raises(ValueError):
        median_reference([a.norms, a.norms[:5]])


def test_attribution_margin_still_separates_when_the_parent_is_already_backdoored(world, audits):
    """On a backdoored parent the reversed trigger's attack success is saturated (no member can lift it); the margin
    lift is not: updates that push further along the backdoor direction raise it, honest training lowers it."""
    task = world["task"]
    parent = get_flat_params(world["backdoored"])
    backdoor_direction = parent - get_flat_params(world["clean"])
    net = build_model(world["spec"], seed=2)
    deltas = {}
    for i in range(6):
        sl = slice(3000 + 300 * i, 3300 + 300 * i)
        set_flat_params(net, parent)
        local_train(net, task.x_train[sl], task.y_train[sl], seed=10 + i, epochs=1, lr=0.02, batch_size=32,
                    momentum=0.9)
        deltas[f"h{i}"] = get_flat_params(net) - parent
    deltas["b0"] = 0.3 * backdoor_direction + deltas["h0"]
    deltas["b1"] = 0.3 * backdoor_direction + deltas["h1"]
    res = attribute(parent, deltas, world["clean"], audits["backdoored"].trigger, world["x_audit"])
    assert res.parent_success > 0.9  # saturated
    assert max(res.success_lift.values()) < 0.1
    assert set(res.flagged) == {"b0", "b1"}
    assert all(res.reasons[m] == ["robust_z"] for m in ("b0", "b1"))


# -------------------------------------------------------------------------------------------------- screening
#
# Hand-checkable: a linear model (logits W x + b) and members that only move the bias of a class. Adding c to b_t
# raises every input's target margin z_t - max_{j != t} z_j by exactly c, so each member's score is its c.

LIN_D, LIN_K = 6, 4


def linear_parent(bias: dict[int, float] | None = None) -> tuple[torch.nn.Module, np.ndarray]:
    model = torch.nn.Linear(LIN_D, LIN_K)
    weights = np.random.default_rng(0).normal(0, 0.1, LIN_K * LIN_D).astype(np.float32)
    b = np.zeros(LIN_K, dtype=np.float32)
    b[:2] = -20.0  # classes 0 and 1 never win on the parent: every audit input is measured
    for k, v in (bias or {}).items():
        b[k] = v
    return model, np.concatenate([weights, b])  # model.parameters(): weight (K x D), then bias


def bias_lift(cls: int, c: float) -> np.ndarray:
    delta = np.zeros(LIN_K * LIN_D + LIN_K, dtype=np.float32)
    delta[LIN_K * LIN_D + cls] = c
    return delta


def no_op_trigger(target: int) -> ReversedTrigger:
    """x' = x: the margin lift is then the bias lift itself."""
    return ReversedTrigger(target, np.zeros(LIN_D, np.float32), np.zeros(LIN_D, np.float32))


LIN_X = np.random.default_rng(1).normal(size=(40, LIN_D)).astype(np.float32)
HONEST_LIFTS = {"h0": 0.0, "h1": 0.1, "h2": -0.1, "h3": 0.2, "h4": -0.2, "h5": 0.0}


def lin_screen(lifts: dict, baseline: float, triggers=(0,), parent_bias=None, cls: int = 0, **kw):
    model, parent = linear_parent(parent_bias)
    return audit_mod.screen_members(parent, {m: bias_lift(cls, c) for m, c in lifts.items()}, bias_lift(cls, baseline),
                                    model, [no_op_trigger(t) for t in triggers], LIN_X, **kw)


def test_screening_by_hand():
    """Scores 10 (bad), 0.3 (baseline) and the honest six: median 0.05, MAD 0.15 (x 1.4826 < the 0.5 floor), so the
    bad member's robust z is 9.95 / 0.5 = 19.9 and its lift over the clean update 9.7: both bounds are met."""
    res = lin_screen({**HONEST_LIFTS, "bad": 10.0}, baseline=0.3)
    assert res.screened == ["bad"] and list(res.reasons) == ["bad"]
    (line,) = res.reasons["bad"]
    assert line.startswith("trigger 0 (class 0)") and "+10.00" in line and "+0.30" in line
    (t,) = res.per_trigger
    assert t["target"] == 0 and t["baseline"] == pytest.approx(0.3, abs=1e-4)
    assert t["scores"] == pytest.approx({**HONEST_LIFTS, "bad": 10.0}, abs=1e-4)
    assert t["robust_z"]["bad"] == pytest.approx(19.9, abs=1e-3)
    assert t["robust_z"]["h3"] == pytest.approx(0.3, abs=1e-3)
    assert set(t["scores"]) == set(t["robust_z"]) == {*HONEST_LIFTS, "bad"}  # the baseline is not a member


def test_screening_needs_both_bounds():
    """Either bound alone blocks a screen: min_lift against the lift over the clean update (9.7), z_threshold
    against the robust z (19.9); just below each, the member is screened."""
    lifts = {**HONEST_LIFTS, "bad": 10.0}
    assert lin_screen(lifts, 0.3, min_lift=9.6).screened == ["bad"]
    assert lin_screen(lifts, 0.3, min_lift=9.8).screened == []
    assert lin_screen(lifts, 0.3, min_lift=1e6).screened == []
    assert lin_screen(lifts, 0.3, z_threshold=19.8).screened == ["bad"]
    assert lin_screen(lifts, 0.3, z_threshold=20.0).screened == []
    assert lin_screen(lifts, 0.3, z_threshold=1e6).screened == []
    # a lift over the clean update that is large but not an outlier of the window: every member pushes it
    crowd = {f"b{i}": 10.0 + 0.1 * i for i in range(6)}
    assert lin_screen(crowd, 0.3).screened == []


def test_screening_never_screens_the_baseline_and_a_member_level_with_it_is_kept():
    """The clean update is the yardstick, not a member: as the window's outlier it is not screened, nor is a
    member whose update lifts the trigger exactly as much (here the same update), however far out both are."""
    res = lin_screen({**HONEST_LIFTS, "bad": 10.0}, baseline=50.0, min_lift=0.0, z_threshold=0.1)
    assert res.screened == [] and res.reasons == {}
    assert "baseline" not in json.dumps(res.to_dict()["triggers"][0]["scores"])
    level = lin_screen({**HONEST_LIFTS, "copy": 10.0}, baseline=10.0, min_lift=1e-3)
    assert level.per_trigger[0]["robust_z"]["copy"] == pytest.approx(19.9, abs=1e-3)  # an outlier of the window
    assert level.per_trigger[0]["scores"]["copy"] == level.per_trigger[0]["baseline"]
    assert level.screened == []
    # a member may be called "baseline": it is scored as itself, not as the clean update
    named = lin_screen({**HONEST_LIFTS, "baseline": 10.0}, baseline=0.3)
    assert named.screened == ["baseline"] and named.per_trigger[0]["baseline"] == pytest.approx(0.3, abs=1e-4)


def test_screen_result_is_json_safe_with_any_member_ids():
    model, parent = linear_parent()
    members = {i: bias_lift(0, c) for i, c in enumerate(HONEST_LIFTS.values())}
    members[7] = bias_lift(0, 10.0)
    res = audit_mod.screen_members(parent, members, bias_lift(0, 0.3), model,
                                   [no_op_trigger(0), no_op_trigger(1)], LIN_X)
    assert res.screened == [7] and len(res.reasons[7]) == 1  # trigger 1's margin is not moved by anyone
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["screened"] == ["7"] and list(d["reasons"]) == ["7"]
    assert [t["target"] for t in d["triggers"]] == [0, 1] and set(d["triggers"][1]["scores"]) == {str(i) for i in
                                                                                                   range(6)} | {"7"}


def test_a_trigger_the_parent_already_fulfils_is_skipped_and_the_others_still_screen():
    """The parent's bias makes class 0 win on every audit input: trigger 0 cannot be measured (skipped, with
    attribute's reason); trigger 1 is, and catches the member that lifts class 1."""
    res = lin_screen({**HONEST_LIFTS, "bad": 10.0}, baseline=0.3, triggers=(0, 1), parent_bias={0: 100.0}, cls=1)
    skipped, measured = res.per_trigger
    assert skipped == {"target": 0, "skipped": skipped["skipped"]} and "nothing to measure" in skipped["skipped"]
    assert measured["target"] == 1 and measured["scores"]["bad"] == pytest.approx(10.0, abs=1e-4)
    assert res.screened == ["bad"] and res.reasons["bad"][0].startswith("trigger 1 (class 1)")
    only = lin_screen({**HONEST_LIFTS, "bad": 10.0}, baseline=0.3, triggers=(0,), parent_bias={0: 100.0})
    assert only.screened == [] and list(only.per_trigger[0]) == ["target", "skipped"]
    json.dumps(only.to_dict(), allow_nan=False)


@pytest.mark.parametrize("kwargs", [{"z_threshold": 0.0}, {"z_threshold": -1.0}, {"z_threshold": float("nan")},
                                    {"min_lift": -0.1}, {"min_lift": float("nan")}, {"mad_floor": -1.0}])
def test_screening_rejects_bad_thresholds(kwargs):
    with pytest.raises(ValueError):
        lin_screen({**HONEST_LIFTS, "bad": 10.0}, baseline=0.3, **kwargs)


def test_screening_catches_a_backdoor_member_against_the_reversed_trigger(world, window, audits):
    """The attribution window with one backdoor member (dev2; dev5 left out), screened against the trigger Neural
    Cleanse reverse-engineered from the backdoored model, with a clean update as the baseline: dev2 alone is
    screened. On this toy its lift over the clean update is ~3 logits (honest members: below it), under the default
    min_lift of 6 measured on Fashion-MNIST (docs: screen_members), which therefore keeps it; 2 separates here."""
    task = world["task"]
    parent, deltas, _ = window
    members = {m: v for m, v in deltas.items() if m != "dev5"}
    net = build_model(world["spec"], seed=1)
    set_flat_params(net, parent)
    local_train(net, task.x_train[5400:5700], task.y_train[5400:5700], seed=99, epochs=2, lr=0.05, batch_size=32,
                momentum=0.9)
    baseline = get_flat_params(net) - parent
    trig = audits["backdoored"].trigger
    res = audit_mod.screen_members(parent, members, baseline, world["clean"], [trig], world["x_audit"], min_lift=2.0)
    assert res.screened == ["dev2"], res.per_trigger
    t = res.per_trigger[0]
    assert t["scores"]["dev2"] - t["baseline"] >= 2.0 and t["robust_z"]["dev2"] >= 4.0
    assert max(t["scores"][m] for m in members if m != "dev2") - t["baseline"] < 1.0
    assert audit_mod.screen_members(parent, members, baseline, world["clean"], [trig], world["x_audit"]).screened == []
    # the same scores as attribute() gives (the baseline among the members)
    ref = attribute(parent, {**members, "clean": baseline}, world["clean"], trig, world["x_audit"])
    assert t["scores"] == pytest.approx({m: ref.scores[m] for m in members}, abs=1e-3)
    assert t["baseline"] == pytest.approx(ref.scores["clean"], abs=1e-3)


def test_absolute_test_needs_the_class_to_have_become_small_against_the_reference(world, audits):
    """A class whose trigger was already as small, relative to the other classes, in the reference (a class with a
    naturally small trigger, e.g. Fashion-MNIST's trouser) is not flagged by the absolute test; one that became
    small is."""
    bad, clean = audits["backdoored"], audits["clean"]
    assert bad.reasons == ["absolute"] and bad.relative_ratios is None  # no reference: Neural Cleanse's test alone
    # against the clean model: class 0 became small -> absolute (and differential) flag
    against_clean = audit_model(world["backdoored"], world["x_audit"], FAST, reference=clean)
    q, q_ref = bad.norms / np.median(bad.norms), clean.norms / np.median(clean.norms)
    np.testing.assert_allclose(against_clean.relative_ratios, q / q_ref)
    assert against_clean.relative_ratios[0] <= FAST.abs_drop_ratio and "absolute" in against_clean.reasons
    # against itself (the class was just as small before): every relative ratio is 1 -> no absolute flag
    against_itself = audit_model(world["backdoored"], world["x_audit"], FAST, reference=bad)
    np.testing.assert_allclose(against_itself.relative_ratios, 1.0)
    assert against_itself.anomaly[0] > FAST.threshold and against_itself.flagged is None
    # the bound is inclusive and configurable: a ratio of exactly 1 passes with abs_drop_ratio = 1
    from dataclasses import replace
    loose = audit_model(world["backdoored"], world["x_audit"], replace(FAST, abs_drop_ratio=1.0), reference=bad)
    assert loose.reasons == ["absolute"]
    with pytest.raises(ValueError, match="abs_drop_ratio"):
        replace(FAST, abs_drop_ratio=0.0)
    assert json.dumps(against_clean.to_dict(), allow_nan=False)
