"""open_session without device= picks the transport from where the spec says the model runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvrecall.client import KVRecallClient
from kvrecall.client.hf import spec_for
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.conftest import SMALL


@pytest.mark.parametrize(
    "target,spec_device,device,kind",
    [
        ("unix:///tmp/x.sock", "cuda:0", None, pb.TRANSPORT_CUDA_IPC),  # the README example on a GPU
        ("localhost:50051", "cuda:1", None, pb.TRANSPORT_CUDA_IPC),
        ("unix:///tmp/x.sock", "cpu", None, pb.TRANSPORT_SHM),
        ("unix:///tmp/x.sock", "", None, pb.TRANSPORT_SHM),
        ("gpu-box:50051", "cuda:0", None, pb.TRANSPORT_INLINE),  # remote: tensors in the messages
        ("unix:///tmp/x.sock", "cuda:0", "cpu", pb.TRANSPORT_SHM),  # an explicit device wins
        ("unix:///tmp/x.sock", "cpu", "cuda:0", pb.TRANSPORT_CUDA_IPC),
    ],
)
def test_transport_follows_the_models_device(target, spec_device, device, kind):
    spec = dataclasses.replace(SMALL, device=spec_device)
    with KVRecallClient(target, "w") as client:
        request, chosen = client.open_request(spec, "full", None, device=device)
    assert chosen == kind and request.transport == kind


def test_spec_for_records_the_models_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    spec = spec_for(model, 100)
    assert spec.device == "cpu" and spec.dtype == torch.float32 and spec.num_kv_heads == 1 and spec.head_dim == 16
