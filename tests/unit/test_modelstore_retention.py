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


def test_triggers_round_trip_committed_only_oldest_first(tmp_path):
    """The audit's reversed triggers survive a restart exactly (float32), and only those of versions whose metadata
    was committed count: the trigger is written before its version."""
    store = ModelStore(tmp_path)
    for v in range(6):
        store.save(v, np.full(4, v, np.float32), {"parent": v - 1})
    rng = np.random.default_rng(0)
    saved = {v: (t, rng.random(10), rng.normal(size=10)) for v, t in ((2, 3), (4, 1), (5, 7), (9, 0))}  # float64 in
    for v, (target, mask, pattern) in saved.items():
        store.save_trigger(v, target, mask, pattern)
    got = store.triggers(10)
    assert [g[0] for g in got] == [2, 4, 5]  # version 9 has no metadata yet
    for version, target, mask, pattern in got:
        assert target == saved[version][0] and type(target) is int
        assert mask.dtype == pattern.dtype == np.float32
        np.testing.assert_array_equal(mask, saved[version][1].astype(np.float32))
        np.testing.assert_array_equal(pattern, saved[version][2].astype(np.float32))
    assert [g[0] for g in store.triggers(2)] == [4, 5]
    assert store.triggers(0) == [] and store.triggers(-1) == []
    for v in range(6, 10):
        store.save(v, np.full(4, v, np.float32), {"parent": v - 1})
    assert [g[0] for g in store.triggers(2)] == [5, 9]
    store.save_trigger(4, 8, np.ones(10), np.zeros(10))  # the same version again: replaced
    assert [(g[0], g[1]) for g in store.triggers(10)] == [(2, 3), (4, 8), (5, 7), (9, 0)]
    assert ModelStore(tmp_path).triggers(1)[0][0] == 9  # read back by a new store (a restart)


def test_prune_leaves_trigger_files_alone(tmp_path):
    store = ModelStore(tmp_path)
    for v in range(8):
        store.save(v, np.full(4, v, np.float32), {"parent": v - 1})
    for v in (1, 3, 8):  # 8: a trigger whose version was never committed (a crash in between)
        store.save_trigger(v, 0, np.full(5, v, np.float32), np.zeros(5, np.float32))
    assert store.versions() == list(range(8))  # trigger files are not versions
    assert store.prune(keep_last=1, keep_every=100) == [1, 2, 3, 4, 5, 6]
    assert [v for v in range(8) if store.has_weights(v)] == [0, 7]
    assert sorted(p.name for p in tmp_path.glob("t*")) == ["t000001.safetensors", "t000003.safetensors",
                                                          "t000008.safetensors"]
    assert [(v, float(m[0])) for v, _, m, _ in store.triggers(4)] == [(1, 1.0), (3, 3.0)]  # weights gone, kept
    assert store.prune(keep_last=1, keep_every=100) == []
    assert store.latest().version == 7
