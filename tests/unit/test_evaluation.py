"""The aggregator's evaluation: main accuracy and backdoor accuracy per configured trigger, on every version."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aggregator.evaluation import BackdoorSpecError, Evaluator, parse_backdoors
from fedguard.tasks import build_model, get_flat_params, load_task, model_spec, set_flat_params
from fedguard.tasks.backdoor import apply_trigger


def test_parse_backdoors_names_each_trigger_by_its_spec_and_rejects_bad_ones():
    task = load_task("synthetic")
    triggers = parse_backdoors("pixel_pattern:0, pixel_pattern:3:2", task)
    assert [t.name for t in triggers] == ["pixel_pattern:0", "pixel_pattern:3:2"]
    assert [t.target for t in triggers] == [0, 3] and len(triggers[0].indices) == 4 and len(triggers[1].indices) == 2
    assert parse_backdoors("", task) == []
    for bad in ("square:0", "pixel_pattern", "pixel_pattern:x", "pixel_pattern:10", "pixel_pattern:1:2:3"):
        with pytest.raises(BackdoorSpecError):
            parse_backdoors(bad, task)


def test_backdoor_accuracy_is_the_share_of_triggered_non_target_inputs_sent_to_the_target():
    task = load_task("synthetic")
    (trigger,) = parse_backdoors("pixel_pattern:2", task)
    model = build_model(model_spec(task))
    evaluator = Evaluator(task, model, [trigger])
    # A model whose last layer always answers class 2: every triggered input goes to the target.
    with torch.no_grad():
        last = list(model.parameters())
        last[-2].zero_()
        last[-1].copy_(torch.tensor([0.0, 0, 5, 0, 0, 0, 0, 0, 0, 0]))
    out = evaluator(set_flat_params, get_flat_params(model))
    assert out["backdoor"] == {"pixel_pattern:2": 1.0} and out["backdoor_accuracy"] == 1.0
    assert out["accuracy"] == pytest.approx(np.mean(task.y_test == 2))
    # The definition, counted by hand on the model the evaluator built.
    fresh = build_model(model_spec(task), seed=1)
    params = get_flat_params(fresh)
    out = evaluator(set_flat_params, params)
    keep = task.y_test != 2
    with torch.no_grad():
        preds = fresh(torch.tensor(apply_trigger(task.x_test[keep], trigger))).argmax(1).numpy()
    assert out["backdoor_accuracy"] == pytest.approx(np.mean(preds == 2))
