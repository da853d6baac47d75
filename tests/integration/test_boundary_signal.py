"""The boundary signal's query view: the daemon's louiskv rule says pre- or post-RoPE, and the
worker's KVRecallCache undoes the rotary embedding exactly when told to."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvrecall.client.hf import KVRecallCache, spec_for, use_kvrecall_attention


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("pre_rope", [None, False, True])
def test_rule_reaches_the_worker(client, tiny_llama, pre_rope):
    config = {"budget": 32, "window": 32, "n_sink": 4}
    if pre_rope is not None:
        config["pre_rope"] = pre_rope
    with client.open_session(spec_for(tiny_llama, 128), "louiskv", config) as session:
        assert session.boundary_pre_rope is bool(pre_rope)
        assert KVRecallCache(session).signal == ("pre" if pre_rope else "post")
        assert KVRecallCache(session, signal="post").signal == "post"  # the worker may override


@pytest.mark.parametrize("position", [0, 1, 17, 200])
def test_pre_signal_undoes_rope(client, tiny_llama, position):
    use_kvrecall_attention(tiny_llama)
    module = tiny_llama.model.layers[1].self_attn
    q = torch.randn(4, 16)  # [Hq, D] before RoPE
    cos, sin = tiny_llama.model.rotary_emb(q.unsqueeze(0), torch.tensor([[position]]))
    rotated, _ = apply_rotary_pos_emb(q[None, :, None], q[None, :, None], cos, sin)
    q_post = rotated[0, :, 0]
    if position:
        assert not torch.allclose(q_post, q, atol=1e-3)
    with client.open_session(
        spec_for(tiny_llama, 256), "louiskv", {"budget": 32, "window": 32, "pre_rope": True}
    ) as s:
        pre = KVRecallCache(s)._signal_query(module, q_post, position)
        post = KVRecallCache(s, signal="post")._signal_query(module, q_post, position)
    torch.testing.assert_close(pre, q, atol=1e-5, rtol=1e-5)
    assert post is q_post


def test_bad_signal_is_refused(client, tiny_llama):
    with client.open_session(spec_for(tiny_llama, 64), "louiskv", {"budget": 16, "window": 32}) as session:
        with pytest.raises(ValueError, match="signal"):
            KVRecallCache(session, signal="sideways")
