"""ServerConfig: one typed configuration from defaults < file < environment < flags.

The settings are a pydantic model: types, coercion of strings from the environment and the
range checks live on the fields. `load_config` layers the sources and turns a validation
error into one ConfigError naming the setting where it came from (the file, the KVRECALL_*
variable or the flag's setting name). Validated once, at start; logged in full at start.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

GiB = 1 << 30
ENV_PREFIX = "KVRECALL_"


class ConfigError(ValueError):
    pass


def _int_any_base(raw: Any) -> Any:
    """'0o660' / '0x1b0' / '432' -> int: file modes are written in octal."""
    return int(raw, 0) if isinstance(raw, str) else raw


def _upper(raw: Any) -> Any:
    return raw.upper() if isinstance(raw, str) else raw


FileMode = Annotated[int, BeforeValidator(_int_any_base), Field(ge=0, le=0o777)]
PoolGiB = Annotated[float, Field(gt=0, le=4096)]


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: list[str] = ["unix:///tmp/kvrecall.sock"]  # unix:///path or HOST:PORT, comma-separated
    device: str = "cpu"                 # cpu | cuda | cuda:N
    host_pool_gb: PoolGiB = 4.0         # host tier (pinned on CUDA, shared memory on CPU)
    device_pool_gb: PoolGiB = 2.0       # working sets (GPU memory, or shared memory on CPU)
    page_kb: Annotated[int, Field(ge=4, multiple_of=4)] = 2048  # host page size
    lease_seconds: Annotated[float, Field(gt=0)] = 30.0  # default session lease
    max_lease_seconds: Annotated[float, Field(gt=0)] = 3600.0
    max_message_mb: Annotated[int, Field(ge=1)] = 512  # largest gRPC message accepted
    worker_quota_gb: Annotated[float, Field(ge=0)] = 0.0  # per-worker pool bytes (0 = unlimited)
    worker_share: Annotated[float, Field(gt=0, le=1)] = 0.5  # most of each pool one worker (tenant)
                                        # may hold, as a fraction; 1 = no fair-share limit
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0  # Prometheus /metrics port (0 = off)
    metrics_addr: str = "0.0.0.0"
    socket_mode: FileMode = 0o600       # unix socket permissions
    fd_socket: str = ""                 # unix socket handing working-set fds to workers (CPU daemons);
                                        # "" = beside the first unix listener ("<path>.fds")
    tls_cert: str = ""                  # PEM server certificate for TCP listeners
    tls_key: str = ""
    tls_client_ca: str = ""             # PEM CA bundle: require client certificates (mutual TLS)
    tokens_file: str = ""               # lines "worker_id token": bearer-token auth
    operators: list[str] = []           # worker ids (of tokens_file) that see every tenant's
                                        # sessions in GetStats; comma-separated
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"
    session_ops: Literal["thread", "inline"] = "thread"  # append / boundary work: a worker thread
                                        # (sessions overlap) or on the event loop (no thread hop)
    notice_ops: Literal["thread", "inline"] = "thread"  # a Boundaries call of AppendNotices only (a
                                        # batch's next step waits for it): a worker thread or the loop
    notice_stream: bool = True          # run those on a CUDA stream of their own, so their sync does not
                                        # wait for background retrievals' kernels (server/streams.py)
    switch_interval_ms: Annotated[float, Field(gt=0, le=100)] = 0.5  # sys.setswitchinterval: how long a
                                        # busy thread keeps the interpreter lock from one that waits
                                        # (Python's default 5 ms delays a notice behind retrievals)
    profile_out: str = ""               # a path: Boundaries work under cProfile, its busiest functions
                                        # written there as JSON at shutdown (server/profiling.py)
    kernel_profile_out: str = ""        # a path: the daemon's GPU kernels for kernel_profile_s from its
                                        # first retrieval (per name, the GPU time it held), JSON
    kernel_profile_s: Annotated[float, Field(gt=0, le=600)] = 3.0
    host_hugepages: bool = True         # back the pinned host tier with 2 MiB pages where the kernel's
                                        # transparent huge pages allow (a retrieval's host gather of
                                        # scattered rows misses the TLB on every row over 4 KiB pages)
    gate_launches: bool = False         # queue a retrieval's kernels behind a stream wait the host opens
                                        # before its first sync, so a worker on the same GPU is
                                        # preempted once per retrieval, not per kernel (launch_gate.py)
    gc_freeze: bool = True              # once serving, freeze the interpreter's objects (kvrecall/gcfreeze.py):
                                        # a full cyclic collection then walks what came after, not the
                                        # ~245K objects of startup (114 ms with every thread stopped on
                                        # a 2-core host, under 0.001 ms frozen: scripts/gc_pause_probe.py)
    capture_selection: bool = False     # replay louiskv's boundary selection (~25 kernels) as one CUDA
                                        # graph per session, re-captured when its unit table outgrows
                                        # a bucket (kvrecall/captured.py)
    coalesce_retrievals: bool = True    # retrieving Boundaries calls that arrive while one runs are served
                                        # together by the next run: one selection, placement and sync
                                        # (server/coalesce.py); no effect with session_ops=inline
    host_selection: bool = False        # a background louiskv retrieval whose rows all go to the worker
                                        # (worker_copy_share 1, StepEvent.worker_copies) is scored,
                                        # selected and planned on the host from a host copy of its unit
                                        # table: no retrieval kernel beside the worker but the segment
                                        # close (server/host_selection.py)
    worker_selection: bool = False      # (with worker_copy_share 1, or worker_selection_place device) a louiskv session of its own holds its
                                        # unit table in its working-set segment, the worker maps it and
                                        # chooses a background retrieval itself (StepEvent.worker_selected:
                                        # the daemon's own choice, kvrecall/client/selection.py), and the
                                        # daemon only places it (worker_selection_place) and closes the
                                        # open output segment the worker took as a unit
    worker_selection_place: Literal["host", "device"] = "host"  # where the daemon places a worker's choice:
                                        # planned and gathered by the host, sent by the copy engine (no
                                        # kernel of the daemon's but the segment close), or by its
                                        # placement kernels (a few launches; no host plan)
    dry_retrievals: bool = False        # DIAGNOSTIC, never in service: a retrieval event is answered
                                        # without retrieving (no selection, no placement, no GPU work;
                                        # the working set stays as it was), its notice still served: what
                                        # a boundary costs a worker beside the retrieval (bench e2e
                                        # --daemon-env KVRECALL_DRY_RETRIEVALS=1)
    dry_launches: Annotated[int, Field(ge=0, le=10000)] = 0  # DIAGNOSTIC, never in service: > 0: dry_retrievals,
                                        # and each retrieval call launches this many stand-in kernels
                                        # instead (step_batch.spin_kernels): what a daemon launch costs a
                                        # worker beside it, against their count and length
    dry_launch_cycles: Annotated[int, Field(ge=0, le=10**9)] = 0  # each stand-in kernel's length in GPU clock
                                        # cycles (torch.cuda._sleep; ~1,980 a microsecond at an H200's
                                        # boost clock); 0: a one-element add, the shortest kernel
    dry_retrievals_close: bool = False  # DIAGNOSTIC: dry_retrievals, but louiskv's open output segment
                                        # still closes at each retrieval (a few launches in the daemon's
                                        # context, one append kernel): what the close costs a worker alone,
                                        # the work a worker's own choice and placement would still leave it
    select_before_close: bool = False   # DIAGNOSTIC: at a boundary louiskv selects before it closes the
                                        # open output segment (the segment still closes, after), so the
                                        # segment's tokens are not candidates of that retrieval: what a
                                        # selection run by the worker over its mapped unit table would
                                        # choose without a close kernel of the daemon's first
                                        # (scripts/lag_fidelity.py --variants, DEVELOPERS.md)
    unit_reps_dtype: Literal["layout", "fp8"] = "layout"  # louiskv's unit table stores its representatives
                                        # (cluster centroids, segment means) in the layout's 16-bit dtype
                                        # (f32 for an f32 layout), or in float8 e4m3 (values clamped to
                                        # +-448): half the table's GPU memory and half the bytes a retrieval's
                                        # scoring reads (at 128K a session's bf16 table is 0.5 GB)
    dry_index_copies: bool = False      # DIAGNOSTIC, never in service: a staged placement's rows are
                                        # gathered and moved to the device but never index-copied into
                                        # the working sets (their slot positions are): what the daemon's
                                        # own index copies cost a worker beside it
    dry_uploads: bool = False           # DIAGNOSTIC, never in service: dry_index_copies, and the rows are
                                        # not even gathered on the host or moved by DMA (the plan and
                                        # its sync alone): what the copy engine's transfers cost a worker
    dry_transfers: bool = False         # DIAGNOSTIC, never in service: a staged placement's rows are neither
                                        # gathered on the host nor moved by DMA, but zeros are index-copied
                                        # into their slots: what the index copies cost a worker without the
                                        # copy engine's transfers before them (against dry_index_copies)
    dry_index_scratch: bool = False     # DIAGNOSTIC, never in service: a staged placement's rows are gathered,
                                        # moved and index-copied as always, but into a stand-in of each
                                        # working set that no worker reads: the index copies' kernels at
                                        # the same moment, another destination (against dry_index_copies:
                                        # whether their cost is the daemon's kernels or what they write)
    dry_index_share: Annotated[float, Field(ge=0, le=1)] = 1.0  # DIAGNOSTIC, never in service below 1: a
                                        # staged placement index-copies only this share of each session's
                                        # rows into their slots (at least one: at 0 the launches alone),
                                        # the rest never arrive: whether the index copies cost a worker by
                                        # their launches or by the rows they copy
    dry_index_defer: bool = False       # DIAGNOSTIC, never in service: a staged placement's index copies are
                                        # launched at the start of the next one's (one burst of the
                                        # daemon's kernels a call, not two) and its answer does not wait
                                        # for them: whether a second burst is what the index copies cost
    dry_plan_sync: bool = False         # DIAGNOSTIC, never in service: dry_uploads, and the plan is not
                                        # even read back (no host sync in the middle of a retrieval call:
                                        # its one sync is the answer's): what that sync costs a worker
    plan_readback: Literal["mapped", "copy"] = "mapped"  # how a staged retrieval's plan (the rows the host
                                        # gathers) reaches the host: the plan kernel writes it into pinned
                                        # host memory itself (mapped), or a DMA copies it after the kernel
                                        # (copy; the way before 2026-12-04, kept for comparison)
    worker_copy_share: Annotated[float, Field(ge=0, le=1)] = 0.5  # > 0: each CUDA IPC / shm session's segment
                                        # carries a staging area for this share of its retrieved region;
                                        # a background retrieval whose caller asks (StepEvent.worker_copies)
                                        # and whose new rows fit leaves them there and the worker copies
                                        # them into their slots (no index copies in the daemon's context:
                                        # a daemon process's boundary at 32K x 8 on an H200 1.074x the 0%
                                        # step at 0.25 against 1.095-1.098x at 0, 2026-12-04); 0 = none
                                        # (placement_staged.py). 0.5: a real model's retrievals move ~0.2-0.26
                                        # of a budget (docs/TUNING.md)
    phases_out: str = ""                # a path: each Boundaries call's time per phase (kvrecall/phases.py),
                                        # mean and quantiles per phase written there as JSON at shutdown
    host_reads: Literal["auto", "copy", "kernel"] = "auto"  # how a background retrieval's rows (one
                                        # the worker does not wait for) leave the pinned host tier:
                                        # gathered by the host, one DMA by the copy engine, or the
                                        # placement kernel's own loads over PCIe (holds the SMs);
                                        # auto: copy up to 768 MiB a call, the kernel above
    follow_wait_s: Annotated[float, Field(gt=0, le=600)] = 30.0  # longest a Boundaries event waits for the
                                        # notice it follows (StepEvent.follows) before FAILED_PRECONDITION
    parent_pid: Annotated[int, Field(ge=0)] = 0  # > 0: stop (as on SIGTERM) once this process, the daemon's
                                        # parent, is gone: a tool's private daemon (LocalDaemon) does not
                                        # outlive a tool that was killed; 0 = off
    warmup: str = "bfloat16:128"        # dtype:head_dim pairs whose kernels compile at start (CUDA only;
                                        # "" = none), e.g. "bfloat16:128,float16:64"
    cpus: str = ""                      # CPUs the daemon's threads run on, e.g. "8-15" or "2,3" (a subset of
                                        # the process's); "" = the process's own. Embedded in a worker: its
                                        # threads only, so the worker's Python keeps the other cores

    @field_validator("listen", "operators", mode="before")
    @classmethod
    def _split_commas(cls, raw: Any) -> Any:
        return [a for a in raw.split(",") if a] if isinstance(raw, str) else raw

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, listen: list[str]) -> list[str]:
        if not listen:
            raise ValueError("at least one address is required")
        for address in listen:
            if not address.startswith("unix://") and ":" not in address:
                raise ValueError(f"{address!r} must be unix:///path or HOST:PORT")
        return listen

    @field_validator("device")
    @classmethod
    def _check_device(cls, device: str) -> str:
        if not (device in ("cpu", "cuda") or device.startswith("cuda:")):
            raise ValueError(f"{device!r} must be cpu, cuda or cuda:N")
        return device

    @field_validator("cpus")
    @classmethod
    def _check_cpus(cls, cpus: str) -> str:
        if cpus:
            cpu_set(cpus)  # ValueError naming what is wrong
        return cpus

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "tokens_file")
    @classmethod
    def _check_file(cls, path: str) -> str:
        if path and not Path(path).is_file():
            raise ValueError(f"no file {path!r}")
        return path

    @model_validator(mode="after")
    def _check_together(self) -> ServerConfig:
        if self.lease_seconds > self.max_lease_seconds:
            raise ValueError("lease_seconds: must be in (0, max_lease_seconds]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: needs tls_cert and tls_key")
        return self

    @field_validator("warmup")
    @classmethod
    def _check_warmup(cls, warmup: str) -> str:
        try:
            parse_warmup(warmup)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("warmup: ")) from None
        return warmup

    @property
    def warmup_shapes(self) -> list[tuple[Any, int]]:
        """The warmup setting as (torch dtype, head dim) pairs."""
        return parse_warmup(self.warmup)

    @property
    def fd_socket_path(self) -> str:
        """Where workers fetch their working sets' file descriptors."""
        if self.fd_socket:
            return self.fd_socket
        for address in self.listen:
            if address.startswith("unix://"):
                return address[len("unix://") :] + ".fds"
        return f"/tmp/kvrecall-{os.getpid()}.fds"

    @property
    def host_pool_bytes(self) -> int:
        return int(self.host_pool_gb * GiB)

    @property
    def device_pool_bytes(self) -> int:
        return int(self.device_pool_gb * GiB)

    def tokens(self) -> dict[str, str]:
        """token -> worker id from tokens_file."""
        if not self.tokens_file:
            return {}
        tokens = {}
        for number, line in enumerate(Path(self.tokens_file).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ConfigError(f"tokens_file line {number}: expected 'worker_id token'")
            tokens[parts[1]] = parts[0]
        return tokens

    def summary(self) -> dict[str, Any]:
        return self.model_dump()


def parse_warmup(text: str) -> list[tuple[Any, int]]:
    """"bfloat16:128,float16:64" -> [(torch.bfloat16, 128), (torch.float16, 64)]."""
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    shapes = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        dtype, _, dim = item.partition(":")
        if dtype not in dtypes or not dim.isdigit() or not 1 <= int(dim) <= 1024:
            raise ConfigError(
                f"warmup: {item!r} must be DTYPE:HEAD_DIM, DTYPE one of {sorted(dtypes)}, HEAD_DIM in [1, 1024]"
            )
        shapes.append((dtypes[dtype], int(dim)))
    return shapes


def _read_file(file: str) -> dict[str, Any]:
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"config: no file {file!r}")
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(path.read_text())
    return json.loads(path.read_text())


