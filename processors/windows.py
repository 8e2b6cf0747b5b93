"""Window state per model: pure functions over a JSON-serialisable dict, so a Faust table can hold it.

A window collects the validated updates of one base model version and closes when it has ``size`` members or
``deadline_s`` after its first member arrived, whichever comes first. One window per base version: an update
for a version whose window already closed is late and is not aggregated (it is counted).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from processors.detectors import norm_outliers

State = dict[str, Any]


def empty_state() -> State:
    return {"open": {}, "closed_upto": -1}


def add_member(state: State, entry: dict[str, Any], now: float, size: int) -> tuple[State, str]:
    """Add one index entry. Returns the new state and what happened: ``added``, ``duplicate``, ``late``, ``full``."""
    base = int(entry["base_version"])
    if base <= state["closed_upto"]:
        return state, "late"
    key = str(base)
    window = state["open"].setdefault(key, {"opened_at": now, "members": []})
    if any(m["update_id"] == entry["update_id"] for m in window["members"]):
        return state, "duplicate"  # the same valid record delivered twice (at-least-once)
    window["members"].append(entry)
    return state, "full" if len(window["members"]) >= size else "added"


def due_windows(state: State, now: float, size: int, deadline_s: float) -> list[int]:
    return sorted(int(k) for k, w in state["open"].items()
                  if len(w["members"]) >= size or now - w["opened_at"] >= deadline_s)


def close_window(state: State, base_version: int, model_id: str, now: float, size: int,
                 z_threshold: float) -> tuple[State, dict[str, Any]]:
    """Remove the window from ``state`` and build its ``fl.windows`` record, with detector scores and verdicts."""
    window = state["open"].pop(str(base_version))
    state["closed_upto"] = max(state["closed_upto"], base_version)
    members = window["members"]
    scores, flagged = norm_outliers(np.array([m["norm"] for m in members]), z_threshold)
    out_members = []
    for member, score, flag in zip(members, scores, flagged):
        out_members.append({**member, "scores": {"norm_z": float(score) if np.isfinite(score) else None},
                            "verdict": "reject" if flag else "accept",
                            "weight": 0.0 if flag else float(member["num_samples"])})
    record = {
        "window_id": f"{model_id}:{base_version}",
        "model_id": model_id,
        "base_version": base_version,
        "opened_at": window["opened_at"],
        "closed_at": now,
        "closed_by": "count" if len(members) >= size else "deadline",
        "members": out_members,
        "detector": {"name": "norm_modified_z", "threshold": z_threshold,
                     "flagged": int(flagged.sum()), "median_norm": float(np.median([m["norm"] for m in members]))},
    }
    return state, record
