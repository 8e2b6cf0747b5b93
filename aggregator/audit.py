"""Model audit without the trigger (Neural Cleanse, per class) and attribution of a flagged version to window members.

Pure functions over torch modules and numpy arrays: no Kafka, no Redis, no settings. The aggregator calls them on
every candidate version (issue 14); ``bench/audit_probe.py`` calls them in-process. Measurements and the choice of
defaults: ``docs/audit.md``.

Audit: Neural Cleanse
---------------------
Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
Networks", IEEE S&P 2019. A backdoor to class ``t`` is a shortcut: a *small* change of any input sends it to ``t``.
For each output class ``t`` the audit reverse-engineers the smallest trigger that does so on clean inputs.

* Trigger (their eq. 1), over the ``D`` input features (our inputs are flat, standardised pixels)::

      x' = A(x, m, p) = (1 - m) * x + m * p,     m in [0, 1]^D (mask),  p in [lo, hi]^D (pattern)

  parametrised as in their code, ``m = (tanh(a) + 1) / 2`` and ``p = lo + (hi - lo)(tanh(b) + 1) / 2``, where
  ``[lo, hi]`` is the range of valid inputs (by default the audit set's min/max: black and white pixels).
* Objective (their eq. 2-3), for every class ``t`` at once (one batched forward pass over the ``K`` classes)::

      min_{m, p}  CE(f(A(x, m, p)), t)  +  lambda_t * |m|_1

  averaged over the clean audit inputs that the model does not already classify as ``t``. Adam (lr 0.1, betas
  (0.5, 0.9)) as in their code. ``lambda_t`` follows their schedule: start at ``init_lambda`` (1e-3); after
  ``patience`` consecutive steps in which the trigger sends >= ``attack_success`` (0.99) of the inputs to ``t``,
  multiply it by 1.5; after ``patience`` steps below that, divide it by 1.5^1.5. Adapted: patience counts
  optimisation steps, not epochs, and the run is a fixed number of steps (no early stop), so that it is
  deterministic and fits a per-version time budget.
* Norm of class ``t``: ``n_t = |m_t|_1`` of the smallest mask seen that reached the attack-success threshold
  (the final mask if none did; ``attack_success`` then says how far it got).
* Anomaly index (their Sec. IV-B, MAD outlier test)::

      a_t = (median(n) - n_t) / (1.4826 * median_k |n_k - median(n)|)

  a class with ``a_t > threshold`` (2, i.e. below the median by more than two consistent MAD-sigmas) is flagged
  (``reason "absolute"``). Only the small side counts: a backdoor makes a trigger *smaller*.
* Added here: the absolute test also needs ``n_t <= abs_max_ratio * median(n)`` (0.7). When the clean classes'
  norms are tightly clustered (digits, 8x8 inputs: MAD ~6% of the median) the MAD index alone exceeds 2 for a class
  only ~20% below the median: in two clean 40-version digits runs, 3 versions after round 3 had index 2.2-2.3 at
  ratios 0.77-0.82, while every digits version with backdoor accuracy >= 50% had ratio <= 0.64 (docs/audit.md). On
  Fashion-MNIST a backdoored class sits at ~0.2 of the median.
* Added here: with a reference (below), the absolute test also needs the class to have become small: its norm
  relative to the median class, over the same in the reference, ``(n_t / median(n)) / (ref_t / median(ref))``,
  at most ``abs_drop_ratio`` (0.87). Fashion-MNIST's class 1 (trouser) has a naturally small trigger: in 540
  clean versions of 20 seeds under the default defence (``bench/results/audit_classes.md``), 51 (9 per 100;
  classes 1 and 6) passed the two conditions above at 0.58-0.70 of the median, each at a relative ratio of
  0.89-1.05 to its own reference; the absolute flags of real constrain-and-scale backdoors (digits) had 0.66-0.84,
  and Fashion-MNIST backdoors that pass it sit at 0.14-0.43 of the median, from ~1 (docs/audit.md, "A class that
  is always small").

Differential audit (new here; derived from the same measurement)
----------------------------------------------------------------
A streaming pipeline audits every version, so the per-class norms of the versions before are at hand. A persistent
backdoor grows over rounds; a version in which it is partly implanted can have a target-class trigger half as large
as in its parent while it is not yet an outlier among the ten classes (measured: backdoor accuracy 48%, anomaly
index 1.4-1.7, norm ratio 0.51 to the parent; docs/audit.md). The differential test compares each class with itself
across versions::

      r_t = log(n_t(candidate) / n_t(reference))
      z_t = (median(r) - r_t) / max(1.4826 * MAD(r), diff_mad_floor)

and flags class ``t`` (``reason "differential"``) when ``exp(r_t) <= drop_ratio`` (the trigger shrank by at least
``1 - drop_ratio``) *and* ``z_t >= diff_threshold`` (the shrink is specific to ``t``: a version that changes all
classes alike, e.g. a large honest step, is not flagged). All audits use the same seed, the same audit inputs and
the same initial mask/pattern (common random numbers), so their optimisation noise largely cancels in ``r_t``.
What is new relative to Neural Cleanse is only this second statistic (a per-class norm change against earlier
audited versions, besides the cross-class outlier test); it assumes the reference versions are clean. Reference:
the per-class median of the last few *served* versions' audits (:func:`median_reference`; the bench uses 3), so
one noisy or time-truncated audit neither causes nor masks a flag. A version is flagged if either test fires; the
flagged class is the one with the smallest norm among the classes either test flagged.

Attribution
-----------
Given the flagged class ``t`` and its reverse-engineered trigger ``(m, p)``, every window member's update is applied
*alone* to the parent (``parent + delta_i``) and measured on the audit inputs that the parent does not classify as
``t``, with the reversed trigger applied: how strongly they are sent to ``t``. The score is the lift of the mean
target margin over the parent (the soft form of the reversed trigger's attack success, which saturates at 1 once the
parent carries part of the backdoor; the margin does not)::

      M(g)  = mean_x [ g(x')_t - max_{j != t} g(x')_j ]          (logits, x' = the triggered audit input)
      s_i   = M(parent + delta_i) - M(parent)
      z_i   = (s_i - median(s)) / max(1.4826 * MAD(s), mad_floor)

A member is attributed when ``z_i >= z_threshold`` (3) or when its lift of the attack success itself
(``ASR(parent + delta_i) - ASR(parent)``, the share of inputs it alone sends to ``t``) is ``>= abs_threshold``
(0.5), which still holds when attackers are the majority of a window and the median is theirs. This follows the
idea of judging each participant's model separately against the suspected backdoor behaviour (DeepSight's per-model
classification, Rieger et al., NDSS 2022), with the reversed trigger standing in for the unknown true one.

Audit set: a small clean set held by the server (FLTrust's "root dataset", Cao et al. NDSS 2021). The bench draws it
class-balanced from the *training* set (:func:`select_audit_set`), so it is disjoint from the test set the evaluation
reports main and backdoor accuracy on; the first ``audit_size`` rows drive the reverse engineering, all rows the
attribution.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedguard.tasks.server_data import select_audit_set

__all__ = ["AttributionResult", "AuditConfig", "AuditResult", "ReversedTrigger", "ScreenResult", "anomaly_index",
           "attribute", "audit_model", "median_reference", "screen_members", "select_audit_set"]

#: Consistency constant: 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_SCALE = 1.4826


@dataclass(frozen=True)
class AuditConfig:
    """Parameters of :func:`audit_model`. Defaults: measured in ``docs/audit.md`` (Fashion-MNIST, MLP 784-200-10:
    ~1.25 s of CPU per version with one torch thread; the demo makes a version every ~2.3 s).

    ``audit_size`` inputs (the first rows of ``x_audit``) and ``steps`` Adam steps per audit; ``time_budget_s``
    is a safety stop in CPU seconds of this process (the result is then marked ``truncated`` and is no longer
    deterministic): CPU, not wall time, so a loaded machine delays a verdict instead of changing it (with a wall
    budget of 2 s, two simulations on two cores at load ~2 ran most audits to within 0.1 s of the budget: which
    steps ran depended on the load, docs/audit.md); ``pattern_range``
    ``(lo, hi)`` of valid inputs, ``None``: the audit set's min/max."""

    audit_size: int = 64
    steps: int = 150
    lr: float = 0.1
    betas: tuple[float, float] = (0.5, 0.9)
    init_lambda: float = 1e-3
    lambda_up: float = 1.5
    patience: int = 5
    attack_success: float = 0.99
    threshold: float = 2.0
    abs_max_ratio: float = 0.7
    abs_drop_ratio: float = 0.87
    drop_ratio: float = 0.7
    diff_threshold: float = 3.0
    diff_mad_floor: float = 0.05
    time_budget_s: float = 2.0
    seed: int = 0
    pattern_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        ints = {"audit_size": (self.audit_size, 1), "steps": (self.steps, 1), "patience": (self.patience, 1)}
        for name, (value, low) in ints.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"AuditConfig.{name} must be an integer >= {low}, got {value!r}")
        positive = {"lr": self.lr, "init_lambda": self.init_lambda, "threshold": self.threshold,
                    "diff_threshold": self.diff_threshold, "diff_mad_floor": self.diff_mad_floor,
                    "time_budget_s": self.time_budget_s}
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AuditConfig.{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.lambda_up, (int, float)) and self.lambda_up > 1):
            raise ValueError(f"AuditConfig.lambda_up must be > 1, got {self.lambda_up!r}")
        if not 0 < self.attack_success <= 1:
            raise ValueError(f"AuditConfig.attack_success must be in (0, 1], got {self.attack_success!r}")
        if not 0 < self.abs_max_ratio <= 1:
            raise ValueError(f"AuditConfig.abs_max_ratio must be in (0, 1], got {self.abs_max_ratio!r}")
        if not 0 < self.abs_drop_ratio <= 1:
            raise ValueError(f"AuditConfig.abs_drop_ratio must be in (0, 1], got {self.abs_drop_ratio!r}")
        if not 0 < self.drop_ratio < 1:
            raise ValueError(f"AuditConfig.drop_ratio must be in (0, 1), got {self.drop_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"AuditConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.pattern_range is not None:
            lo, hi = self.pattern_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"AuditConfig.pattern_range must be (lo, hi) with lo < hi, got {self.pattern_range}")


