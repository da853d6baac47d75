"""A worker that truncates shared memory cannot take the daemon down.

Every kind of segment a worker can reach is truncated mid-session, by a real worker process
(the SDK in a `python -c` subprocess, or the test process itself holding the fd):

* its session's working set (a sealed memfd the worker received by fd): ftruncate refuses;
* every memfd of the daemon reachable through /proc/<daemon pid>/fd (host pool included):
  ftruncate refuses;
* its IngestPrompt staging segment, before the call and while the daemon reads it: the
  daemon answers INVALID_ARGUMENT (or OK when its read finished first), never SIGBUS.

After each, the daemon is SERVING and a session opened before keeps decoding with its
working set intact. With mmapped segments (the old design) the daemon died of SIGBUS here.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
import torch

from kvrecall.client import KVRecallClient, ModelSpec
from kvrecall.fdpass import receive_fd
from kvrecall.local import LocalDaemon
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.v1 import kvrecall_pb2 as pb
from tests.reliability.conftest import SPEC, Raw, open_request, random_kv

C = grpc.StatusCode
# A prompt of ~32 MiB: reading it takes long enough for a truncation to land mid-read.
BIG = ModelSpec(num_layers=4, num_kv_heads=4, num_query_heads=4, head_dim=64, dtype=torch.float32, max_tokens=4096)


@pytest.fixture(scope="module")
def tdaemon():
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.125, extra_args=["--page-kb", "256"], worker_share=None) as d:
        yield d


@pytest.fixture(scope="module")
def bystander(tdaemon):
    """A session of another worker, mid-decode, that every truncation must leave intact."""
    client = KVRecallClient(tdaemon.target, "bystander", timeout=30.0)
    kv = random_kv(SPEC, 300, seed=11)
    session = client.open_session(SPEC, "louiskv", {"budget": 48, "n_sink": 4, "window": 32, "cluster_size": 8})
    session.ingest(kv[:, :, :, :200].contiguous(), torch.randn(2, 4, max(1, session.observation), 16))
    state = {"session": session, "kv": kv, "position": 200}
    yield state
    session.close()
    client.close()


def decode_on(state: dict, steps: int = 20) -> None:
    """Decode `steps` more tokens and check every resident slot holds its token."""
    session, kv = state["session"], state["kv"]
    for position in range(state["position"], state["position"] + steps):
        session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
        session.advance()
    state["position"] += steps
    session.query.copy_(torch.randn_like(session.query))
    session.boundary()
    session.flush()
    assert session.stats().tokens == state["position"]
    for layer in range(SPEC.num_layers):
        for head in range(SPEC.num_kv_heads):
            for slot, position in enumerate(session.slot_pos[layer, head].tolist()):
                if position >= 0:
                    assert torch.equal(session.keys[layer, head, slot], kv[layer, 0, head, position])


def assert_serving(daemon: LocalDaemon) -> None:
    assert daemon.process.poll() is None, f"daemon died: {daemon.log()[-3000:]}"
    raw = Raw(daemon.target)
    try:
        assert raw.health() == "SERVING"
    finally:
        raw.close()


HOSTILE_WORKER = textwrap.dedent(
    """
    import errno, os, sys, torch
    from kvrecall.client import KVRecallClient, ModelSpec
    from kvrecall.fdpass import receive_fd

    client = KVRecallClient(sys.argv[1], "hostile", timeout=30.0)
    session = client.open_session(ModelSpec(2, 2, 4, 16, torch.float32, 512), "full")
    session.ingest(torch.randn(2, 2, 2, 64, 16))
    fd = receive_fd(session.info.working_set.keys.shm.fd_socket, session.session_id, session.capability)
    for size in (0, 1, os.fstat(fd).st_size * 2):
        try:
            os.ftruncate(fd, size)
            print("TRUNCATED", size, flush=True)
        except PermissionError:
            print("REFUSED", size, flush=True)
    for position in range(64, 96):  # the hostile worker's own session still works too
        session.write_token(position, torch.randn(2, 2, 16), torch.randn(2, 2, 16))
        session.advance()
    session.boundary()
    print("DECODED", session.stats().tokens, flush=True)
    session.close()
    """
)


def test_a_worker_cannot_shrink_or_grow_its_working_set(tdaemon, bystander):
    result = subprocess.run(
        [sys.executable, "-c", HOSTILE_WORKER, tdaemon.target], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["REFUSED 0", "REFUSED 1"] and lines[2].startswith("REFUSED "), lines
    assert "TRUNCATED" not in result.stdout and "DECODED 96" in result.stdout, result.stdout
    assert_serving(tdaemon)
    decode_on(bystander)


def test_working_set_fd_is_sealed_and_only_for_the_capability(tdaemon):
    with KVRecallClient(tdaemon.target, "sealer", timeout=30.0) as client:
        with client.open_session(SPEC, "full") as session:
            shm = session.info.working_set.keys.shm
            assert not os.path.exists(os.path.join("/dev/shm", shm.name))  # no name a worker could open
            fd = receive_fd(shm.fd_socket, session.session_id, session.capability)
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
                assert seals & wanted == wanted
                with pytest.raises(PermissionError):
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)  # sealed against new seals too
            finally:
                os.close(fd)
            for capability in ("", "guess", session.capability[:-1]):
                with pytest.raises(RuntimeError, match="NOT_FOUND"):
                    receive_fd(shm.fd_socket, session.session_id, capability or "-")


def test_no_memfd_of_the_daemon_can_be_truncated_through_proc(tdaemon, bystander):
    """A same-user worker can open the daemon's fds through /proc: the seals still hold."""
    fd_dir = f"/proc/{tdaemon.process.pid}/fd"
    memfds = []
    for name in os.listdir(fd_dir):
        try:
            if os.readlink(os.path.join(fd_dir, name)).startswith("/memfd:kvrecall-"):
                memfds.append(os.path.join(fd_dir, name))
        except OSError:
            continue
    # the host pool's fd is closed after mapping; each open session's working set stays open
    assert memfds, "expected the working sets of the open sessions"
    for path in memfds:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # closed meanwhile
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
    for path in (p for p in os.listdir("/dev/shm") if p.startswith(f"kvrecall-{tdaemon.process.pid}-")):
        pytest.fail(f"the daemon has a named segment a worker could truncate: {path}")
    assert_serving(tdaemon)
    decode_on(bystander)


