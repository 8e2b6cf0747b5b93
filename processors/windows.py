"""Window state per model: pure functions over a JSON-serialisable dict, so a Faust table can hold it.

A window collects the validated updates of one base model version and closes when it has ``size`` members or
``deadline_s`` after its first member arrived, whichever comes first. One window per base version: an update
for a version whose window already closed is late and is not aggregated (it is counted).
"""

from __future__ import annotations

from typing import Any

State = dict[str, Any]


def empty_state() -> State:
    return {"open": {}, "closed_upto": -1}


def add_member(state: State, entry: dict[str, Any], now: float, size: int) -> tuple[State, str]:
    """Add one index entry. Returns the new state and what happened: ``added``, ``duplicate`` (same update),
    ``device_duplicate`` (a second update of a device already in the window), ``late``, ``full``."""
    base = int(entry["base_version"])
    if base <= state["closed_upto"]:
        return state, "late"
    key = str(base)
    window = state["open"].setdefault(key, {"opened_at": now, "members": []})
    if any(m["update_id"] == entry["update_id"] for m in window["members"]):
        return state, "duplicate"  # the same valid record delivered twice (at-least-once)
    if any(m["device_id"] == entry["device_id"] for m in window["members"]):
        # Admission already allows one update per device per base version (window_duplicate); this keeps the window
        # right even if that state was lost (e.g. Redis restarted without persistence): the first one keeps the seat.
        return state, "device_duplicate"
    window["members"].append(entry)
    return state, "full" if len(window["members"]) >= size else "added"


def due_windows(state: State, now: float, size: int, deadline_s: float) -> list[int]:
    return sorted(int(k) for k, w in state["open"].items()
                  if len(w["members"]) >= size or now - w["opened_at"] >= deadline_s)


def take_window(state: State, base_version: int) -> tuple[State, dict[str, Any]]:
    """Remove the window of ``base_version`` from ``state`` (later updates for it are late) and return it."""
    window = state["open"].pop(str(base_version))
    state["closed_upto"] = max(state["closed_upto"], base_version)
    return state, window


def window_record(window: dict[str, Any], judged: list[dict[str, Any]], stats: dict[str, Any], *, model_id: str,
                  base_version: int, now: float, size: int) -> dict[str, Any]:
    """The ``fl.windows`` record of a closed window: each member with the ensemble's outcome (``scores``, ``flags``,
    ``verdict`` accept / downweight / reject, ``weight`` the multiplier in [0, 1] the aggregator applies, ``reasons``,
    ``evidence`` fed to reputation, ``trust`` after this window), without its sketch (a detector input only)."""
    members = window["members"]
    if len(judged) != len(members):
        raise ValueError(f"{len(judged)} judgements for {len(members)} members")
    out_members = [{**{k: v for k, v in member.items() if k != "sketch"}, **outcome}
                   for member, outcome in zip(members, judged)]
    verdicts = [m["verdict"] for m in out_members]
    return {
        "window_id": f"{model_id}:{base_version}",
        "model_id": model_id,
        "base_version": base_version,
        "opened_at": window["opened_at"],
        "closed_at": now,
        "closed_by": "count" if len(members) >= size else "deadline",
        "members": out_members,
        "distinct_devices": len({m["device_id"] for m in members}),
        "detector": {**stats, "flagged": sum(v != "accept" for v in verdicts),
                     "rejected": verdicts.count("reject"), "downweighted": verdicts.count("downweight")},
    }
