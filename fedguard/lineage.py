"""The lineage of model versions with their audit verdicts, and operator rollback (issue 14, item 3).

``fedguard versions`` prints :func:`lineage` (every version's parent, where its parameters came from, how it was
made, its audit verdict, accuracy, backdoor accuracy, and whether its weights are still stored) with
:func:`format_lineage`. The rows come from the model store's metadata, which retention never deletes.

``fedguard rollback --to V`` (:func:`request_rollback`) does not write a version: the aggregator is the only
writer (one version per window, a gapless chain). The CLI checks the operator credential and that version ``V``
exists with its weights, then leaves a request in Redis; the aggregator, before its next window and every half
second when idle (:func:`pending_rollback`), publishes version ``N + 1`` with the parameters of ``V``
(``rule_info.params_from = V``, ``rule_info.rollback = {to, by, reason, request_id, requested_at}``) and removes the
request (:func:`clear_rollback`; only that request: a newer one written meanwhile stays). A window of the
versions before the rollback still in flight is then stale and skipped.

Redis key owned here (namespaced by ``Settings.redis_prefix``):

| key | type | holds |
|---|---|---|
| ``fedguard:model:<model id>:rollback`` | string | the pending rollback request (JSON: id, to, from, reason, by, requested_at); written by the CLI, removed by the aggregator once applied or refused |
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import redis

from fedguard import operator, registry
from fedguard.modelstore import ModelStore
from fedguard.settings import Settings

__all__ = ["RollbackError", "clear_rollback", "format_lineage", "lineage", "pending_rollback", "request_rollback",
           "rollback_key", "rollback_target", "version_outcome"]

# Delete the request only if it is still the one applied (a newer request written meanwhile stays pending).
CLEAR_IF_SAME_LUA = r"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RollbackError(ValueError):
    """A rollback that cannot be done; the message is one line and says what to do instead."""


def rollback_key(settings: Settings) -> str:
    return settings.redis_key("model", settings.model_id, "rollback")


# -- lineage ------------------------------------------------------------------------------------------------------

def version_outcome(meta: dict[str, Any]) -> str:
    """How a version's parameters were made: initial, applied, flagged (audit: the last served parameters carried
    over), rollback, rule_skipped or failed (the parent's parameters carried over)."""
    info = meta.get("rule_info") or {}
    if meta.get("parent") is None:
        return "initial"
    if info.get("rollback"):
        return "rollback"
    if (meta.get("audit") or {}).get("verdict") == "flagged":
        return "flagged"
    if info.get("failed"):
        return "failed"
    if info.get("skipped"):
        return "rule_skipped"
    return "applied"


def _row(meta: dict[str, Any], has_weights: bool) -> dict[str, Any]:
    audit = meta.get("audit") or {}
    metrics = meta.get("metrics") or {}
    info = meta.get("rule_info") or {}
    outcome = version_outcome(meta)
    note = {"rollback": lambda: f"rollback to {info['rollback'].get('to')} by {info['rollback'].get('by')}"
                                f"{': ' + info['rollback']['reason'] if info['rollback'].get('reason') else ''}",
            "failed": lambda: info.get("failed", ""), "rule_skipped": lambda: info.get("skipped", ""),
            "flagged": lambda: "attributed: " + (", ".join(audit.get("attributed") or []) or "nobody") + (
                f" (suspected, unconfirmed: {', '.join(audit['suspected'])})" if audit.get("suspected") else "")
            }.get(outcome, lambda: audit.get("why", "") if audit.get("verdict") == "clean" else "")()
    # the remembered triggers' work (docs/audit.md): found in earlier windows by a flag's look-back, screened out
    found = sorted((audit.get("look_back") or {}).get("screened") or {})
    screened = list((audit.get("screened") or {}).get("screened") or [])
    extra = ([f"look-back: {', '.join(found)}"] if found else []) + (
        [f"screened out: {', '.join(screened)}"] if screened else [])
    note = "; ".join([n for n in [note] if n] + extra)
    return {"version": meta["version"], "parent": meta.get("parent"), "round": meta.get("round"),
            "params_from": info.get("params_from"), "outcome": outcome, "audit": audit.get("verdict"),
            "audit_class": (audit.get("scores") or {}).get("flagged") if audit.get("verdict") == "flagged" else None,
            "audit_reasons": (audit.get("scores") or {}).get("reasons") or [],
            "attributed": list(audit.get("attributed") or []), "look_back": found, "screened": screened,
            "accuracy": metrics.get("accuracy"),
            "backdoor_accuracy": metrics.get("backdoor_accuracy"), "weights": has_weights,
            "window_id": meta.get("window_id"), "created_at": meta.get("created_at"), "note": note}


def lineage(store: ModelStore, last: int | None = None) -> list[dict[str, Any]]:
    """One row per stored version (the last ``last`` of them), oldest first."""
    versions = store.versions()
    if last is not None:
        versions = versions[-last:] if last > 0 else []
    return [_row(store.meta(v), store.has_weights(v)) for v in versions]


def _cell(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:.4f}"
    return str(value)


def format_lineage(rows: list[dict[str, Any]]) -> list[str]:
    """``fedguard versions``' table: one line per row, a header first."""
    header = (f"{'version':>7} {'parent':>6} {'from':>6} {'outcome':<12} {'audit':<8} {'class':>5} "
              f"{'accuracy':>8} {'backdoor':>8} {'weights':<7} note")
    lines = [header]
    for r in rows:
        lines.append(f"{r['version']:>7} {_cell(r['parent']):>6} {_cell(r['params_from']):>6} {r['outcome']:<12} "
                     f"{_cell(r['audit']):<8} {_cell(r['audit_class']):>5} {_cell(r['accuracy'], 'rate'):>8} "
                     f"{_cell(r['backdoor_accuracy'], 'rate'):>8} {'yes' if r['weights'] else 'pruned':<7} "
                     f"{r['note']}".rstrip())
    return lines


# -- rollback -----------------------------------------------------------------------------------------------------

def rollback_target(store: ModelStore, to: int) -> int:
    """``to`` if the aggregator can roll back to it now (it exists, is not the latest version, and its weights are
    stored), else :class:`RollbackError` with a hint."""
    versions = store.versions()
    if not versions:
        raise RollbackError(f"no model versions in {store.root}; start the pipeline first (fedguard up)")
    latest = versions[-1]
    if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to <= latest:
        raise RollbackError(f"no version {to!r}: versions are 0..{latest} (fedguard versions lists them)")
    if to == latest:
        raise RollbackError(f"version {to} is the current version: nothing to roll back (pick an earlier one from "
                            f"fedguard versions)")
    if not store.has_weights(to):
        kept = [v for v in versions if store.has_weights(v) and v != latest]
        nearest = sorted(kept, key=lambda v: abs(v - to))[:5]
        raise RollbackError(f"the weights of version {to} were deleted by the model store's retention; versions "
                            f"with weights near it: {', '.join(map(str, sorted(nearest))) or 'none'}")
    return to


def request_rollback(client: redis.Redis, settings: Settings, store: ModelStore, to: int, reason: str = "",
                     *, token: str | None = None, by: str = "operator") -> dict[str, Any]:
    """Ask the aggregator to publish the next version with the parameters of version ``to``. Checks the operator
    credential (:func:`fedguard.operator.verify`: ``OperatorAuthError``) and the target (:func:`rollback_target`:
    ``RollbackError``) before anything is written; a request still pending is replaced. Returns the request."""
    operator.verify(client, settings, token)
    rollback_target(store, to)
    request = {"id": secrets.token_hex(6), "to": to, "from": store.versions()[-1], "reason": reason.strip(),
               "by": by, "requested_at": round(time.time(), 3)}
    client.set(rollback_key(settings), json.dumps(request, sort_keys=True))
    registry.audit(client, settings, "rollback", None, f"to version {to}" + (f": {reason.strip()}" if reason else ""))
    return request


def pending_rollback(client: redis.Redis, settings: Settings) -> dict[str, Any] | None:
    """The pending request, or None. A request that is not valid JSON with an integer ``to`` is returned as
    ``{"invalid": <text>}`` so the aggregator can refuse it (and remove it) with a log line."""
    text = client.get(rollback_key(settings))
    if text is None:
        return None
    try:
        request = json.loads(text)
    except ValueError:
        return {"invalid": text}
    if not isinstance(request, dict) or isinstance(request.get("to"), bool) or not isinstance(request.get("to"), int):
        return {"invalid": text}
    return {**request, "raw": text}


def clear_rollback(client: redis.Redis, settings: Settings, request: dict[str, Any]) -> bool:
    """Remove ``request`` (from :func:`pending_rollback`) if it is still the pending one."""
    raw = request.get("raw", request.get("invalid"))
    return bool(client.eval(CLEAR_IF_SAME_LUA, 1, rollback_key(settings), raw))
