"""Tasks and batch adapters: known answers, validation messages, nested batches."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pwfn.errors import ConfigError
from pwfn.training.tasks import (
    BatchAdapter,
    ClassificationTask,
    CustomTask,
    LanguageModelTask,
    evaluate_task,
    resolve_task,
    to_device,
)


def test_to_device_walks_nested_batches():
    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.ones(2), "nested": [torch.zeros(1), (torch.ones(1), "text")], "p": Pair(torch.ones(1), 3)}
    out = to_device(batch, "cpu")
    assert out["nested"][1][1] == "text" and isinstance(out["p"], Pair) and out["p"].b == 3
    assert torch.equal(out["x"], batch["x"])


def test_batch_adapter_dicts_tuples_and_model_outputs():
    ad = BatchAdapter()
    inputs, targets = ad.split({"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)})
    assert set(inputs) == {"input_ids"} and targets.shape == (2,)
    assert ad.split((torch.ones(2), torch.zeros(2), "extra"))[1].shape == (2,)
    with pytest.raises(ConfigError, match="targets under 'labels'"):
        ad.split({"input_ids": torch.ones(2)})

    class Out:
        logits = torch.ones(2, 3)

    assert ad.unwrap(Out()).shape == (2, 3)
    assert ad.unwrap((torch.ones(2, 4), torch.zeros(1))).shape == (2, 4)
    assert BatchAdapter(output_key="pred").unwrap({"pred": torch.ones(1)}).shape == (1,)
    with pytest.raises(ConfigError, match="output_key"):
        ad.unwrap({"hidden": "x"})


def test_classification_metrics_and_validation():
    task = ClassificationTask()
    logits = torch.tensor([[2.0, 0.0, 0.0, 0, 0, 0, 0], [0.0, 3.0, 0, 0, 0, 0, 0], [1.0, 0.0, 0, 0, 0, 0, 0]])
    y = torch.tensor([0, 0, 0])
    m = task.finish(task.sums(logits, y))
    assert m["top1"] == pytest.approx(200 / 3) and m["top5"] == 100.0
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, y)))
    with pytest.raises(ConfigError, match="floating point.*task=bce"):
        task.validate(logits, torch.rand(3, 7), "training loader")
    with pytest.raises(ConfigError, match=r"labels range over \[0, 9\] but the model outputs 7 classes"):
        task.validate(logits, torch.tensor([0, 9, 1]), "training loader")
    with pytest.raises(ConfigError, match="language_model"):
        task.validate(torch.zeros(3, 4, 7), y, "training loader")


def test_regression_bce_and_lm_known_answers():
    reg = resolve_task("regression")
    out, t = torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])
    m = reg.finish(reg.sums(out, t))
    assert m["mse"] == pytest.approx(2.5) and m["mae"] == pytest.approx(1.5) and m["rmse"] == pytest.approx(math.sqrt(2.5))
    with pytest.raises(ConfigError, match="float targets"):
        reg.validate(out, torch.tensor([1, 2]), "loader")
    bce = resolve_task("bce_probs")
    p, soft = torch.tensor([[0.9, 0.2]]), torch.tensor([[0.8, 0.1]])
    mb = bce.finish(bce.sums(p, soft))
    assert mb["loss"] == pytest.approx(float(F.binary_cross_entropy(p, soft)))
    assert mb["accuracy@0.5"] == 100.0
    with pytest.raises(ConfigError, match="bce_probs needs probabilities.*use task=bce"):
        bce.validate(torch.tensor([[3.0, -1.0]]), soft, "loader")
    with pytest.raises(ConfigError, match="targets in \\[0, 1\\]"):
        resolve_task("bce").validate(p, torch.tensor([[2.0, 0.0]]), "loader")
    lm = LanguageModelTask()
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, -100, 2]])
    ml = lm.finish(lm.sums(logits, ids))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 5), ids[:, 1:].reshape(-1), ignore_index=-100)
    assert ml["loss"] == pytest.approx(float(ref), rel=1e-6) and ml["perplexity"] == pytest.approx(math.exp(float(ref)), rel=1e-6)
    with pytest.raises(ConfigError, match=r"token ids range over"):
        lm.validate(logits, torch.tensor([[1, 2, 3, 9], [0, 1, 2, 2]]), "loader")


def test_custom_task_and_evaluate_task():
    task = CustomTask(lambda o, t: (o - t).abs().mean(), metrics=lambda o, t: {"max_err": float((o - t).abs().max())},
                      primary="max_err")
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 2.0)
    loader = [(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [2.0]]))]
    m = evaluate_task(model, loader, "cpu", task)
    assert m["loss"] == pytest.approx(1.5) and m["max_err"] == pytest.approx(2.0)
    with pytest.raises(ConfigError, match="unknown task"):
        resolve_task("segmentation")
