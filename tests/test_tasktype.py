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


# Hand-written prompts in topics and phrasings that kvrecall.tasktype.prompts never produces
# (short, no shared templates), sent through the tokenizer's own chat template.


HANDWRITTEN_LOCALIZATION = [
    "The museum opened in 1921. Its first curator was Edith Marlowe, who catalogued the "
    "collection of Roman coins. In 1954 a fire destroyed the east wing, which was rebuilt "
    "in 1958 under the architect Tomas Brandt. The gift shop sells postcards and maps.\n\n"
    "Which architect rebuilt the east wing?",
    "Shipping manifest:\n- crate A17: ceramic tiles, 40 kg, port of Genoa\n- crate B02: "
    "olive oil, 120 kg, port of Valencia\n- crate C33: copper wire, 75 kg, port of Hamburg\n"
    "- crate D09: wool blankets, 30 kg, port of Oslo\n\nFrom which port did crate C33 leave?",
    "Meeting notes. Priya will book the venue. Jonas handles catering and must confirm "
    "the menu by Friday. Mei is responsible for the speaker list. The budget owner is "
    "Alvaro.\n\nQuestion: who is responsible for the catering?",
    "Here is a list of employee badges: Greta 4471, Samuel 9032, Ilse 1185, Oren 6620, "
    "Kaveh 3307. What badge number does Ilse have?",
    "In the novel, the lighthouse keeper keeps a red notebook hidden under the third stair. "
    "The children later find a brass key inside the clock. The storm arrives on the ninth "
    "night.\n\nWhere is the red notebook hidden?",
    "Config file:\nmax_connections = 250\ntimeout_ms = 4000\nretry_limit = 7\n"
    "log_dir = /var/log/app\n\nWhat value does retry_limit have?",
]

HANDWRITTEN_AGGREGATION = [
    "Email 1: The server was slow on Monday. Email 2: We upgraded the database on Tuesday. "
    "Email 3: Users reported faster pages on Wednesday. Email 4: Costs rose by ten percent.\n\n"
    "Write a two-sentence summary of this email thread.",
    "Translate each word to French, following the examples.\ncat -> chat\ndog -> chien\n"
    "house -> maison\nbread -> pain\nwater ->",
    "Write a Python function `mean_of_squares(xs)` that returns the mean of the squares of "
    "a list of numbers, with a docstring and a check for the empty list.",
    "Reviews: 'Great battery, poor screen.' 'Screen is dim, battery lasts days.' "
    "'Love the battery.' 'The screen scratches easily.'\n\nWhat do the reviewers think "
    "overall? Give the general sentiment about battery and screen.",
    "Count how many times the word 'river' appears in this text: The river bends near the "
    "mill. Children swim in the river. The old river road floods each spring, and the river "
    "carries leaves to the sea.",
    "Here are the quarterly sales: Q1 120, Q2 135, Q3 150, Q4 170. Describe the overall "
    "trend over the year in a short paragraph.",
]


@pytest.mark.model
def test_classifies_handwritten_prompts_better_than_a_constant_guess(smollm):
    """Measured (2026-11-30): 8 of 12 right: AGGREGATION 5/6 (the email-thread summary reads
    as LOCALIZATION); LOCALIZATION 3/6 (list-shaped lookups, a badge list and a config file,
    read as AGGREGATION). The floor keeps what holds: better than any constant answer, and at
    least half of each kind."""
    model, tokenizer = smollm
    right = {}
    for label, prompts in (
        (pb.TASK_TYPE_LOCALIZATION, HANDWRITTEN_LOCALIZATION),
        (pb.TASK_TYPE_AGGREGATION, HANDWRITTEN_AGGREGATION),
    ):
        ids = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
            for text in prompts
        ]
        right[pb.TaskType.Name(label)] = sum(classifier.classify(model, x) == label for x in ids)
    assert sum(right.values()) >= 8 and min(right.values()) >= 3, right


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
    classifier._log_fallback.cache_clear()  # an earlier test in this process may have logged this shape
    with caplog.at_level("WARNING", logger="kvrecall.tasktype"):
        assert classifier.classify(model, ids) == classifier.FALLBACK == pb.TASK_TYPE_LOCALIZATION
        assert classifier.with_task(model, "windowkv", {"budget": 64}, ids) == {
            "budget": 64, "task": pb.TASK_TYPE_LOCALIZATION,
        }  # fmt: skip
    notes = [r.getMessage() for r in caplog.records if "fall back to TASK_TYPE_LOCALIZATION" in r.getMessage()]
    assert len(notes) == 1 and "hidden_size=64, num_hidden_layers=2" in notes[0]
