"""The daemon embedded in its worker's process on a GPU (kvrecall.server.embedded): the CUDA IPC
handles it hands over are this process's own, which CUDA will not open here, so kvrecall.cuda_ipc
maps them to the memory and events themselves; the engine's louiskv sessions (captured steps,
worker copies at share 0 and 1, overlap off and on) decode the same tokens and logits as with a
daemon process (the CPU test's scenario, tests/engine/test_embedded_engine.py)."""

from __future__ import annotations

import pytest
import torch

from kvrecall.v1 import kvrecall_pb2 as pb
from tests.engine.test_embedded_engine import decode_with
from tests.gpu.test_engine_gpu import tiny_llama  # noqa: F401 (the fixture: 3 layers, 1,024 positions)

pytestmark = pytest.mark.gpu

ENV = {"KVRECALL_WARMUP": "", "KVRECALL_HOST_READS": "copy"}


def test_own_handles_map_to_themselves_while_an_embedded_daemon_runs():
    from kvrecall import cuda_ipc
    from kvrecall.transport import TensorRefError

    device = torch.device("cuda", 0)
    tensor, handle, owner = cuda_ipc.allocate_shareable(4096, device)
    ref = pb.CudaIpcRef(handle=handle, offset=1024, device=0)
    with pytest.raises(TensorRefError, match="keys.cuda_ipc.handle: cannot open"):  # none runs: opened as always
        cuda_ipc.open_handle(ref, torch.bfloat16, (8, 16), 256, "keys")
    cuda_ipc.serve_own_handles(True)
    try:
        event, event_handle = cuda_ipc.create_event(device)
        mapped = cuda_ipc.open_handle(ref, torch.bfloat16, (8, 16), 256, "keys")
        mapped.tensor.fill_(3.0)
        assert mapped.tensor.data_ptr() == tensor.data_ptr() + 1024
        expected = torch.full((128,), 3.0, device=device, dtype=torch.bfloat16)
        assert torch.equal(tensor[1024:1280].view(torch.bfloat16), expected)
        with pytest.raises(TensorRefError, match="keys.cuda_ipc"):  # past the allocation's end
            cuda_ipc.open_handle(pb.CudaIpcRef(handle=handle, offset=4000, device=0), torch.bfloat16, (8, 16), 256,
                                 "keys")  # fmt: skip
        mapped.close()
        assert cuda_ipc.open_event(event_handle, 0, "query") is event
        cuda_ipc.forget_event(event_handle)  # (its session closed)
    finally:
        cuda_ipc.serve_own_handles(False)
    del owner, tensor
    with pytest.raises(TensorRefError, match="cannot open"):  # freed: no longer this process's
        cuda_ipc.serve_own_handles(True)
        try:
            cuda_ipc.open_handle(ref, torch.bfloat16, (8, 16), 256, "keys")
        finally:
            cuda_ipc.serve_own_handles(False)


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):  # noqa: F811
    logs = tmp_path_factory.mktemp("embedded-gpu")
    return {(kind, share): decode_with(tiny_llama, kind, share, str(logs / f"{kind}-{share}.log"), "cuda", ENV)
            for kind in ("process", "embedded") for share in ("0", "1")}  # fmt: skip


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("share", ["0", "1"])
def test_embedded_daemon_decodes_as_a_daemon_process_on_cuda(runs, share, overlap):
    process, embedded = runs["process", share][overlap], runs["embedded", share][overlap]
    assert runs["embedded", share]["stop_code"] == 0, runs["embedded", share]["log"][-2000:]
    assert (embedded["staged"] > 0) == (share == "1")
    assert embedded["tokens"] == process["tokens"]
    torch.testing.assert_close(embedded["logits"], process["logits"], rtol=0, atol=1e-4)
