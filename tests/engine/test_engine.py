"""The batched decode engine against a real daemon: exact where the budget covers the
sequence, and a batch decodes like its sequences alone."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.errors import InvalidArgumentError
from kvrecall.client.hf import spec_for
from kvrecall.engine import DecoderWeights, Engine
from kvrecall.engine import engine as engine_module
from kvrecall.engine.engine import adaptive_stay
from kvrecall.kernels._triton import interpreter_ready

transformers = pytest.importorskip("transformers")

POLICIES = [
    ("full", None),
    ("louiskv", {"budget": 256, "threshold": 0.9}),
    ("quest", {"budget": 256, "page_size": 8}),
    ("snapkv", {"budget": 256}),
]
PROMPTS = (40, 57, 75, 90)
STEPS = 20


def tiny_llama_model():
    """A 2-layer Llama with random weights (seed 0), GQA 4:2, vocab 128."""
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_llama_model()


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g) for n in PROMPTS]


def decode(engine: Engine, client, model, picks, steps: int, deferred: bool = False):
    """Add each (policy, config, prompt) to the engine, decode `steps`; per sequence the
    tokens and the logits of every step. `deferred`: sessions with deferred eviction."""
    slots, logits = [], {}
    spec = spec_for(model, max_tokens=512)
    sessions = []
    for policy, config, prompt in picks:
        session = client.open_session(spec, policy, config, deferred_eviction=deferred)
        assert session.core.deferred == deferred
        sessions.append(session)
        slot = engine.add(session, prompt)
        slots.append(slot)
        logits[slot] = []
    for _ in range(steps):
        engine.step()
        for slot in slots:
            logits[slot].append(engine.logits[slot].clone())
    out = []
    for slot, session in zip(slots, sessions, strict=True):
        seq = engine.remove(slot)
        out.append((seq, torch.stack(logits[slot])))
        session.close()
    return out


TRITON = pytest.mark.skipif(not interpreter_ready(), reason="needs TRITON_INTERPRET=1")


@pytest.mark.parametrize(
    ("impl", "lag", "deferred", "overlap", "switch"),
    [("reference", 0, False, False, "fixed"), ("reference", 2, False, False, "fixed"),
     ("reference", 0, True, False, "fixed"), ("reference", 2, True, False, "fixed"),
     ("reference", 1, True, True, "fixed"), ("reference", 2, True, True, "fixed"),
     ("reference", 3, True, False, "answered"), ("reference", 3, True, True, "answered"),
     ("reference", 3, True, True, "patient"), ("reference", 3, True, True, "adaptive"),
     pytest.param("triton", 0, False, False, "fixed", marks=TRITON),
     pytest.param("triton", 2, True, False, "fixed", marks=TRITON)],
)  # fmt: skip
def test_batch_matches_full_attention_with_a_covering_budget(daemon, tiny_llama, impl, lag, deferred, overlap, switch):
    """Four sequences of different lengths and policies in one batch: every step's logits equal
    transformers' full-attention forward over the same tokens (fp32, 1e-4), whether retrievals
    serve the next step (lag 0) or two steps later (lag 2: boundaries off the critical path),
    whether steps wait for their AppendNotices or not (deferred eviction: the evicted
    tokens the daemon places into free retrieved slots are read from the ring until the
    answer is taken, then from there), and with each step launched before the host work of
    the one before (overlap), and whenever a crossed slot leaves its shadow (switch="answered":
    as soon as its answer is in)."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engine = Engine(weights, batch=4, max_capacity=1024, impl=impl, lag=lag, overlap=overlap, keep_logits=overlap,
                    switch=switch)  # fmt: skip
    picks = [(p, c, prompt) for (p, c), prompt in zip(POLICIES, prompts(128), strict=True)]
    with KVRecallClient(daemon.target, "engine-test") as client:
        results = decode(engine, client, tiny_llama, picks, STEPS, deferred)
    engine.close()
    for (policy, _, prompt), (seq, logits) in zip(picks, results, strict=True):
        tokens = torch.cat([prompt, torch.tensor(seq.tokens[:-1])])
        with torch.no_grad():
            expected = tiny_llama(tokens[None]).logits[0, len(prompt) :]
        assert expected.shape == logits.shape
        diff = (expected - logits).abs().max().item()
        assert diff < 1e-4, f"{policy}: logits differ by {diff}"
        assert seq.appends >= 1, f"{policy}: the window never spilled"
    louiskv = results[1][0]
    assert louiskv.boundaries >= 1, "louiskv crossed no boundary: the test exercises no retrieval"


