"""Unit tests for fedguard.tasks.backdoor: the BadNets trigger, applying it, and backdoor accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedguard.tasks import (TaskData, Trigger, apply_trigger, backdoor_accuracy, backdoor_eval_set, build_model,
                            load_task, model_spec, pixel_pattern, target_rate)




def _task(name: str, dim: int, n: int = 20, classes: int = 10, peak: float = 2.5) -> TaskData:
    """A tiny stand-in task (no data loading); the training maximum is ``peak``."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, size=(n, dim)).astype(np.float32)
    x[3, 0] = peak
    y = np.arange(n) % classes
    return TaskData(name, x, y, x.copy(), y.copy(), num_classes=classes, input_dim=dim)


# ------------------------------------------------------------------------------------------------ pixel_pattern


def test_pixel_pattern_fashion_mnist_is_a_4x4_square_bottom_right():
    trig = pixel_pattern(_task("fashion-mnist", 784))
    # rows 24..27, columns 24..27 of a 28x28 row-major image: r * 28 + c
    expected = [r * 28 + c for r in range(24, 28) for c in range(24, 28)]
    assert trig.indices.tolist() == expected
    assert expected[0] == 696 and expected[-1] == 783
    assert trig.value == pytest.approx(2.5) and trig.target == 0
    assert trig.indices.dtype == np.int64


def test_pixel_pattern_size_and_target():
    trig = pixel_pattern(_task("fashion-mnist", 784), size=2, target=7)
    assert trig.indices.tolist() == [26 * 28 + 26, 26 * 28 + 27, 27 * 28 + 26, 27 * 28 + 27]
    assert trig.target == 7


def test_pixel_pattern_digits_scales_to_2x2():
    # ceil(4 * 8 / 28) = 2: rows 6..7, columns 6..7 of an 8x8 image
    trig = pixel_pattern(_task("digits", 64))
    assert trig.indices.tolist() == [54, 55, 62, 63]
    # a full-size pattern covers the whole small image
    assert len(pixel_pattern(_task("digits", 64), size=28).indices) == 64


def test_pixel_pattern_synthetic_uses_the_last_features():
    assert pixel_pattern(_task("synthetic", 32)).indices.tolist() == [28, 29, 30, 31]
    assert pixel_pattern(_task("synthetic", 32), size=1).indices.tolist() == [31]


def test_pixel_pattern_value_is_the_training_maximum_on_real_tasks():
    task = load_task("synthetic")
    trig = pixel_pattern(task)
    assert trig.value == pytest.approx(float(task.x_train.max()))
    assert trig.value > 1.0  # standardised data: "white" is not 1.0


@pytest.mark.parametrize("kwargs", [{"size": 0}, {"size": 29}, {"size": 2.0}, {"target": 10}, {"target": -1},
                                    {"target": True}])
def test_pixel_pattern_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        pixel_pattern(_task("fashion-mnist", 784), **kwargs)


def test_pixel_pattern_rejects_more_features_than_the_task_has():
    with pytest.raises(ValueError, match="exceeds"):
        pixel_pattern(_task("synthetic", 32), size=33)


# ------------------------------------------------------------------------------------------------------ Trigger


def test_trigger_is_hashable_by_content_and_read_only():
    a = Trigger("t", np.array([3, 1, 1]), 2.0, 0)
    b = Trigger("t", np.array([1, 3]), 2.0, 0)
    assert a.indices.tolist() == [1, 3]  # sorted, unique
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Trigger("t", np.array([1, 3]), 2.0, 1)
    with pytest.raises(ValueError):
        a.indices[0] = 5


@pytest.mark.parametrize("indices, value, target", [([], 1.0, 0), ([-1], 1.0, 0), ([1], float("nan"), 0),
                                                    ([1], 1.0, -1), ([1], 1.0, 1.5)])
def test_trigger_rejects_bad_fields(indices, value, target):
    with pytest.raises(ValueError):
        Trigger("bad", np.array(indices, dtype=np.int64), value, target)


# -------------------------------------------------------------------------------------------------- apply_trigger


def test_apply_trigger_copies_and_sets_the_indices():
    x = np.zeros((2, 5), dtype=np.float32)
    x.flags.writeable = False  # cached task arrays are read-only
    out = apply_trigger(x, Trigger("t", np.array([1, 4]), 9.0, 0))
    assert out.tolist() == [[0, 9, 0, 0, 9], [0, 9, 0, 0, 9]]
    assert out.dtype == np.float32 and out.flags.writeable
    assert not x.any()


