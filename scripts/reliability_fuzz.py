"""Long fuzz run against a real daemon: N fuzzed messages over every RPC, then a report.

Each message starts from a valid request for one RPC (aimed at live sessions of several
policies and transports, capability included) and is mutated, either as bytes (bit flips,
inserted / deleted / repeated spans, truncation, random bytes) or as fields (each scalar or
string field set to a random or extreme value, sub-messages cleared, the capability or the
session id swapped). Decode messages go on streams of 1..8. Every call has a deadline.

Counts: answers per status code, crashes (the daemon process exited), hangs (deadline
exceeded), INTERNAL / UNKNOWN answers, and the growth of the daemon's log and RSS. Exits
non-zero on any crash, hang or INTERNAL/UNKNOWN. No timing is asserted.

    PYTHONPATH=. python scripts/reliability_fuzz.py --messages 10000 --json bench/results/reliability-fuzz-DATE.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
from datetime import date

import grpc
import torch

from kvrecall.client import ModelSpec
from kvrecall.client.core import policy_message
from kvrecall.local import LocalDaemon
from kvrecall.shm import ShmSegment, shm_name
from kvrecall.transport import inline_ref
from kvrecall.v1 import kvrecall_pb2 as pb

SPEC = ModelSpec(num_layers=2, num_kv_heads=2, num_query_heads=4, head_dim=16, dtype=torch.float32, max_tokens=512)
PROMPT = 48
TIMEOUT = 20.0
RPCS = ("OpenSession", "IngestPrompt", "Decode", "KeepAlive", "CloseSession", "GetStats")
POLICIES = {
    "full": None,
    "streaming": {"n_sink": 2, "window": 32},
    "louiskv": {"budget": 16, "n_sink": 2, "window": 32, "cluster_size": 4},
    "quest": {"budget": 16, "n_sink": 2, "window": 32, "page_size": 4},
    "snapkv": {"budget": 16, "n_sink": 2, "window": 32},
    "windowkv": {"budget": 16, "n_sink": 2, "window": 32},
}
EXTREMES = [0, 1, -1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, -(2**63), PROMPT, PROMPT + 1, 512, 513]
STRINGS = ["", "x", "..", "a/b", "\u2603" * 20, "k" * 5000, "s-0000000000000000"]


class Fuzzer:
    def __init__(self, target: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        )
        self.unary = {rpc: self.channel.unary_unary(f"/kvrecall.v1.KVRecall/{rpc}") for rpc in RPCS if rpc != "Decode"}
        self.decode = self.channel.stream_stream("/kvrecall.v1.KVRecall/Decode")
        self.codes: collections.Counter = collections.Counter()
        self.bad: list[str] = []  # INTERNAL / UNKNOWN / hangs, with their details
        self.sessions: list[tuple[str, str, int]] = []  # (session id, capability, transport)
        kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, PROMPT, SPEC.head_dim)
        self.staging = ShmSegment.create(shm_name("stage"), kv.numel() * 4)
        self.staging.tensor.view(torch.float32).copy_(kv.view(-1))
        self.kv = kv

    # ---- valid requests to start from -----------------------------------------------
    def open_request(self, transport: int | None = None) -> pb.OpenSessionRequest:
        name = self.rng.choice(sorted(POLICIES))
        return pb.OpenSessionRequest(
            worker_id="fuzz", layout=SPEC.to_proto(), policy=policy_message(name, POLICIES[name]),
            transport=transport or self.rng.choice([pb.TRANSPORT_SHM, pb.TRANSPORT_INLINE]), lease_seconds=600,
        )

    def refresh_sessions(self) -> None:
        """Keep a handful of live sessions (half of them ingested) to aim at."""
        while len(self.sessions) < 6:
            request = self.open_request()
            response = pb.OpenSessionResponse.FromString(
                self.unary["OpenSession"](request.SerializeToString(), timeout=TIMEOUT, metadata=(("kvrecall-worker-id", "fuzz"),))
            )
            if len(self.sessions) % 2 == 0:
                ingest = pb.IngestPromptRequest(session_id=response.session_id, capability=response.capability,
                                                num_tokens=PROMPT, kv=inline_ref(self.kv))
                self.unary["IngestPrompt"](ingest.SerializeToString(), timeout=TIMEOUT, metadata=(("kvrecall-worker-id", "fuzz"),))
            self.sessions.append((response.session_id, response.capability, request.transport))

    def valid(self, rpc: str) -> list[pb.Message]:
        session_id, capability, transport = self.rng.choice(self.sessions)
        if rpc == "OpenSession":
            return [self.open_request()]
        if rpc == "IngestPrompt":
            request = pb.IngestPromptRequest(session_id=session_id, capability=capability, num_tokens=PROMPT)
            if transport == pb.TRANSPORT_SHM and self.rng.random() < 0.5:
                request.kv.dtype, request.kv.shm.name = pb.DTYPE_FLOAT32, self.staging.name
                request.kv.shape.extend(self.kv.shape)
            else:
                request.kv.CopyFrom(inline_ref(self.kv))
            request.queries.CopyFrom(inline_ref(torch.randn(SPEC.num_layers, SPEC.num_query_heads, 4, SPEC.head_dim)))
            return [request]
        if rpc == "Decode":
            stream, position = [], PROMPT
            for seq in range(1, self.rng.randint(1, 8) + 1):
                request = pb.DecodeRequest(seq=seq, session_id=session_id, capability=capability)
                if self.rng.random() < 0.5:
                    n = self.rng.randint(1, 16)
                    position += n
                    request.append.upto = position
                    if transport == pb.TRANSPORT_INLINE:
                        request.append.kv.CopyFrom(inline_ref(torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, n, SPEC.head_dim)))
                else:
                    request.boundary.position = position
                    if transport == pb.TRANSPORT_INLINE:
                        request.boundary.query.CopyFrom(inline_ref(torch.randn(SPEC.num_layers, SPEC.num_query_heads, SPEC.head_dim)))
                stream.append(request)
            return stream
        cls = {"KeepAlive": pb.KeepAliveRequest, "CloseSession": pb.CloseSessionRequest, "GetStats": pb.StatsRequest}[rpc]
        return [cls(session_id=session_id, capability=capability)]

    # ---- mutations --------------------------------------------------------------------
    def mutate_fields(self, message: pb.Message) -> None:
        fields = list(message.DESCRIPTOR.fields)
        for field in self.rng.sample(fields, k=min(len(fields), self.rng.randint(1, 3))):
            if field.message_type is not None:
                if field.is_repeated:
                    continue
                if self.rng.random() < 0.3:
                    message.ClearField(field.name)
                else:
                    self.mutate_fields(getattr(message, field.name))
                continue
            try:
                if field.is_repeated:
                    getattr(message, field.name).extend(self.rng.choice(EXTREMES) & (2**63 - 1) for _ in range(self.rng.randint(0, 6)))
                elif field.type == field.TYPE_STRING:
                    setattr(message, field.name, self.rng.choice(STRINGS + [s for s, _, _ in self.sessions]))
                elif field.type == field.TYPE_BYTES:
                    setattr(message, field.name, self.rng.randbytes(self.rng.choice([0, 7, 64, 4096])))
                elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
                    setattr(message, field.name, self.rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30]))
                elif field.type == field.TYPE_BOOL:
                    setattr(message, field.name, self.rng.random() < 0.5)
                else:
                    setattr(message, field.name, self.rng.choice(EXTREMES))
            except (ValueError, TypeError):
                pass  # out of the field's range: the wire cannot carry it either

    def mutate_bytes(self, raw: bytes) -> bytes:
        data = bytearray(raw)
        for _ in range(self.rng.randint(1, 4)):
            op = self.rng.choice(["flip", "insert", "delete", "repeat", "truncate", "random"])
            at = self.rng.randint(0, max(0, len(data) - 1))
            if op == "flip" and data:
                data[at] ^= 1 << self.rng.randint(0, 7)
            elif op == "insert":
                data[at:at] = self.rng.randbytes(self.rng.randint(1, 8))
            elif op == "delete":
                del data[at : at + self.rng.randint(1, 8)]
            elif op == "repeat":
                data[at:at] = data[at : at + self.rng.randint(1, 16)] * self.rng.randint(1, 4)
            elif op == "truncate":
                del data[at:]
            else:
                data = bytearray(self.rng.randbytes(self.rng.randint(0, 64)))
        return bytes(data)

    def fuzzed(self, rpc: str) -> list[bytes]:
        messages = self.valid(rpc)
        out = []
        for message in messages:
            if self.rng.random() < 0.5:
                self.mutate_fields(message)
                out.append(message.SerializeToString())
            elif self.rng.random() < 0.7:
                out.append(self.mutate_bytes(message.SerializeToString()))
            else:
                out.append(message.SerializeToString())  # valid: the stream around it is fuzzed
        return out

    # ---- sending ----------------------------------------------------------------------
    def send(self, rpc: str) -> int:
        messages = self.fuzzed(rpc)
        metadata = (("kvrecall-worker-id", self.rng.choice(["fuzz", "fuzz", "other", ""])),)
        try:
            if rpc == "Decode":
                for _ in self.decode(iter(messages), timeout=TIMEOUT, metadata=metadata):
                    pass
            else:
                answer = self.unary[rpc](messages[0], timeout=TIMEOUT, metadata=metadata)
                if rpc == "OpenSession":  # never leave a session behind
                    opened = pb.OpenSessionResponse.FromString(answer)
                    close = pb.CloseSessionRequest(session_id=opened.session_id, capability=opened.capability)
                    self.unary["CloseSession"](close.SerializeToString(), timeout=TIMEOUT)  # the capability suffices
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED):
                self.bad.append(f"{rpc}: {code.name}: {exc.details()}")
        self.codes[(rpc, code.name)] += 1
        return len(messages)

    def close(self) -> None:
        self.staging.release()
        self.channel.close()


def log_kinds(text: str) -> dict[str, int]:
    kinds: collections.Counter = collections.Counter()
    for line in text.splitlines():
        if " rejected (" in line:
            kinds["rejections (rate-limited)"] += 1
        elif "similar lines dropped" in line:
            kinds["dropped-line counts"] += 1
        elif " WARNING " in line:
            kinds["warnings"] += 1
        elif " ERROR " in line:
            kinds["errors"] += 1
        else:
            kinds["operations"] += 1
    return dict(kinds)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.125, extra_args=["--page-kb", "256"], worker_share=None) as daemon:
        fuzzer = Fuzzer(daemon.target, args.seed)
        pid = daemon.process.pid
        fuzzer.refresh_sessions()
        log_before, rss_before = os.path.getsize(daemon.log_path), rss_kib(pid)
        started, sent, crashed = time.monotonic(), 0, False
        while sent < args.messages:
            rpc = RPCS[sent % len(RPCS)]
            sent += fuzzer.send(rpc)
            if daemon.process.poll() is not None:
                crashed = True
                break
            fuzzer.sessions = [s for s in fuzzer.sessions if fuzzer.rng.random() > 0.01]  # churn
            fuzzer.refresh_sessions()
        elapsed = time.monotonic() - started
        log_text = daemon.log()[log_before:]
        report = {
            "date": date.today().isoformat(),
            "command": " ".join(["python", "scripts/reliability_fuzz.py", *sys.argv[1:]]),
            "messages": sent,
            "calls": sum(fuzzer.codes.values()),
            "seconds": round(elapsed, 1),
            "crashed": crashed,
            "hangs": sum(1 for b in fuzzer.bad if "DEADLINE_EXCEEDED" in b),
            "internal_or_unknown": sum(1 for b in fuzzer.bad if "DEADLINE_EXCEEDED" not in b),
            "bad_examples": fuzzer.bad[:20],
            "codes": {f"{rpc} {code}": n for (rpc, code), n in sorted(fuzzer.codes.items())},
            "log_growth_bytes": len(log_text.encode()),
            "log_growth_lines": log_text.count("\n"),
            # rejections are rate-limited; lines for successful operations (opened, ingested,
            # closed) are one per operation, as in normal serving
            "log_lines_by_kind": log_kinds(log_text),
            "log_tracebacks": log_text.count("Traceback"),
            "daemon_rss_kib": {"before": rss_before, "after": rss_kib(pid) if not crashed else None},
            "healthy_after": not crashed and daemon.process.poll() is None,
        }
        fuzzer.close()
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 1 if report["crashed"] or report["hangs"] or report["internal_or_unknown"] else 0


if __name__ == "__main__":
    sys.exit(main())