@pytest.mark.parametrize(("deferred", "overlap"), [(False, False), (True, False), (True, True)])
def test_batch_decodes_like_each_sequence_alone(daemon, tiny_llama, deferred, overlap):
    """Tight budgets (retrieval matters): a batch of 4 gives each sequence the tokens it gets
    alone in a batch of one (with deferred eviction too: what a step reads does not depend on
    when the daemon answers, nor on which other sessions share its calls; and with overlap,
    where the host's work runs while the next step decodes)."""
    weights = DecoderWeights.from_hf(tiny_llama)
    tight = [("louiskv", {"budget": 16, "n_sink": 4, "window": 32, "threshold": 0.9}),
             ("quest", {"budget": 16, "n_sink": 4, "window": 32, "page_size": 4}),
             ("snapkv", {"budget": 16, "n_sink": 4, "window": 32}),
             ("streaming", {"n_sink": 4, "window": 32})]  # fmt: skip
    picks = [(p, c, prompt) for (p, c), prompt in zip(tight, prompts(128), strict=True)]
    with KVRecallClient(daemon.target, "engine-test") as client:
        together = Engine(weights, batch=4, max_capacity=1024, overlap=overlap, keep_logits=overlap)
        batched = decode(together, client, tiny_llama, picks, STEPS, deferred)
        together.close()
        alone = []
        for pick in picks:
            single = Engine(weights, batch=1, max_capacity=1024, overlap=overlap, keep_logits=overlap)
            alone += decode(single, client, tiny_llama, [pick], STEPS, deferred)
            single.close()
    for (policy, _, _), (seq_b, logits_b), (seq_a, logits_a) in zip(picks, batched, alone, strict=True):
        assert seq_b.tokens == seq_a.tokens, policy
        assert seq_b.boundaries == seq_a.boundaries, policy
        assert (logits_b - logits_a).abs().max().item() < 1e-4, policy


def test_sequences_join_and_leave_between_steps(daemon, tiny_llama):
    """Continuous batching: a sequence joining a running batch decodes as it would alone, and
    a freed slot takes a new sequence."""
    weights = DecoderWeights.from_hf(tiny_llama)
    spec = spec_for(tiny_llama, max_tokens=512)
    first, second, third = prompts(128)[:3]
    with KVRecallClient(daemon.target, "engine-test") as client:
        alone_engine = Engine(weights, batch=1, max_capacity=1024)
        (alone, _), = decode(alone_engine, client, tiny_llama, [("full", None, second)], 7)
        alone_engine.close()
        engine = Engine(weights, batch=2, max_capacity=1024)
        s1 = client.open_session(spec, "full")
        slot1 = engine.add(s1, first)
        engine.step()
        engine.step()
        s2 = client.open_session(spec, "full")
        slot2 = engine.add(s2, second)
        for _ in range(6):
            engine.step()
        engine.remove(slot1)
        s1.close()
        s3 = client.open_session(spec, "full")
        slot3 = engine.add(s3, third)
        assert slot3 == slot1
        engine.step()
        joined = engine.remove(slot2)
        engine.remove(slot3)
        s2.close()
        s3.close()
        engine.close()
    assert joined.tokens == alone.tokens


