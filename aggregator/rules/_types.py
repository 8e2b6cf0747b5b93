"""What the rules return and raise: :class:`AggregateResult`, :class:`PreconditionError`, :class:`RuleConfigError`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["AggregateResult", "PreconditionError", "RuleConfigError", "result", "to_list"]


class PreconditionError(ValueError):
    """The input violates a precondition of the rule (wrong shape, too few
    members for the assumed number of Byzantine members, non-finite values,
    mismatched weights, a parameter out of range, ...).

    It subclasses :class:`ValueError`, so callers that already catch
    ``ValueError`` keep working.
    """


class RuleConfigError(ValueError):
    """Unknown rule name, unknown/missing parameter or a parameter value that
    can never be valid (raised by :func:`aggregator.rules.aggregate` and
    :func:`aggregator.rules.validate_config`)."""


@dataclass(frozen=True)
class AggregateResult:
    """What every rule returns.

    Attributes
    ----------
    vector:
        The aggregate, shape ``(d,)``, always float64 (cast it to the model's
        dtype when applying it).
    selected:
        Sorted int64 indices (rows of ``updates``) of the members that
        contributed to ``vector``: the Krum winner, the Multi-Krum/Bulyan
        selection, FLAME's admitted cluster, members with non-zero weight or
        trust; every member for coordinate-wise rules.  May be empty (e.g.
        FLTrust when every trust score is 0); then ``vector`` is all zeros.
    info:
        Rule-specific, JSON-serialisable extras (Python scalars and lists
        only): scores, effective per-member ``weights``, ``clip_norm``,
        ``noise_std``, iteration counts, ...
    rule:
        Registry name of the rule that produced the result.
    """

    vector: np.ndarray
    selected: np.ndarray
    info: Mapping[str, Any] = field(default_factory=dict)
    rule: str = ""

    @property
    def n_selected(self) -> int:
        return int(self.selected.size)


def to_list(a: np.ndarray) -> list:
    """ndarray -> list of Python scalars, for JSON-serialisable ``info``."""
    return np.asarray(a).tolist()


def result(
    vector: np.ndarray,
    selected: Any,
    info: dict[str, Any],
    rule: str,
) -> AggregateResult:
    sel = np.asarray(selected, dtype=np.int64).reshape(-1)
    sel = np.sort(sel)
    return AggregateResult(vector=np.asarray(vector, dtype=np.float64), selected=sel, info=info, rule=rule)
