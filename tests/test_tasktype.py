"""The shipped task classifier: plain weights, held-out accuracy, any model, and the fallbacks
(the classifier's and the daemon's) named in the logs."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import torch

from kvrecall.tasktype import classifier
from kvrecall.tasktype.features import FeatureConfig, featurise, normalise
from kvrecall.tasktype.prompts import (
    FAMILIES,
    HELD_OUT,
    expansions,
    generated,
    handwritten,
    harness,
)
from kvrecall.tasktype.train import Rows, predict, train
from kvrecall.v1 import kvrecall_pb2 as pb

REPORT = pathlib.Path(__file__).parents[1] / "bench/results/2026-11-30-cpu-tasktype-text.json"
AGG, LOC = pb.TASK_TYPE_AGGREGATION, pb.TASK_TYPE_LOCALIZATION


def accuracy(prompts) -> float:
    return float(np.mean([classifier.classify(p.text) == p.label for p in prompts]))


def test_shipped_weights_are_small_plain_arrays():
    assert classifier.WEIGHTS.stat().st_size < 256 * 1024
    with np.load(classifier.WEIGHTS, allow_pickle=False) as data:
        assert set(data.files) == {"features", "weight", "bias"}
    head = classifier.shipped()
    assert head.weight.shape == (head.features.n_features,) and head.weight.dtype == np.float32
    assert np.isfinite(head.weight).all() and np.isfinite(head.bias)
    assert head.features == FeatureConfig()  # the weights were trained on today's featurisation


def test_held_out_wordings_are_not_training_expansions():
    """dev and held-out prompts use sentences no training grammar can produce."""

    def key(text: str) -> str:
        return re.sub(r"[^a-z0-9{} ]", "", text.lower()).strip()

    trained = {key(e) for family in FAMILIES.values() for t in family.train for e in expansions(t)}
    assert set(HELD_OUT) == set(FAMILIES)
    for name, family in FAMILIES.items():
        for sentence in (*family.dev, *HELD_OUT[name]):
            assert key(sentence) not in trained, (name, sentence)


def test_held_out_accuracy():
    """Measured (bench/results/2026-11-30-cpu-tasktype-text.json): 0.827 on 1,100 held-out
    prompts (LOCALIZATION 0.90, AGGREGATION 0.75); 0.805 on these first 220 (0.86 / 0.75).
    The eval harness's prompts: 72 / 84 (every niah_multivalue prompt reads as AGGREGATION);
    hand-written: 11 / 12 (the meeting-notes lookup reads as AGGREGATION). Floors leave margin."""
    prompts = generated(220, "heldout")
    by_label = {label: accuracy([p for p in prompts if p.label == label]) for label in (LOC, AGG)}
    assert accuracy(prompts) >= 0.72 and min(by_label.values()) >= 0.62, by_label
    assert accuracy(harness()) >= 0.8
    assert accuracy(handwritten()) >= 10 / 12


def test_report_matches_the_shipped_weights():
    """The report's held-out figures are the shipped head's (recomputed on a slice)."""
    report = json.loads(REPORT.read_text())
    assert report["weights"] == classifier.WEIGHTS.name and report["features"] == vars(FeatureConfig())
    assert report["sets"]["handwritten"]["accuracy"] == round(accuracy(handwritten()), 4)
    assert report["sets"]["harness"]["accuracy"] == round(accuracy(harness()), 4)


def test_training_reproduces_the_shipped_accuracy_on_a_small_run(tmp_path):
    """A fifth of the training set, one L2 strength: held-out accuracy near the shipped head's
    (measured: 0.745 on 220 prompts, 8 s, against the shipped 0.827 on 1,100)."""
    head, report = train(880, 220, l2s=(1e-4,))
    shipped = json.loads(REPORT.read_text())["sets"]["heldout"]["accuracy"]
    assert report["sets"]["train"]["accuracy"] >= 0.99
    assert report["sets"]["heldout"]["accuracy"] >= shipped - 0.12, (report["sets"]["heldout"], shipped)
    head.save(tmp_path / "head.npz")
    again = classifier.TaskClassifier.load(tmp_path / "head.npz")
    rows = Rows.of(generated(40, "heldout", seed=3), again.features)
    assert (predict(again, rows) == predict(head, rows)).all()


def test_unreadable_prompts_get_the_fallback_named_once_per_reason(caplog):
    classifier._log_fallback.cache_clear()
    with caplog.at_level("WARNING", logger="kvrecall.tasktype"):
        for prompt in ("", "   ", "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n", "", []):
            assert classifier.classify(prompt) == classifier.FALLBACK == LOC
        assert classifier.classify([1, 2, 3]) == LOC  # token ids, no tokenizer
        assert classifier.with_task("windowkv", {"budget": 64}, "") == {"budget": 64, "task": LOC}
    notes = [r.getMessage() for r in caplog.records]
    empty = [n for n in notes if "no text to read" in n]
    assert len(empty) == 1 and "falls back to TASK_TYPE_LOCALIZATION" in empty[0]
    assert sum("no tokenizer" in n and "TASK_TYPE_LOCALIZATION" in n for n in notes) == 1


def test_odd_input_never_raises(caplog):
    class Broken:
        all_special_tokens = ()

        def decode(self, ids, skip_special_tokens=False):
            raise RuntimeError("no vocabulary")

    classifier._log_fallback.cache_clear()
    long_prompt = "Summarize the report below.\n\n" + "The market was busy. " * 200_000
    for prompt, tokenizer in (
        (long_prompt, None),
        ("Quel est le code secret mentionné dans le texte ? 秘密のコードは何ですか", None),
        ("🙂" * 1000, None),
        (None, None),
        (3.5, None),
        (torch.tensor([[5, 6, 7]]), Broken()),
    ):
        assert classifier.classify(prompt, tokenizer) in (LOC, AGG)
    assert classifier.classify(long_prompt) == AGG
    assert any("could not decode" in r.getMessage() for r in caplog.records)


def test_featurisation_reads_only_the_head_and_tail():
    config = FeatureConfig()
    middle = "noise " * 10_000
    a, b = "What is the value of retry_limit?", "Count how often the word amber occurs."
    one, two = featurise(f"{a}\n{middle}\n{b}", config), featurise(f"{a}\n{middle}zzz {middle}\n{b}", config)
    assert (one[0] == two[0]).all() and (one[1] == two[1]).all()
    assert normalise("<|start_header_id|>user<|end_header_id|>\n\nRoom 42? [INST] Hi [/INST]") == "user room 0? hi"
    assert featurise("", config)[0].size == 0


def test_explicit_hints_and_other_policies_pass_through():
    hint = {"budget": 64, "task": AGG}
    assert classifier.with_task("windowkv", hint, "What is the code?") is hint
    assert classifier.with_task("snapkv", {"budget": 64}, "Summarize this.") == {"budget": 64}


def _tiny_tokenizer():
    """A byte-level BPE tokenizer trained here, offline, with Llama 3 style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [p.text for p in generated(200, "train", seed=9)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        additional_special_tokens=specials[1:3],
    )  # fmt: skip