def test_sequences_join_and_leave_with_overlap(daemon, tiny_llama):
    """Overlap: a sequence added between steps joins at the step launched next (the call that
    launches it returns no token for it), decodes as it would alone, and leaving waits for the
    step launched ahead, whose token for it is dropped."""
    weights = DecoderWeights.from_hf(tiny_llama)
    spec = spec_for(tiny_llama, max_tokens=512)
    first, second, third = prompts(128)[:3]
    config = {"budget": 16, "n_sink": 4, "window": 32, "threshold": 0.9}
    with KVRecallClient(daemon.target, "engine-test") as client:
        alone_engine = Engine(weights, batch=1, max_capacity=1024, overlap=True)
        s0 = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        alone_engine.add(s0, second)
        for _ in range(40):
            alone_engine.step()
        alone = alone_engine.remove(0)
        s0.close()
        alone_engine.close()
        engine = Engine(weights, batch=2, max_capacity=1024, overlap=True)
        s1 = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        slot1 = engine.add(s1, first)
        engine.step()
        engine.step()
        s2 = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        slot2 = engine.add(s2, second)
        assert slot2 not in engine.step(), "a sequence added after the launch got a token from it"
        for _ in range(40):
            assert set(engine.step()) == {slot1, slot2}
        engine.remove(slot1)
        s1.close()
        s3 = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        slot3 = engine.add(s3, third)
        assert slot3 == slot1
        assert engine.step() == {slot2: engine.sequences[slot2].tokens[-1]}, "the left slot's or the new one's token"
        joined = engine.remove(slot2)
        engine.remove(slot3)
        s2.close()
        s3.close()
        engine.close()
    assert joined.boundaries >= 1 and joined.appends >= 2
    assert joined.tokens[: len(alone.tokens)] == alone.tokens


def test_overlap_is_validated_and_keeps_its_ring_slack(daemon, tiny_llama):
    """Overlap needs the copy path, a lag of at least 1 and deferred sessions, and keeps the
    returned step's logits only when asked. The step launched ahead writes one more ring slot,
    so after every step no slot has a notice's answer out when that step writes its
    spill_every-th token past the notice (the ring's slack would be overrun). No boundaries:
    only that rule takes the answers."""
    weights = DecoderWeights.from_hf(tiny_llama)
    with pytest.raises(ValueError, match="host_copies"):
        Engine(weights, batch=1, max_capacity=64, overlap=True, host_copies="kernel")
    with pytest.raises(ValueError, match="lag"):
        Engine(weights, batch=1, max_capacity=64, overlap=True, lag=0)
    engine = Engine(weights, batch=1, max_capacity=1024, overlap=True, lag=2, force_boundary=lambda step, slot: False)
    spec = spec_for(tiny_llama, max_tokens=512)
    config = {"budget": 16, "n_sink": 4, "window": 32}
    with KVRecallClient(daemon.target, "engine-test") as client:
        plain = client.open_session(spec, "louiskv", config)
        with pytest.raises(ValueError, match="deferred_eviction"):
            engine.add(plain, prompts(128)[0])
        plain.close()
        session = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        slot = engine.add(session, prompts(128)[0])
        seq, core = engine.sequences[slot], session.core
        taken_early = 0
        for _ in range(4 * core.spill_every):
            engine.step()
            if seq.notice is not None:
                assert core.position + 1 - seq.sent_upto < core.spill_every, "a notice's answer is out past the slack"
            elif seq.appends and core.position - seq.sent_upto == core.spill_every - 1:
                taken_early += 1
        assert seq.appends >= 3 and taken_early >= 2
        with pytest.raises(RuntimeError, match="keep_logits"):
            _ = engine.logits
        engine.remove(slot)
        session.close()
    engine.close()