def test_apply_trigger_single_input_and_integer_input():
    trig = Trigger("t", np.array([0]), 3.5, 0)
    assert apply_trigger(np.array([1.0, 2.0]), trig).tolist() == [3.5, 2.0]
    out = apply_trigger(np.array([[1, 2]]), trig)
    assert out.dtype == np.float32 and out.tolist() == [[3.5, 2.0]]


def test_apply_trigger_rejects_inputs_that_are_too_short():
    with pytest.raises(ValueError, match="needs 5 features"):
        apply_trigger(np.zeros((1, 4)), Trigger("t", np.array([4]), 1.0, 0))
    with pytest.raises(ValueError):
        apply_trigger(np.zeros((1, 2, 3)), Trigger("t", np.array([0]), 1.0, 0))


# ---------------------------------------------------------------------------------------------- backdoor accuracy


def _threshold_model() -> nn.Module:
    """2 classes on 3 features: logit_0 = x_2, logit_1 = 1, so class 0 iff x_2 > 1."""
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 1.0]))
    return lin


def test_backdoor_accuracy_counts_non_target_inputs_classified_as_target():
    model = _threshold_model()
    x = np.array([[0, 0, 0], [5, 0, 0], [0, 0, 0], [0, 7, 0]], dtype=np.float32)
    y = np.array([0, 1, 1, 1])
    # trigger on feature 2 (value 3 > 1): every triggered input -> class 0; 3 non-target inputs -> 3/3
    assert backdoor_accuracy(model, x, y, Trigger("on", np.array([2]), 3.0, 0)) == 1.0
    # trigger on feature 0: x_2 stays 0 -> class 1 for all -> 0/3
    assert backdoor_accuracy(model, x, y, Trigger("off", np.array([0]), 3.0, 0)) == 0.0
    # target 1 with the feature-2 trigger: non-target = the one input of label 0, classified 0 -> 0/1
    assert backdoor_accuracy(model, x, y, Trigger("t1", np.array([2]), 3.0, 1)) == 0.0


def test_backdoor_accuracy_partial_and_batched():
    model = _threshold_model()
    # feature 0 triggered; x_2 decides: 2 > 1 (-> 0), 0.5 (-> 1), 4 (-> 0), 1.5 (-> 0) but that one is label 0
    x = np.array([[0, 0, 2], [0, 0, 0.5], [0, 0, 4], [0, 0, 1.5]], dtype=np.float32)
    y = np.array([1, 2, 1, 0])
    trig = Trigger("t", np.array([0]), 9.0, 0)
    assert backdoor_accuracy(model, x, y, trig) == pytest.approx(2 / 3)
    assert backdoor_accuracy(model, x, y, trig, batch_size=1) == pytest.approx(2 / 3)


def test_backdoor_accuracy_undefined_when_every_label_is_the_target():
    with pytest.raises(ValueError, match="no test input"):
        backdoor_accuracy(_threshold_model(), np.zeros((2, 3)), np.zeros(2, dtype=np.int64),
                          Trigger("t", np.array([0]), 1.0, 0))


def test_target_rate_restores_training_mode_and_validates():
    model = _threshold_model()
    model.train()
    assert target_rate(model, np.array([[0, 0, 5.0], [0, 0, 0]]), 0) == 0.5
    assert model.training
    with pytest.raises(ValueError):
        target_rate(model, np.zeros((0, 3)), 0)
    with pytest.raises(ValueError):
        target_rate(model, np.zeros((1, 3)), 0, batch_size=0)


def test_backdoor_eval_set_matches_backdoor_accuracy():
    task = load_task("synthetic")
    trig = pixel_pattern(task, target=3)
    xs = backdoor_eval_set(task, trig)
    assert xs.shape == (int((task.y_test != 3).sum()), task.input_dim)
    assert not xs.flags.writeable
    assert np.all(xs[:, trig.indices] == np.float32(trig.value))
    model = build_model(model_spec(task), seed=1)
    assert target_rate(model, xs, 3) == backdoor_accuracy(model, task.x_test, task.y_test, trig)
