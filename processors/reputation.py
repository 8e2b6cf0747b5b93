"""Per-device reputation: a pure model (the window stage stores it in Redis, one JSON value per device).

Beta reputation with forgetting (Jøsang & Ismail, "The Beta Reputation System", 15th Bled Electronic Commerce
Conference, 2002, Sec. 3-4): positive evidence ``r`` and negative evidence ``s``; the reputation is the expectation
of Beta(r + 1, s + 1),

    E = (r + 1) / (r + s + 2),

and before each new observation the old evidence is discounted by the forgetting factor lambda (their eq. 10):
``r <- lambda r``, ``s <- lambda s``. A fresh device has r = s = 0, E = 0.5.

Evidence per window verdict (``ReputationParams``): accept r += 1, downweight s += 0.5, reject s += 2. With
lambda = 0.9 old evidence halves in 6.6 windows and an always-accepted device converges to r = 10, E = 11/12.

Quarantine (``status = "quarantined"``) when **any** of

* the evidence is ``sybil``: the device's update was near-identical (sketch cosine > 0.99) to another device's in
  the same window (:func:`processors.detectors.sybil`). It counts as a reject and quarantines at once. Honest
  non-IID updates are never that close (pairwise cosines measured <= 0.61 in the first round, where every update
  points the same way, <= 0.21 after; 0 of 3,000 honest members in bench/results/detection.md), and an attacker
  cannot put an honest device into its group: it would need that device's update, which depends on the device's
  private data and travels sealed to the server. Waiting for 3 strikes instead let a Sybil group keep its members
  for as long as 3 samplings of each take (at 10 of 100 devices per round, 2 to 4 of 12-15 Sybils that took part
  were quarantined within 10 rounds, bench/results/audit.md before this rule);
* the evidence is ``harmful``: the behaviour detector's strong signal (:func:`processors.detectors.behaviour`):
  the device's update, applied alone to its base version, took the loss on the server's clean rows above 4x the
  window's median member. It counts as a reject and quarantines at once. Honest members rarely come near it (at
  most 2.4x the median in 2,000 measured on 1,000 rows; on the 256 rows the validator uses, one honest device of
  the 300 clean windows of bench/results/detection.md was quarantined in a round in which one of its members was
  rejected: the rule's measured price), and an attacker cannot push an honest member there: it can lower the
  window's median only with more than half of the distinct, trusted weight. Waiting for 3 strikes let constrain-and-scale
  devices, rejected in 72 % of their windows but sampled once every ~10 rounds, keep sending for the whole run
  (2 and 4 of 20 quarantined within 10 rounds, bench/results/audit.md before this rule), and their few admitted
  updates added up to a 7-10 % backdoor;
* ``strikes`` (consecutive windows in which the detectors judged against the device: downweighted or rejected)
  reaches 3: a device flagged in 3 of its windows in a row is quarantined whatever its past, because Beta evidence
  alone cannot both forgive a new device's one mistake and quarantine a long-honest one quickly (E after 3 rejects
  from the steady state r = 10 is still 0.56; a device downweighted in every window took about 50 windows to fall
  below 0.15). Downweights count since 2026-12-03: label-flipping devices were downweighted in 9 of 10 of their
  windows and none was ever quarantined (0 of 38, bench/results/detection.md before the change). A downweight
  from the trust rule alone (``low_trust``, no detector vote) is evidence ``accept`` (processors/ensemble.py), so
  low trust does not feed itself; or
* ``E < quarantine_below`` (0.15): the slow rule, e.g. for a device rejected in 2 of every 3 windows (below).

Numbers an honest device lives with (computed in tests/unit/test_reputation.py): a new device rejected in its first
window has E = 1/4 = 0.25, in its first two E = 1/5.8 = 0.172, both above 0.15; a device flagged at random in 1 % of
its windows (the ensemble's measured rate on honest members is 0.5 %, 0.1 % rejected: bench/results/detection.md)
is quarantined by 3 flags in a row with probability 1e-6 per window, i.e. about once in 10^6 windows, and released
after the probation; at 5 % it would be once in 8,000 windows.

What it does not catch: a device that avoids three flagged windows in a row. Rejected in 2 of every 3 windows it
settles at E = 0.26 (not quarantined, but below the ensemble's ``trust_min`` of 0.3, so even its accepted updates get
weight 0.5); alternating reject/accept it settles at E = 0.33. Its rejected updates carry no weight either way.

Release (:func:`maybe_release`) after ``probation_s`` seconds (1 hour) in quarantine: status back to ``"active"``
with the evidence restarted at r = 0, s = 4 (E = 1/6 = 0.167: below the ensemble's ``trust_min`` of 0.3, so its
next update is downweighted, and one reject brings E to 1/7.6 = 0.13 < 0.15) and ``probation = 5``: until 5 windows
have been accepted, any reject re-quarantines at once.

Events returned (the caller publishes them on ``fl.events``): ``"flagged"`` (verdict downweight or reject),
``"quarantined"``, ``"released"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

__all__ = ["Reputation", "ReputationParams", "expectation", "maybe_release", "observe"]

#: what a window says about a device's update (processors/ensemble.py, ``MemberVerdict.evidence``)
EVIDENCE = ("accept", "downweight", "reject", "sybil", "harmful")


@dataclass(frozen=True)
class ReputationParams:
    forgetting: float = 0.9          # lambda, applied before each observation
    accept_evidence: float = 1.0     # r += on accept
    downweight_evidence: float = 0.5  # s += on downweight
    reject_evidence: float = 2.0     # s += on reject
    quarantine_below: float = 0.15   # E below this quarantines
    strikes_to_quarantine: int = 3   # consecutive flagged windows (downweight or reject) that quarantine
    probation_s: float = 3600.0      # seconds in quarantine before release
    restart_r: float = 0.0           # evidence after release: E = (0 + 1) / (0 + 4 + 2) = 1/6
    restart_s: float = 4.0
    probation_accepts: int = 5       # accepted windows after release during which one reject re-quarantines

    def __post_init__(self) -> None:
        if not 0.0 < self.forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        for name in ("accept_evidence", "downweight_evidence", "reject_evidence", "restart_r", "restart_s",
                     "probation_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0")
        if not 0.0 <= self.quarantine_below < 1.0:
            raise ValueError("quarantine_below must be in [0, 1)")
        if self.strikes_to_quarantine < 1 or self.probation_accepts < 0:
            raise ValueError("strikes_to_quarantine must be >= 1 and probation_accepts >= 0")


@dataclass(frozen=True)
class Reputation:
    r: float = 0.0
    s: float = 0.0
    status: str = "active"           # "active" | "quarantined"
    quarantined_at: float | None = None
    strikes: int = 0                 # consecutive flagged windows (downweighted or rejected)
    probation: int = 0               # accepts still needed to leave probation (0 = not on probation)
    windows: int = 0                 # observations so far
    quarantines: int = 0             # times quarantined
    last_seen: float | None = None

    @property
    def expectation(self) -> float:
        return expectation(self)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Reputation":
        """Strict inverse of :meth:`to_json` (unknown or missing keys, wrong types, non-finite numbers:
        ``ValueError``)."""
        try:
            obj = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"Reputation: not JSON: {exc}") from None
        fields = set(cls.__dataclass_fields__)
        if not isinstance(obj, dict) or set(obj) != fields:
            raise ValueError(f"Reputation: expected exactly the keys {sorted(fields)}")
        for name in ("r", "s"):
            v = obj[name]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"Reputation: {name} must be a finite number >= 0")
        for name in ("strikes", "probation", "windows", "quarantines"):
            v = obj[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Reputation: {name} must be an int >= 0")
        for name in ("quarantined_at", "last_seen"):
            v = obj[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"Reputation: {name} must be a finite number or null")
        if obj["status"] not in ("active", "quarantined"):
            raise ValueError("Reputation: status must be 'active' or 'quarantined'")
        if obj["status"] == "quarantined" and obj["quarantined_at"] is None:
            raise ValueError("Reputation: a quarantined device needs quarantined_at")
        return cls(r=float(obj["r"]), s=float(obj["s"]), status=obj["status"],
                   quarantined_at=None if obj["quarantined_at"] is None else float(obj["quarantined_at"]),
                   strikes=obj["strikes"], probation=obj["probation"], windows=obj["windows"],
                   quarantines=obj["quarantines"],
                   last_seen=None if obj["last_seen"] is None else float(obj["last_seen"]))


def expectation(rep: Reputation) -> float:
    """``E = (r + 1) / (r + s + 2)``: the trust in [0, 1] the ensemble and the aggregator may weight by."""
    return (rep.r + 1.0) / (rep.r + rep.s + 2.0)


def observe(rep: Reputation, evidence: str, now: float,
            params: ReputationParams = ReputationParams()) -> tuple[Reputation, list[str]]:
    """Apply one window's ``evidence`` (``"accept"``, ``"downweight"``, ``"reject"``; ``"sybil"`` and
    ``"harmful"``: rejects that quarantine at once). Evidence is forgotten by lambda first, then added. Returns the
    new reputation and the events. A device already quarantined (a window that closed as it was being quarantined)
    still accumulates evidence but raises no new quarantine."""
    if evidence not in EVIDENCE:
        raise ValueError(f"evidence must be one of {EVIDENCE}, got {evidence!r}")
    lam = params.forgetting
    r, s = lam * rep.r, lam * rep.s
    strikes, probation = rep.strikes, rep.probation
    events: list[str] = []
    if evidence == "accept":
        r += params.accept_evidence
        strikes = 0
        probation = max(0, probation - 1)
    elif evidence == "downweight":
        s += params.downweight_evidence
        strikes += 1
        events.append("flagged")
    else:
        s += params.reject_evidence
        strikes += 1
        events.append("flagged")
    new = replace(rep, r=r, s=s, strikes=strikes, probation=probation, windows=rep.windows + 1, last_seen=now)
    if new.status == "active":
        e = expectation(new)
        if (evidence in ("sybil", "harmful") or strikes >= params.strikes_to_quarantine
                or e < params.quarantine_below or (evidence in ("reject", "sybil", "harmful") and rep.probation > 0)):
            new = replace(new, status="quarantined", quarantined_at=now, quarantines=rep.quarantines + 1)
            events.append("quarantined")
    return new, events


def maybe_release(rep: Reputation, now: float,
                  params: ReputationParams = ReputationParams()) -> tuple[Reputation, list[str]]:
    """Release a quarantined device once ``probation_s`` have passed since ``quarantined_at``: status ``active``,
    evidence restarted at (``restart_r``, ``restart_s``), strikes 0, ``probation = probation_accepts``. Anything
    else is returned unchanged with no events."""
    if rep.status != "quarantined" or rep.quarantined_at is None or now - rep.quarantined_at < params.probation_s:
        return rep, []
    return replace(rep, status="active", quarantined_at=None, r=params.restart_r, s=params.restart_s, strikes=0,
                   probation=params.probation_accepts), ["released"]