def test_set_lag_switches_pending_slots_back_first(daemon, tiny_llama):
    """set_lag between steps: a slot reading its shadow switches back to its real working set
    (its retrieval answered) before the new lag applies; a lag the session cannot take is
    refused and changes nothing."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engine = Engine(weights, batch=1, max_capacity=1024, lag=2, force_boundary=lambda step, slot: True)
    spec = spec_for(tiny_llama, max_tokens=512)
    with KVRecallClient(daemon.target, "engine-test") as client:
        session = client.open_session(spec, "louiskv", {"budget": 16, "n_sink": 4, "window": 32})
        slot = engine.add(session, prompts(128)[0])
        engine.step()
        seq = engine.sequences[slot]
        assert seq.pending is not None and seq.shadow is not None, "the forced boundary left no retrieval in flight"
        with pytest.raises(ValueError, match="spill_every"):
            engine.set_lag(session.spill_every)
        assert engine.lag == 2 and seq.pending is not None
        engine.set_lag(0)
        assert engine.lag == 0 and seq.pending is None and seq.shadow is None
        engine.step()  # lag 0: the boundary's retrieval serves the next step, nothing pending
        assert seq.pending is None and seq.boundaries == 2
        engine.remove(slot)
        session.close()
    engine.close()


@pytest.mark.parametrize("switch", ["fixed", "answered"])
def test_a_slot_leaves_its_shadow_when_answered_or_after_lag(daemon, tiny_llama, switch):
    """switch="answered": a crossed slot whose retrieval is answered reads its shadow no longer
    (it switches after the next step); "fixed" keeps it there for exactly `lag` steps."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engine = Engine(weights, batch=1, max_capacity=1024, lag=4, switch=switch,
                    force_boundary=lambda step, slot: step == 0)  # fmt: skip
    spec = spec_for(tiny_llama, max_tokens=512)
    with KVRecallClient(daemon.target, "engine-test") as client:
        session = client.open_session(spec, "louiskv", {"budget": 16, "n_sink": 4, "window": 32},
                                      deferred_eviction=True)  # fmt: skip
        slot = engine.add(session, prompts(128)[0])
        engine.step()
        seq = engine.sequences[slot]
        assert seq.pending is not None and seq.shadow is not None, "the forced boundary left no retrieval in flight"
        for call in seq.pending.calls:  # the answer is in before the next step
            call.result()
        engine.step()
        if switch == "answered":
            assert seq.pending is None and seq.shadow is None
            assert list(engine.times.shadow_steps) == [1]
        else:
            assert seq.pending is not None and not engine.times.shadow_steps
            for _ in range(3):
                engine.step()
            assert seq.pending is None and list(engine.times.shadow_steps) == [4]
        assert seq.boundaries == 1
        engine.remove(slot)
        session.close()
    engine.close()
    with pytest.raises(ValueError, match="switch"):
        Engine(weights, batch=1, max_capacity=64, switch="early")


def assert_greedy_like_full_attention(model, prompt: torch.Tensor, tokens: list[int]) -> None:
    """Every token after the first is full attention's greedy choice after the ones before it."""
    with torch.no_grad():
        expected = model(torch.cat([prompt, torch.tensor(tokens[:-1])])[None]).logits[0, len(prompt) :].argmax(-1)
    assert tokens[1:] == expected.tolist()[: len(tokens) - 1]


class HeldAnswer:
    """A boundary's real calls in flight, reported unanswered until the test lets them through:
    the daemon answers when it does; only when the engine sees the answer is up to the test."""

    def __init__(self, pending) -> None:
        self.pending, self.released = pending, False

    def done(self) -> bool:
        return self.released and self.pending.done()

    def result(self):
        return self.pending.result()

    def __getattr__(self, name):
        return getattr(self.pending, name)


