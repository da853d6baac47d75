"""The shipped task classifier: its weights load without pickle and it labels fresh prompts."""

from __future__ import annotations

import numpy as np
import pytest

from kvrecall.tasktype import classifier
from kvrecall.tasktype.prompts import CATEGORIES, labelled_prompts
from kvrecall.v1 import kvrecall_pb2 as pb


def test_shipped_weights_are_plain_arrays():
    with np.load(classifier.WEIGHTS, allow_pickle=False) as data:
        assert set(data.files) == {"meta", "mean", "scale", "weight", "bias"}
    head = classifier.shipped()
    assert head.hidden_size == 576 and head.num_layers == 30 and 0 <= head.layer <= 30
    assert head.weight.shape == head.mean.shape == head.scale.shape == (2 * 576,)
    assert np.isfinite(head.weight).all() and (head.scale > 0).all()


def test_prompt_set_has_both_labels_and_held_out_phrasings():
    prompts = labelled_prompts(4, seed=5)
    assert len(prompts) == 4 * len(CATEGORIES)
    assert {p.label for p in prompts} == {pb.TASK_TYPE_LOCALIZATION, pb.TASK_TYPE_AGGREGATION}
    assert any(p.phrasing == 0 for p in prompts) and all(p.text.startswith("<|im_start|>") for p in prompts)


def test_explicit_hints_and_other_policies_pass_through():
    hint = {"budget": 64, "task": pb.TASK_TYPE_AGGREGATION}
    assert classifier.with_task(None, "windowkv", hint, None) is hint
    assert classifier.with_task(None, "snapkv", {"budget": 64}, None) == {"budget": 64}


@pytest.mark.model
def test_classifies_fresh_prompts_of_each_kind(smollm):
    model, tokenizer = smollm
    prompts = labelled_prompts(2, seed=12345)  # seeds the training run never drew
    predicted = [
        classifier.classify(model, tokenizer(p.text, return_tensors="pt").input_ids) for p in prompts
    ]
    for label in (pb.TASK_TYPE_LOCALIZATION, pb.TASK_TYPE_AGGREGATION):
        picked = [q == p.label for p, q in zip(prompts, predicted, strict=True) if p.label == label]
        assert sum(picked) / len(picked) >= 0.8, f"{pb.TaskType.Name(label)}: {sum(picked)}/{len(picked)}"
    config = classifier.with_task(
        model, "windowkv", {"budget": 64}, tokenizer(prompts[0].text, return_tensors="pt").input_ids
    )
    assert config == {"budget": 64, "task": predicted[0]}


def test_another_model_falls_back_to_localization_and_says_so(caplog):
    """No shipped head fits a non-SmolLM2 model: classify never raises, answers LOCALIZATION
    and logs the fallback once per model shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    ids = torch.arange(20)[None]
    with caplog.at_level("WARNING", logger="kvrecall.tasktype"):
        assert classifier.classify(model, ids) == classifier.FALLBACK == pb.TASK_TYPE_LOCALIZATION
        assert classifier.with_task(model, "windowkv", {"budget": 64}, ids) == {
            "budget": 64, "task": pb.TASK_TYPE_LOCALIZATION,
        }  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "fall back to TASK_TYPE_LOCALIZATION" in r.getMessage()]
    assert len(notes) == 1 and "hidden_size=64, num_hidden_layers=2" in notes[0]