def test_any_model_through_its_own_tokenizer():
    """A model that is not SmolLM2 (a random Llama with its own tokenizer): the serving path
    (session_plan) and the eval path (token ids + tokenizer) classify its prompts from their
    decoded text, as the text path does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrecall.serve.generation import GenerationRequest, session_plan

    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer),
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    for document, question, label in (
        ("The access code of room 12 is 4471. The lamps were lit.", "What is the access code of room 12?", LOC),
        ("Email 1: the server was slow. Email 2: we upgraded the database.", "Summarize this email thread.", AGG),
    ):
        text = (
            f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{document}\n\n{question}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            assert model(input_ids=torch.tensor([ids])).logits.shape[-1] == len(tokenizer)
        assert classifier.classify(ids, tokenizer) == classifier.classify(text) == label
        request = GenerationRequest(prompt_ids=ids, max_tokens=8, policy="windowkv", policy_config={"budget": 64})
        assert session_plan(request, tokenizer)[1]["task"] == label
    for prompt in generated(30, "heldout", seed=4) + harness(lengths=(2000,), seeds=1):
        ids = tokenizer(prompt.text, add_special_tokens=False).input_ids
        assert classifier.classify(ids, tokenizer) == classifier.classify(prompt.text)


def test_daemon_names_the_session_and_mode_it_falls_back_to(daemon, client):
    from kvrecall.client.core import ModelSpec

    spec = ModelSpec(
        num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=256
    )
    base = {"budget": 48, "n_sink": 4, "window": 32, "window_size": 8, "group_size": 2}
    with client.open_session(spec, "windowkv", base) as unset:
        assert unset.observation == 32  # localisation's suffix
    with client.open_session(spec, "windowkv", dict(base, task="TASK_TYPE_AGGREGATION")) as hinted:
        assert hinted.observation == 16
    lines = daemon.log().splitlines()
    notes = [line for line in lines if f"session {unset.session_id}: windowkv task unset" in line]
    assert len(notes) == 1 and "falling back to TASK_TYPE_LOCALIZATION" in notes[0], lines[-20:]
    assert not any(f"session {hinted.session_id}: windowkv task unset" in line for line in lines)