@contextmanager
def one_louiskv_slot(daemon, tiny_llama, **engine_args):
    """A batch-1 engine (`engine_args`: lag, switch, force_boundary) decoding a louiskv session
    whose budget covers the sequence: yields (engine, session, its Sequence); afterwards the
    slot leaves, and every token must be full attention's greedy choice."""
    engine = Engine(DecoderWeights.from_hf(tiny_llama), batch=1, max_capacity=1024, **engine_args)
    prompt = prompts(128)[0]
    with KVRecallClient(daemon.target, "engine-test") as client:
        session = client.open_session(spec_for(tiny_llama, max_tokens=512), "louiskv",
                                      {"budget": 512, "n_sink": 4, "window": 32}, deferred_eviction=True)  # fmt: skip
        seq = engine.sequences[engine.add(session, prompt)]
        yield engine, session, seq
        engine.remove(seq.slot)
        session.close()
    engine.close()
    assert_greedy_like_full_attention(tiny_llama, prompt, seq.tokens)


@pytest.mark.parametrize("released_after", [3, None])
def test_a_patient_slot_reads_its_shadow_past_lag_until_answered(daemon, tiny_llama, released_after):
    """switch="patient": a crossed slot whose answer is not in after `lag` steps reads its shadow
    on, without the step waiting, and switches after the first step that finds the answer in
    (released after 3 steps: 3 shadow steps at lag 2), or after 2 * lag steps at the latest,
    waiting then (never released: 4). Its tokens equal full attention's under a covering budget
    either way."""
    with one_louiskv_slot(daemon, tiny_llama, lag=2, switch="patient",
                          force_boundary=lambda step, slot: step == 0) as (engine, _, seq):  # fmt: skip
        engine.step()
        assert seq.pending is not None, "the forced boundary left no retrieval in flight"
        held = seq.pending = HeldAnswer(seq.pending)
        for call in held.calls:  # the daemon's answer is in; the engine is told so only when released
            call.result()
        stays = []
        for step in range(1, 6):
            if step == released_after:
                held.released = True
            engine.step()
            stays.append(seq.pending is not None)
        want = [True, True, False, False, False] if released_after == 3 else [True, True, True, False, False]
        assert stays == want
        assert list(engine.times.shadow_steps) == [3 if released_after == 3 else 4]


def test_a_patient_slot_never_overruns_its_ring(daemon, tiny_llama):
    """lag 7, answers never seen in time: the slot reads its shadow for 14 steps, longer than lag
    allows for, so the notice before the shadow must make room for 14 (the ring would otherwise
    wrap over tokens not yet spilled); every token equals full attention's."""
    with one_louiskv_slot(daemon, tiny_llama, lag=7, switch="patient",
                          force_boundary=lambda step, slot: step == 5) as (engine, session, seq):  # fmt: skip
        assert session.spill_every == 16
        for _ in range(30):
            engine.step()
            if seq.pending is not None and not isinstance(seq.pending, HeldAnswer):
                seq.pending = HeldAnswer(seq.pending)
        assert list(engine.times.shadow_steps) == [14]


@pytest.mark.parametrize(
    ("needed", "want"),
    [([], 2), ([1, 1, 1], 2), ([3], 3), ([3, 4], 4), ([1] * 9 + [4], 2), ([1] * 8 + [4, 4], 4), ([9] * 5, 4)],
)  # fmt: skip
def test_adaptive_stay_is_the_recent_answers_90th_percentile_within_lag_and_longest(needed, want):
    assert adaptive_stay(needed, 2, 4) == want