def _staged(spec: ModelSpec, tokens: int, seed: int) -> tuple[ShmSegment, pb.TensorRef]:
    kv = random_kv(spec, tokens, seed)
    segment = ShmSegment.create(shm_name("stage"), kv.numel() * 4)
    segment.tensor.view(torch.float32).copy_(kv.view(-1))
    ref = pb.TensorRef(dtype=pb.DTYPE_FLOAT32, shape=list(kv.shape), shm=pb.ShmRef(name=segment.name))
    return segment, ref


def test_staging_truncated_before_ingest_is_invalid_argument(tdaemon, bystander):
    raw = Raw(tdaemon.target, worker="truncator")
    session_id = raw.ok("OpenSession", open_request(worker="truncator")).session_id
    segment, ref = _staged(SPEC, 100, seed=2)
    try:
        os.truncate(os.path.join("/dev/shm", segment.name), 0)
        answer = raw.call("IngestPrompt", pb.IngestPromptRequest(session_id=session_id, kv=ref, num_tokens=100))
        assert answer.code == C.INVALID_ARGUMENT and answer.details.startswith("kv.shm"), answer.details
        assert "bytes" in answer.details
    finally:
        segment.release()
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id))
        raw.close()
    assert_serving(tdaemon)
    decode_on(bystander)


def flap(path: str, size: int, shrunk: int, stop: threading.Event) -> None:
    """Until `stop`: shrink the file to `shrunk` bytes for a moment, regrow it to `size`, keep
    it whole for a moment (so the daemon's size check passes and a later read comes up short)."""
    fd = os.open(path, os.O_RDWR)
    try:
        while not stop.wait(0.002):
            os.ftruncate(fd, shrunk)
            time.sleep(0.0005)
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def test_staging_truncated_while_the_daemon_reads_it(tdaemon, bystander):
    """Shrink and regrow a 32 MiB staging segment in a loop during IngestPrompt, for several
    sessions: each answer is OK (the read won) or INVALID_ARGUMENT naming kv.shm."""
    raw = Raw(tdaemon.target, worker="truncator")
    outcomes = []
    for attempt in range(4):
        session_id = raw.ok("OpenSession", open_request(BIG, worker="truncator")).session_id
        segment, ref = _staged(BIG, BIG.max_tokens, seed=attempt)
        stop = threading.Event()
        shrunk = segment.nbytes // (attempt + 2)
        flapper = threading.Thread(target=flap, args=(os.path.join("/dev/shm", segment.name), segment.nbytes, shrunk, stop))
        flapper.start()
        try:
            request = pb.IngestPromptRequest(session_id=session_id, kv=ref, num_tokens=BIG.max_tokens)
            answer = raw.call("IngestPrompt", request, timeout=120)
        finally:
            stop.set()
            flapper.join()
            segment.release()
        outcomes.append((answer.code.name, answer.details[:90]))
        assert answer.code in (C.OK, C.INVALID_ARGUMENT), answer.details
        if answer.code == C.INVALID_ARGUMENT:
            assert answer.details.startswith("kv.shm"), answer.details
        assert_serving(tdaemon)
        raw.ok("CloseSession", pb.CloseSessionRequest(session_id=session_id))
    print("ingest outcomes under truncation:", outcomes)
    raw.close()
    decode_on(bystander)