@dataclass(frozen=True)
class ReversedTrigger:
    """A reverse-engineered trigger: ``x' = (1 - mask) * x + mask * pattern`` sends inputs to ``target``."""

    target: int
    mask: np.ndarray     # float32 (D,), in [0, 1]
    pattern: np.ndarray  # float32 (D,)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=np.float32)
        pattern = np.asarray(self.pattern, dtype=np.float32)
        if mask.ndim != 1 or mask.shape != pattern.shape or mask.size == 0:
            raise ValueError(f"mask and pattern must be equal-length 1-D vectors, got {mask.shape}, {pattern.shape}")
        if not (np.isfinite(mask).all() and np.isfinite(pattern).all()):
            raise ValueError("mask and pattern must be finite")
        if isinstance(self.target, bool) or not isinstance(self.target, (int, np.integer)) or self.target < 0:
            raise ValueError(f"target must be a class index >= 0, got {self.target!r}")
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "pattern", pattern)
        object.__setattr__(self, "target", int(self.target))

    @property
    def l1(self) -> float:
        return float(np.abs(self.mask).sum())

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The triggered copy of ``x`` (``(D,)`` or ``(N, D)``), float32."""
        x = np.asarray(x, dtype=np.float32)
        return (x + self.mask * (self.pattern - x)).astype(np.float32)

    def top_features(self, k: int = 16) -> list[int]:
        """Indices of the ``k`` largest mask entries (largest first): where the trigger sits."""
        k = max(0, min(int(k), self.mask.size))
        order = np.argsort(-self.mask, kind="stable")[:k]
        return [int(i) for i in order]


@dataclass
class AuditResult:
    """Outcome of :func:`audit_model`. Arrays are per output class. ``masks``/``patterns`` (``(K, D)``) are kept for
    attribution and inspection but left out of :meth:`to_dict`."""

    norms: np.ndarray             # (K,) L1 norm of the smallest successful mask per class
    attack_success: np.ndarray    # (K,) share of audit inputs sent to the class by that mask
    anomaly: np.ndarray           # (K,) Neural Cleanse anomaly index (positive: below the median)
    ratios: np.ndarray | None     # (K,) norm / reference norm, None without a reference
    diff_anomaly: np.ndarray | None  # (K,) robust z of the log ratios (positive: shrank more than the others)
    flagged: int | None
    reasons: list[str]
    trigger: ReversedTrigger | None
    masks: np.ndarray = field(repr=False)
    patterns: np.ndarray = field(repr=False)
    steps: int = 0
    truncated: bool = False
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    config: AuditConfig = field(default_factory=AuditConfig)
    # (K,) the class's norm relative to the median class, over the same in the reference; None without a reference
    relative_ratios: np.ndarray | None = None

    @property
    def is_flagged(self) -> bool:
        return self.flagged is not None

    def trigger_for(self, target: int) -> ReversedTrigger:
        """The reversed trigger of any class (e.g. to attribute a class an operator suspects)."""
        return ReversedTrigger(int(target), self.masks[target], self.patterns[target])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no mask/pattern arrays): what goes into the version's metadata and ``fl.events``."""

        def floats(a: np.ndarray | None, nd: int = 4) -> list[float | None] | None:
            if a is None:
                return None
            return [round(float(v), nd) if math.isfinite(float(v)) else None for v in a]

        out: dict[str, Any] = {
            "method": "neural_cleanse",
            "flagged": self.flagged,
            "reasons": list(self.reasons),
            "norms": floats(self.norms, 3),
            "attack_success": floats(self.attack_success, 4),
            "anomaly_index": floats(self.anomaly, 3),
            "max_anomaly_index": _finite_or_none(float(np.max(self.anomaly))),
            "ratios": floats(self.ratios, 4),
            "diff_anomaly": floats(self.diff_anomaly, 3),
            "relative_ratios": floats(self.relative_ratios, 4),
            "steps": int(self.steps),
            "truncated": bool(self.truncated),
            "seconds": round(float(self.seconds), 4),
            "cpu_seconds": round(float(self.cpu_seconds), 4),
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()},
        }
        if self.trigger is not None:
            out["trigger"] = {"target": self.trigger.target, "l1": round(self.trigger.l1, 3),
                              "top_features": self.trigger.top_features()}
        return out