def test_an_adaptive_slot_reads_its_shadow_as_long_as_recent_answers_needed(daemon, tiny_llama, monkeypatch):
    """switch="adaptive", lag 2, a window of 4 answers: while each answer is let through only
    4 steps after its crossing, the stays grow 2, 3, 4 (a late answer counts one step more than
    the stay that waited for it; one seen in at step 4 counts 4) and stay at 4 (2 x lag); once
    answers are in at the first step, the stays come back to lag as the late ones leave the
    window. Every token equals full attention's under a covering budget."""
    monkeypatch.setattr(engine_module, "ADAPT_WINDOW", 4)
    with one_louiskv_slot(daemon, tiny_llama, lag=2, switch="adaptive",
                          force_boundary=lambda step, slot: step % 6 == 0) as (engine, _, seq):  # fmt: skip
        held, since, crossings = None, 0, 0
        for _ in range(54):
            if held is not None:
                since += 1
                held.released = held.released or since == 4
            engine.step()
            if seq.pending is not None and not isinstance(seq.pending, HeldAnswer):
                held, since, crossings = HeldAnswer(seq.pending), 0, crossings + 1
                seq.pending = held
                for call in held.calls:  # answered; the engine sees it only once released
                    call.result()
                held.released = crossings > 4  # from the fifth crossing on, answers are in at once
        assert crossings == 9
        assert list(engine.times.shadow_steps) == [2, 3, 4, 4, 4, 4, 4, 4, 2]


def test_a_slot_crossing_as_it_switches_back_retrieves_for_this_steps_query(daemon, tiny_llama):
    """A slot that crosses in the step it leaves its shadow retrieves for that step's query:
    the steps that read the shadow wrote their queries there, and the switch brings the
    latest back into the working set the daemon reads (before, the daemon retrieved for the
    previous boundary's query and moved next to nothing)."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engine = Engine(weights, batch=1, max_capacity=1024, lag=2, force_boundary=lambda step, slot: True)
    spec = spec_for(tiny_llama, max_tokens=512)
    with KVRecallClient(daemon.target, "engine-test") as client:
        session = client.open_session(spec, "louiskv", {"budget": 16, "n_sink": 4, "window": 32},
                                      deferred_eviction=True)  # fmt: skip
        slot = engine.add(session, prompts(128)[0])
        seq = engine.sequences[slot]
        for _ in range(3):  # cross, read the shadow, switch back and cross again
            engine.step()
        assert seq.boundaries == 2 and list(engine.times.shadow_steps) == [2], "no crossing at the switch back"
        torch.testing.assert_close(session.core.query.float(), engine.backend.latest[slot], rtol=0, atol=1e-6)
        engine.remove(slot)
        session.close()
    engine.close()


def test_deferred_notices_are_sent_and_taken_later(daemon, tiny_llama):
    """Deferred eviction: the ring has spill_every more slots and keeps as many tokens after a
    notice; a step that sends an AppendNotice does not take its answer (the slot's mask stays
    at the last answer taken) and the slot takes it before its next notice. Over the inline
    transport (no shared working set) the daemon refuses it, naming the field."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engine = Engine(weights, batch=1, max_capacity=1024, lag=2)
    spec = spec_for(tiny_llama, max_tokens=512)
    config = {"budget": 16, "n_sink": 4, "window": 32}
    with KVRecallClient(daemon.target, "engine-test") as client:
        plain = client.open_session(spec, "louiskv", config)
        session = client.open_session(spec, "louiskv", config, deferred_eviction=True)
        core = session.core
        assert core.deferred and not plain.core.deferred
        assert core.window == plain.core.window + core.spill_every and core.min_window == plain.core.min_window
        slot = engine.add(session, prompts(128)[0])
        seq = engine.sequences[slot]
        sent = []
        for _ in range(3 * core.spill_every):
            appends = seq.appends
            engine.step()
            if seq.appends > appends:
                assert seq.notice is not None, "the step took its own notice's answer"
                assert core.noticed_upto < seq.sent_upto == core.position
                mask = int(engine.backend.tables.host_geometry[3, slot])
                assert mask == core.evicted_upto < seq.sent_upto - core.min_window
                sent.append(seq.sent_upto)
        assert len(sent) >= 2 and core.noticed_upto == sent[-2], "the earlier notices were not taken in turn"
        engine.remove(slot)
        assert seq.notice is None and core.noticed_upto == sent[-1]
        session.close()
        plain.close()
        with pytest.raises(InvalidArgumentError, match="deferred_eviction"):
            client.open_session(spec, "louiskv", config, deferred_eviction=True, transport="inline")
    engine.close()


