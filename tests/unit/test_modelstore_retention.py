"""Model store retention: which weights are kept, and that pruning keeps every version's metadata."""

import numpy as np
import pytest

from fedguard.modelstore import ModelStore, WeightsPruned, weights_to_keep


def test_keeps_the_last_n_every_kth_and_pinned():
    versions = list(range(0, 23))
    assert weights_to_keep(versions, keep_last=3, keep_every=10) == {0, 10, 20, 21, 22}
    assert weights_to_keep(versions, keep_last=3, keep_every=10, pinned={7, 99}) == {0, 7, 10, 20, 21, 22}


def test_degenerate_inputs():
    assert weights_to_keep([], 3, 10) == set()
    assert weights_to_keep([5], 1, 10) == {5}  # the latest is always kept, even off the checkpoint grid
    assert weights_to_keep([1, 2, 3], 10, 1) == {1, 2, 3}  # keep_every=1 keeps everything
    with pytest.raises(ValueError):
        weights_to_keep([1], 0, 10)
    with pytest.raises(ValueError):
        weights_to_keep([1], 1, 0)


def test_prune_deletes_weights_keeps_metadata_and_pins(tmp_path):
    store = ModelStore(tmp_path)
    for v in range(12):
        store.save(v, np.full(4, v, np.float32), {"parent": v - 1, "pinned": v == 3})
    pruned = store.prune(keep_last=2, keep_every=5)
    assert pruned == [1, 2, 4, 6, 7, 8, 9]
    assert store.versions() == list(range(12))  # the lineage stays
    assert [v for v in range(12) if store.has_weights(v)] == [0, 3, 5, 10, 11]
    assert store.load(11).params[0] == 11 and store.latest().version == 11
    with pytest.raises(WeightsPruned, match="retention"):
        store.load(7)
    assert store.meta(7)["parent"] == 6
    assert store.prune(keep_last=2, keep_every=5) == []  # idempotent