def load_config(
    file: str | None = None, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None
) -> ServerConfig:
    """defaults < JSON/TOML file < KVRECALL_* environment < explicit overrides (flags)."""
    names = set(ServerConfig.model_fields)
    values: dict[str, Any] = {}
    source: dict[str, str] = {}  # setting -> how an error names it
    for key, raw in (_read_file(file) if file else {}).items():
        if key not in names:
            raise ConfigError(f"config {file}: unknown setting {key!r}")
        values[key], source[key] = raw, f"config {file}: {key}"
    env = os.environ if env is None else env
    for key in names:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key], source[key] = raw, ENV_PREFIX + key.upper()
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key], source[key] = raw, key
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        problem = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule across settings: the message names them
            raise ConfigError(problem) from None
        key = str(error["loc"][0])
        raise ConfigError(f"{source.get(key, key)}: {problem} (got {error['input']!r})") from None


def cpu_set(spec: str) -> set[int]:
    """ "0-3,8" -> {0, 1, 2, 3, 8}: a non-empty subset of the CPUs this process may run on
    (ValueError otherwise)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError(f"{part!r} is not a CPU number or a range like 8-15") from None
        if first < 0 or last < first:
            raise ValueError(f"{part!r} is not a CPU number or a range like 8-15")
        cpus.update(range(first, last + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"CPUs {_ranges(cpus - allowed)} are not among this process's {_ranges(allowed)}")
    return cpus


def _ranges(cpus: set[int]) -> str:
    out, ordered = [], sorted(cpus)
    start = prev = ordered[0]
    for cpu in ordered[1:] + [None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(out)