@pytest.mark.parametrize(("impl", "overlap"), [("reference", False), ("reference", True),
                                               pytest.param("triton", False, marks=TRITON)])  # fmt: skip
def test_a_crossing_slot_does_not_take_its_notice_first(daemon, tiny_llama, impl, overlap):
    """Deferred eviction: a slot that crosses while its last notice's answer is out sends its
    retrieval at once, naming that notice (StepEvent.follows: the daemon applies the two in
    turn), and takes both answers at its switch back. Boundaries forced on every step a notice
    is out; with a covering budget every step still equals full attention (fp32, 1e-4)."""
    weights = DecoderWeights.from_hf(tiny_llama)
    engines: list[Engine] = []

    def notice_out(step: int, slot: int) -> bool:
        return engines[0].sequences[slot].notice is not None

    engine = Engine(weights, batch=2, max_capacity=1024, impl=impl, lag=2, force_boundary=notice_out,
                    overlap=overlap, keep_logits=overlap)  # fmt: skip
    engines.append(engine)
    spec = spec_for(tiny_llama, max_tokens=512)
    picks = prompts(128)[:2]
    followed = 0
    with KVRecallClient(daemon.target, "engine-test") as client:
        sessions = [client.open_session(spec, "louiskv", {"budget": 256}, deferred_eviction=True) for _ in picks]
        slots = [engine.add(session, prompt) for session, prompt in zip(sessions, picks, strict=True)]
        logits = {slot: [] for slot in slots}
        for _ in range(3 * sessions[0].spill_every):
            out = {slot: engine.sequences[slot].notice for slot in slots}
            engine.step()
            for slot in slots:
                seq = engine.sequences[slot]
                logits[slot].append(engine.logits[slot].clone())
                if out[slot] is not None and seq.pending is not None and seq.notice is out[slot]:
                    followed += 1  # crossed with the notice's answer still out, and did not take it
                if seq.pending is None:
                    assert seq.notice is None or seq.notice is not out[slot], "a switch back left its notice"
        results = [engine.remove(slot) for slot in slots]
        for session in sessions:
            session.close()
    engine.close()
    assert followed >= 2, "no slot crossed with its notice's answer out"
    for prompt, seq, slot in zip(picks, results, slots, strict=True):
        tokens = torch.cat([prompt, torch.tensor(seq.tokens[:-1])])
        with torch.no_grad():
            expected = tiny_llama(tokens[None]).logits[0, len(prompt) :]
        diff = (expected - torch.stack(logits[slot])).abs().max().item()
        assert diff < 1e-4, f"logits differ by {diff}"
        assert seq.boundaries >= 2


def test_host_copies_is_validated_and_off_on_a_cpu(tiny_llama):
    """Kernel copies over PCIe exist only for a GPU's pinned buffers; an unknown mode is refused."""
    weights = DecoderWeights.from_hf(tiny_llama)
    with pytest.raises(ValueError, match="host_copies"):
        Engine(weights, batch=1, max_capacity=64, host_copies="dma")
    engine = Engine(weights, batch=1, max_capacity=64, host_copies="kernel")
    assert not engine.backend.tables.step_uploads
    engine.close()


def test_ring_spans_of_a_switch_back():
    """The ring slots a slot's shadow wrote meanwhile, as the switch back copies them: one span,
    or two where the ring wraps (ring of 8 slots from slot 5)."""
    from kvrecall.kernels.ws_decode import ring_spans

    assert ring_spans(5, 8, 10, 13) == [(7, 10)]
    assert ring_spans(5, 8, 14, 18) == [(11, 13), (5, 7)]
    assert ring_spans(5, 8, 16, 24) == [(5, 13)]
    assert ring_spans(5, 8, 3, 3) == []
    slots = [s for lo, hi in ring_spans(5, 8, 14, 18) for s in range(lo, hi)]
    assert slots == [5 + p % 8 for p in range(14, 18)]
