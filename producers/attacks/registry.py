"""The attack kinds the live driver, the CLI and the evaluation harness know, their defaults and param checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._common import check_int, check_real
from .untargeted import PERTURBATIONS, alie_z

__all__ = ["ATTACKS", "BASE_ATTACKS", "AttackSpec", "is_targeted", "validate_params"]

#: What a Sybil / window-stuffing round sends before copying it (see ``producers.attacks.live``).
BASE_ATTACKS = ("backdoor", "model_replacement", "constrain_and_scale", "sign_flip", "honest")
_TARGETED_BASES = ("backdoor", "model_replacement", "constrain_and_scale")


@dataclass(frozen=True)
class AttackSpec:
    """``targeted``: there is a backdoor to measure (for ``sybil``/``window_stuffing``: with the default
    ``base_attack``; see :func:`is_targeted`). ``needs_benign``: crafting uses statistics of the benign updates,
    estimated from the colluders' own honest deltas, or observed with ``{"omniscient": true}``.
    ``schedule``: ``"single"`` (one round) or ``"persistent"`` (every round the devices are sampled)."""

    name: str
    summary: str
    paper: str
    targeted: bool
    needs_benign: bool
    schedule: str
    defaults: Mapping[str, Any]


def _opt(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, v: None if v is None else check(name, v)


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if v not in options:
            raise ValueError(f"{name} must be one of {options}, got {v!r}")
        return v
    return check


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r}")
    return v


def _norm(name: str, v: Any) -> Any:
    if v is None or v == "median_honest":
        return v
    if isinstance(v, str):
        raise ValueError(f"{name} must be 'median_honest', a number > 0 or null, got {v!r}")
    return check_real(name, v, low=0.0, low_open=True)


def _source(name: str, v: Any) -> Any:
    return v if v == "all" else check_int(name, v, low=0)


def _positive(name: str, v: Any) -> float:
    return check_real(name, v, low=0.0, low_open=True)


def _nonneg(name: str, v: Any) -> float:
    return check_real(name, v, low=0.0)


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "target": lambda n, v: check_int(n, v, low=0),
    "size": lambda n, v: check_int(n, v, low=1),
    "class_weight": lambda n, v: check_real(n, v, low=0.0, low_open=True, high=1.0),
    "poison_per_batch": _opt(lambda n, v: check_int(n, v, low=0)),
    "epochs": _opt(lambda n, v: check_int(n, v, low=1)),
    "lr": _opt(_positive),
    "eta": _positive,
    "gamma": _opt(_positive),
    "norm": _norm,
    "bound": _opt(_positive),
    "fraction": lambda n, v: check_real(n, v, low=0.0, high=1.0),
    "source": _source,
    "scale": _positive,
    "sigma": _nonneg,
    "n": _opt(lambda n, v: check_int(n, v, low=2)),
    "f": _opt(lambda n, v: check_int(n, v, low=1)),
    "z": _opt(check_real),
    "eps": _positive,
    "perturbation": _choice(PERTURBATIONS),
    "gamma_init": _positive,
    "tau": _positive,
    "omniscient": _bool,
    "beta": _nonneg,
    "jitter": _nonneg,
    "base_attack": _choice(BASE_ATTACKS),
    "count": _opt(lambda n, v: check_int(n, v, low=1)),
}

_BACKDOOR = {"target": 0, "size": 4, "class_weight": 0.7, "poison_per_batch": None, "epochs": None, "lr": None}
_SCALING = {"eta": 1.0, "gamma": None, "norm": "median_honest", "scale": 4.0}
_GAMMA = {"perturbation": "std", "gamma_init": 10.0, "tau": 1e-5, "omniscient": False}
_BAGDASARYAN = "Bagdasaryan et al., How To Backdoor Federated Learning, AISTATS 2020"
_SHEJWALKAR = "Shejwalkar & Houmansadr, Manipulating the Byzantine, NDSS 2021"


def _spec(name: str, summary: str, paper: str, targeted: bool, needs_benign: bool, defaults: dict,
          schedule: str = "persistent") -> AttackSpec:
    unknown = set(defaults) - set(_CHECKS)
    assert not unknown, unknown
    return AttackSpec(name, summary, paper, targeted, needs_benign, schedule, MappingProxyType(dict(defaults)))


ATTACKS: dict[str, AttackSpec] = {s.name: s for s in (
    # plain backdoor training (class_weight 1): the paper's model replacement (Sec. 4) has no anomaly-evasion loss;
    # eq. 4 is constrain-and-scale's, and {"class_weight": 0.7} gives that single shot
    _spec("model_replacement", "one round: backdoor-train, scale the delta by gamma = n/eta (split over the "
          "round's colluders) so the average replaces the global model", _BAGDASARYAN + ", eq. 3",
          True, False, {**_BACKDOOR, "class_weight": 1.0, "eta": 1.0, "gamma": None}, schedule="single"),
    _spec("constrain_and_scale", "every round: backdoor-train with the anomaly-evasion loss, scale the delta to "
          "the median honest norm", _BAGDASARYAN + ", eq. 3-4", True, True,
          {**_BACKDOOR, "norm": "median_honest", "eta": 1.0, "gamma": None, "bound": None, "omniscient": False}),
    _spec("badnets", "train honestly on own data where a fraction carries the trigger and the target label",
          "Gu et al., BadNets, 2017", True, False,
          {"target": 0, "size": 4, "fraction": 0.5, "epochs": None, "lr": None}),
    _spec("label_flip", "train honestly on own data with labels flipped source -> target ('all': every label)",
          "Tolpegin et al., Data Poisoning Attacks Against FL Systems, ESORICS 2020", False, False,
          {"source": "all", "target": 0, "epochs": None, "lr": None}),
    _spec("sign_flip", "send -scale x the honest delta", "Li et al., RSA, AAAI 2019", False, False, {"scale": 4.0}),
    _spec("gaussian", "send N(0, sigma^2 I) noise", "Blanchard et al., NeurIPS 2017; Fang et al., USENIX Sec 2020",
          False, False, {"sigma": 1.0}),
    _spec("alie", "send mean - z_max * std of the benign updates, coordinate-wise",
          "Baruch et al., A Little Is Enough, NeurIPS 2019, Alg. 1", False, True,
          {"n": None, "f": None, "z": None, "omniscient": False}),
    _spec("ipm", "send -eps x the mean benign update", "Xie et al., Fall of Empires, UAI 2020", False, True,
          {"eps": 100.0, "omniscient": False, "norm": None}),
    _spec("min_max", "mean - gamma p, gamma max s.t. max distance to a benign update <= max benign pairwise distance",
          _SHEJWALKAR + ", Alg. 1", False, True, dict(_GAMMA)),
    _spec("min_sum", "mean - gamma p, gamma max s.t. sum of squared distances <= the largest benign sum",
          _SHEJWALKAR + ", Alg. 1", False, True, dict(_GAMMA)),
    _spec("slow_drift", "honest delta + beta x median honest norm along a fixed backdoor direction",
          "THREATS.md (persistent low-amplitude drift)", True, True, {**_BACKDOOR, "beta": 0.3, "omniscient": False}),
    _spec("sybil", "all colluders of a round send near-identical copies of one crafted update",
          "Fung et al., The Limitations of FL in Sybil Settings, RAID 2020", True, False,
          {**_BACKDOOR, **_SCALING, "base_attack": "model_replacement", "jitter": 0.01}),
    _spec("window_stuffing", "each colluder sends `count` copies of its update for the same base version",
          "fedguard (one update per device per window)", True, False,
          {**_BACKDOOR, **_SCALING, "base_attack": "backdoor", "count": None}),
)}


def validate_params(kind: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The attack's defaults overridden by ``params``, every value checked (numbers normalised: ints where counts
    are expected, floats otherwise). ``ValueError`` for an unknown kind, an unknown key (naming the allowed ones)
    or a bad value."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack kind {kind!r}; known: {', '.join(ATTACKS)}")
    spec = ATTACKS[kind]
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for attack {kind!r}; "
                         f"allowed: {', '.join(spec.defaults)}")
    out = dict(spec.defaults)
    for key, value in params.items():
        out[key] = _CHECKS[key](key, value)
    if kind == "label_flip" and out["source"] == out["target"]:
        raise ValueError(f"label_flip: source and target are the same class ({out['target']})")
    if kind == "alie" and out["z"] is None and out["n"] is not None and out["f"] is not None:
        alie_z(out["n"], out["f"])  # raises if f is not a minority of n
    return out


def is_targeted(kind: str, params: Mapping[str, Any] | None = None) -> bool:
    """Whether the attack, with these params, implants a backdoor to measure (the spec's ``targeted``, except that
    ``sybil`` and ``window_stuffing`` follow their ``base_attack``)."""
    p = validate_params(kind, params)
    if "base_attack" in p:
        return p["base_attack"] in _TARGETED_BASES
    return ATTACKS[kind].targeted