def _finite_or_none(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None


def anomaly_index(values: np.ndarray, mad_floor: float = 0.0) -> np.ndarray:
    """``(median - v) / max(1.4826 * MAD, mad_floor)`` per entry (Neural Cleanse Sec. IV-B; positive = below the
    median). With a zero scale (all equal and no floor) every index is 0 except entries off the median (+-inf)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"anomaly_index needs a non-empty finite 1-D array, got shape {v.shape}")
    med = float(np.median(v))
    scale = max(MAD_SCALE * float(np.median(np.abs(v - med))), float(mad_floor))
    if scale > 0:
        return (med - v) / scale
    out = np.zeros_like(v)
    out[v < med] = np.inf
    out[v > med] = -np.inf
    return out


class _Adam:
    """Adam (Kingma & Ba 2015, Alg. 1; eps 1e-8), the update of ``torch.optim.Adam`` without weight decay, written
    out: constructing the first ``torch.optim`` optimizer imports ``torch._dynamo`` (1-3 s, see
    ``fedguard.tasks.training._sgd_step``), which would eat the first audit's time budget."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float = 1e-8):
        self.params, self.lr, self.eps = params, float(lr), float(eps)
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


def _frozen_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def median_reference(history: Sequence[AuditResult | np.ndarray | Sequence[float]]) -> np.ndarray:
    """Per-class median of the norms of several audits (e.g. the last 3 served versions): the differential
    reference. One noisy or time-truncated audit in the history then neither causes nor masks a flag."""
    rows = [np.asarray(h.norms if isinstance(h, AuditResult) else h, dtype=np.float64) for h in history]
    if not rows or any(r.ndim != 1 or r.shape != rows[0].shape for r in rows):
        raise ValueError("history must be a non-empty sequence of equal-length norm vectors / AuditResults")
    return np.median(np.stack(rows), axis=0)


def _reference_norms(reference: Any, k: int) -> np.ndarray | None:
    if reference is None:
        return None
    ref = reference.norms if isinstance(reference, AuditResult) else reference
    ref = np.asarray(ref, dtype=np.float64)
    if ref.shape != (k,) or not np.isfinite(ref).all() or (ref <= 0).any():
        raise ValueError(f"reference norms must be {k} finite positive numbers, got {ref!r}")
    return ref


def audit_model(model: nn.Module, x_audit: np.ndarray, config: AuditConfig | None = None,
                reference: AuditResult | Sequence[float] | np.ndarray | None = None) -> AuditResult:
    """Audit ``model`` (logits out, flat inputs ``(N, D)``) with Neural Cleanse on the clean inputs ``x_audit``
    (first ``config.audit_size`` rows), and, given ``reference`` (the :class:`AuditResult` of the previous clean
    version, or its per-class norms, from the same config and audit set), the differential test. The model is not
    modified. Deterministic given ``config.seed`` unless the time budget cut the run short (``truncated``).
    See the module docstring for the equations."""
    config = config or AuditConfig()
    x_all = np.asarray(x_audit)
    if x_all.ndim != 2 or x_all.shape[0] == 0 or not np.isfinite(x_all).all():
        raise ValueError(f"x_audit must be a non-empty finite (N, D) array, got shape {x_all.shape}")
    t0 = time.perf_counter()
    c0 = time.process_time()
    net = _frozen_copy(model)
    x = torch.tensor(x_all[: config.audit_size], dtype=torch.float32)
    b, d = x.shape
    try:
        with torch.no_grad():
            logits0 = net(x)
    except RuntimeError as exc:  # shape mismatch between the inputs and the model
        raise ValueError(f"model does not accept x_audit of shape {tuple(x.shape)}: {exc}") from exc
    if logits0.ndim != 2:
        raise ValueError(f"model must map (N, D) to logits (N, K), got {tuple(logits0.shape)}")
    k = int(logits0.shape[1])
    if k < 3:
        raise ValueError(f"the MAD anomaly index needs at least 3 classes, the model has {k}")
    ref = _reference_norms(reference, k)
    lo, hi = config.pattern_range or (float(x_all.min()), float(x_all.max()))
    if not hi > lo:
        raise ValueError("x_audit is constant: no pattern range; set AuditConfig.pattern_range")
    classes = torch.arange(k)
    # inputs already classified as t do not count for class t (their CE is ~0 and they are not "sent" there)
    weight = (logits0.argmax(1)[None, :] != classes[:, None]).to(torch.float32)  # (K, B)
    counts = weight.sum(1).clamp_min(1.0)
    targets = classes.repeat_interleave(b)

    gen = torch.Generator().manual_seed(int(config.seed))
    # Neural Cleanse initialises mask and pattern uniformly at random; here a mid-range mask start
    # (|a| <= 0.5 -> m in [0.27, 0.73]), the same for every audit with the same seed (common random numbers)
    a = ((torch.rand(k, d, generator=gen) * 2 - 1) * 0.5).requires_grad_(True)
    bvar = (torch.rand(k, d, generator=gen) * 2 - 1).requires_grad_(True)
    adam = _Adam([a, bvar], config.lr, config.betas)
    lam = torch.full((k,), float(config.init_lambda))
    up = torch.zeros(k)
    down = torch.zeros(k)
    best = torch.full((k,), math.inf)
    best_success = torch.zeros(k)
    best_mask = torch.zeros(k, d)
    best_pattern = torch.zeros(k, d)
    last_l1 = torch.zeros(k)
    last_success = torch.zeros(k)
    last_mask = torch.zeros(k, d)
    last_pattern = torch.zeros(k, d)
    down_factor = config.lambda_up ** 1.5
    steps = 0
    truncated = False
    for _ in range(config.steps):
        if time.process_time() - c0 > config.time_budget_s:
            truncated = True
            break
        mask = (torch.tanh(a) + 1) / 2
        pattern = lo + (hi - lo) * (torch.tanh(bvar) + 1) / 2
        xt = x[None, :, :] + mask[:, None, :] * (pattern[:, None, :] - x[None, :, :])  # (K, B, D)
        logits = net(xt.reshape(k * b, d))
        ce = F.cross_entropy(logits, targets, reduction="none").view(k, b)
        ce = (ce * weight).sum(1) / counts
        l1 = mask.sum(1)
        loss = (ce + lam * l1).sum()  # classes are independent: one backward for all
        a.grad = bvar.grad = None
        loss.backward()
        with torch.no_grad():
            success = ((logits.argmax(1).view(k, b) == classes[:, None]).to(torch.float32) * weight).sum(1) / counts
            ok = success >= config.attack_success
            better = ok & (l1 < best)
            best = torch.where(better, l1, best)
            best_success = torch.where(better, success, best_success)
            best_mask[better] = mask[better]
            best_pattern[better] = pattern[better]
            last_l1, last_success = l1.clone(), success
            last_mask.copy_(mask)
            last_pattern.copy_(pattern)
            # Neural Cleanse's lambda schedule (patience in steps)
            up = torch.where(ok, up + 1, torch.zeros_like(up))
            down = torch.where(ok, torch.zeros_like(down), down + 1)
            raise_lam, lower_lam = up >= config.patience, down >= config.patience
            lam = torch.where(raise_lam, lam * config.lambda_up, lam)
            lam = torch.where(lower_lam, lam / down_factor, lam)
            up[raise_lam] = 0
            down[lower_lam] = 0
        adam.step()
        steps += 1
    if steps == 0:
        raise TimeoutError(f"audit time budget {config.time_budget_s}s of CPU spent before the first step")

    found = torch.isfinite(best)
    norms = torch.where(found, best, last_l1).double().numpy()
    success = torch.where(found, best_success, last_success).double().numpy()
    masks = torch.where(found[:, None], best_mask, last_mask).numpy().astype(np.float32)
    patterns = torch.where(found[:, None], best_pattern, last_pattern).numpy().astype(np.float32)
    norms = np.maximum(norms, 1e-9)

    anomaly = anomaly_index(norms)
    candidates: dict[int, set[str]] = {}
    small = norms <= config.abs_max_ratio * float(np.median(norms))
    ratios = diff = relative = None
    if ref is not None:
        # a class that has always been the small one (its natural trigger) is not a new shortcut
        relative = (norms / float(np.median(norms))) / (ref / float(np.median(ref)))
        small &= relative <= config.abs_drop_ratio
    for t in np.flatnonzero((anomaly > config.threshold) & small):
        candidates.setdefault(int(t), set()).add("absolute")
    if ref is not None:
        ratios = norms / ref
        diff = anomaly_index(np.log(ratios), mad_floor=config.diff_mad_floor)
        for t in np.flatnonzero((ratios <= config.drop_ratio) & (diff >= config.diff_threshold)):
            candidates.setdefault(int(t), set()).add("differential")
    flagged = min(candidates, key=lambda t: (norms[t], t)) if candidates else None
    reasons = sorted(candidates[flagged]) if flagged is not None else []
    trigger = ReversedTrigger(flagged, masks[flagged], patterns[flagged]) if flagged is not None else None
    return AuditResult(norms=norms, attack_success=success, anomaly=anomaly, ratios=ratios, diff_anomaly=diff,
                       flagged=flagged, reasons=reasons, trigger=trigger, masks=masks, patterns=patterns,
                       steps=steps, truncated=truncated, seconds=time.perf_counter() - t0,
                       cpu_seconds=time.process_time() - c0, config=config, relative_ratios=relative)


# ------------------------------------------------------------------------------------------------- attribution


@dataclass
class AttributionResult:
    """Per member: ``scores`` = lift of the mean target margin under the reversed trigger over the parent (logits),
    ``success_lift`` = lift of the attack success (share of inputs sent to the target), ``success`` = the member
    model's attack success, ``robust_z`` of the scores; ``flagged`` members in input order, with ``reasons``."""

    target: int
    parent_success: float
    parent_margin: float
    members: list[Any]
    scores: dict[Any, float]
    success_lift: dict[Any, float]
    success: dict[Any, float]
    robust_z: dict[Any, float]
    flagged: list[Any]
    reasons: dict[Any, list[str]]
    inputs: int

    def to_dict(self) -> dict[str, Any]:
        def key(m: Any) -> Any:
            return m if isinstance(m, (str, int)) and not isinstance(m, bool) else str(m)

        def table(d: dict[Any, float], nd: int) -> dict[str, float | None]:
            return {str(key(m)): (round(v, nd) if math.isfinite(v) else None) for m, v in d.items()}

        return {"target": self.target, "parent_success": round(self.parent_success, 4),
                "parent_margin": round(self.parent_margin, 4), "inputs": self.inputs,
                "scores": table(self.scores, 4), "success_lift": table(self.success_lift, 4),
                "robust_z": table(self.robust_z, 3), "flagged": [key(m) for m in self.flagged],
                "reasons": {str(key(m)): r for m, r in self.reasons.items()}}


def _member_items(member_deltas: Any) -> list[tuple[Any, np.ndarray]]:
    if isinstance(member_deltas, Mapping):
        return [(m, np.asarray(v)) for m, v in member_deltas.items()]
    if isinstance(member_deltas, np.ndarray) and member_deltas.ndim == 2:
        return [(i, member_deltas[i]) for i in range(member_deltas.shape[0])]
    return [(i, np.asarray(v)) for i, v in enumerate(member_deltas)]


def _set_flat(model: nn.Module, flat: np.ndarray) -> None:
    src = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(src[offset: offset + n].view_as(p))
            offset += n


def attribute(parent_params: np.ndarray, member_deltas: Mapping[Any, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
              model: nn.Module, reversed_trigger: ReversedTrigger, x_audit: np.ndarray, target: int | None = None,
              *, z_threshold: float = 3.0, abs_threshold: float = 0.5, mad_floor: float = 0.5,
              batch_size: int = 4096) -> AttributionResult:
    """Score each member's update applied alone to the parent against the reversed trigger.

    Inputs: the audit inputs the parent does not classify as ``target`` (the same set for every member), with the
    reversed trigger applied. For a model ``g`` let ``ASR(g)`` be the share of them ``g`` classifies as ``target``
    and ``M(g)`` their mean target margin ``z_t - max_{j != t} z_j`` (logits: how strongly they are sent to ``t``).
    Member ``i``'s score is ``M(parent + delta_i) - M(parent)``; its ``success_lift`` is
    ``ASR(parent + delta_i) - ASR(parent)``. The margin does not saturate: once the parent already carries part of
    the backdoor (ASR near 1) an attacker's update still raises the margin while honest updates lower it.

    A member is attributed when its score is a high outlier, ``robust_z = (s_i - median(s)) / max(1.4826 MAD(s),
    mad_floor) >= z_threshold`` (``mad_floor`` in logits, so that near-identical honest lifts do not turn noise
    into outliers), or when its ``success_lift >= abs_threshold`` (it alone flips that share of the inputs; this
    holds when attackers are the majority of the window and the median is theirs).

    ``parent_params``: flat parameters of the window's base version; ``member_deltas``: ``{member id: delta}`` (or a
    sequence / ``(n, P)`` array: ids are positions); ``model``: any module of the right shape (copied, never
    modified); ``target`` defaults to ``reversed_trigger.target``."""
    if not isinstance(reversed_trigger, ReversedTrigger):
        raise ValueError("reversed_trigger must be a ReversedTrigger (AuditResult.trigger)")
    target = reversed_trigger.target if target is None else int(target)
    parent = np.asarray(parent_params, dtype=np.float32)
    items = _member_items(member_deltas)
    if parent.ndim != 1 or not items:
        raise ValueError("parent_params must be a flat vector and member_deltas non-empty")
    n_params = sum(p.numel() for p in model.parameters())
    if parent.shape[0] != n_params:
        raise ValueError(f"parent_params has {parent.shape[0]} entries, the model {n_params}")
    for m, v in items:
        if v.shape != parent.shape or not np.isfinite(v).all():
            raise ValueError(f"delta of member {m!r} must be a finite vector of length {n_params}")
    if not (z_threshold > 0 and abs_threshold > 0 and mad_floor >= 0):
        raise ValueError("z_threshold and abs_threshold must be > 0, mad_floor >= 0")
    x = np.asarray(x_audit, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != reversed_trigger.mask.shape[0]:
        raise ValueError(f"x_audit must be (N, {reversed_trigger.mask.shape[0]}), got {x.shape}")
    net = _frozen_copy(model)

    def logits_of(params: np.ndarray, inputs: torch.Tensor) -> torch.Tensor:
        _set_flat(net, params)
        with torch.no_grad():
            return torch.cat([net(inputs[i: i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])

    z_parent = logits_of(parent, torch.from_numpy(x))
    if not 0 <= target < int(z_parent.shape[1]):
        raise ValueError(f"target {target} is not a class of the model")
    keep = z_parent.argmax(1) != target
    if not bool(keep.any()):
        raise ValueError(f"the parent classifies every audit input as {target}: nothing to measure")
    xt = torch.from_numpy(reversed_trigger.apply(x[keep.numpy()]))

    def measure(params: np.ndarray) -> tuple[float, float]:
        z = logits_of(params, xt)
        others = z.clone()
        others[:, target] = -math.inf
        margin = (z[:, target] - others.max(1).values).double().mean()
        return float((z.argmax(1) == target).double().mean()), float(margin)

    base_success, base_margin = measure(parent)
    success, scores, success_lift = {}, {}, {}
    for m, v in items:
        succ, margin = measure(parent + v.astype(np.float32))
        success[m], scores[m], success_lift[m] = succ, margin - base_margin, succ - base_success
    vals = np.array([scores[m] for m, _ in items])
    z = -anomaly_index(vals, mad_floor=mad_floor)  # high lifts -> positive z
    robust = {m: float(z[i]) for i, (m, _) in enumerate(items)}
    reasons: dict[Any, list[str]] = {}
    for m, _ in items:
        r = []
        if robust[m] >= z_threshold and scores[m] > 0:
            r.append("robust_z")
        if success_lift[m] >= abs_threshold:
            r.append("absolute")
        if r:
            reasons[m] = r
    flagged = [m for m, _ in items if m in reasons]
    return AttributionResult(target=target, parent_success=base_success, parent_margin=base_margin,
                             members=[m for m, _ in items], scores=scores, success_lift=success_lift,
                             success=success, robust_z=robust, flagged=flagged, reasons=reasons,
                             inputs=int(keep.sum()))


@dataclass(frozen=True)
class ScreenResult:
    """Per remembered trigger (in the order given): ``scores`` (each member's target-margin lift, logits), the
    baseline's lift and ``robust_z``, or ``skipped`` (why it could not be measured). ``screened``: the members
    screened out by any trigger, in input order; ``reasons``: per screened member, one line per trigger that caught
    it."""

    screened: list[Any]
    reasons: dict[Any, list[str]]
    per_trigger: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"screened": [str(m) for m in self.screened],
                "reasons": {str(m): r for m, r in self.reasons.items()},
                "triggers": self.per_trigger}


class _Baseline:
    """The key of the baseline update among the members (cannot collide with a member id)."""

    def __repr__(self) -> str:
        return "baseline"


def screen_members(parent_params: np.ndarray, member_deltas: Mapping[Any, np.ndarray], baseline_delta: np.ndarray,
                   model: nn.Module, triggers: Sequence[ReversedTrigger], x_audit: np.ndarray, *,
                   z_threshold: float = 4.0, min_lift: float = 6.0, mad_floor: float = 0.5) -> ScreenResult:
    """Screen a window's members against the triggers of earlier flagged versions, before they are aggregated.

    For each remembered trigger, every member is scored exactly as :func:`attribute` scores it (its update applied
    alone to ``parent_params``, the lift of the mean target margin under the trigger), together with
    ``baseline_delta`` (the server's clean update from the same parent). Member ``i`` is screened out when, for some
    trigger,

        robust_z_i >= z_threshold   and   s_i - s_baseline >= min_lift   (logits)

    i.e. it is a high outlier of the window *and* pushes the trigger clearly more than clean training does. New here,
    measured (not from a paper): once Neural Cleanse has recovered a backdoor's trigger from one flagged version, the
    attackers of later windows stand out by an order of magnitude, although the aggregate of their window may stay
    below the audit's sensitivity. Fashion-MNIST, persistent constrain-and-scale, 20% compromised, two seeds, the
    46 windows after the first flag: the 32 attacker members lifted the remembered trigger by 7.3 to 38.3 logits
    more than the clean update (robust z 4.3 to 37.8), the 428 honest members by at most 5.7 (robust z at most
    4.0: a device whose data is mostly the target class). Both bounds together leave each side a margin; either
    alone is thinner. This is DeepSight's per-model judgement (Rieger et al., NDSS 2022) against a known trigger
    instead of the update's statistics. A trigger the parent already fulfils on every audit input cannot be measured: ``skipped``."""
    if not (z_threshold > 0 and min_lift >= 0 and mad_floor >= 0):
        raise ValueError("z_threshold must be > 0, min_lift and mad_floor >= 0")
    baseline = _Baseline()
    scored = {**dict(member_deltas), baseline: np.asarray(baseline_delta)}
    members = list(member_deltas)
    reasons: dict[Any, list[str]] = {}
    per_trigger: list[dict[str, Any]] = []
    for k, trig in enumerate(triggers):
        try:
            res = attribute(parent_params, scored, model, trig, x_audit, mad_floor=mad_floor)
        except ValueError as exc:
            if not members or "nothing to measure" not in str(exc):
                raise
            per_trigger.append({"target": trig.target, "skipped": str(exc)})
            continue
        base = res.scores[baseline]
        for m in members:
            if res.robust_z[m] >= z_threshold and res.scores[m] - base >= min_lift:
                reasons.setdefault(m, []).append(
                    f"trigger {k} (class {trig.target}): target margin {res.scores[m]:+.2f} logits, clean update "
                    f"{base:+.2f}, robust z {res.robust_z[m]:.1f}")
        per_trigger.append({"target": trig.target, "baseline": round(base, 4),
                            "scores": {str(m): round(res.scores[m], 4) for m in members},
                            "robust_z": {str(m): round(res.robust_z[m], 3) for m in members}})
    return ScreenResult(screened=[m for m in members if m in reasons], reasons=reasons, per_trigger=per_trigger)
