"""Prometheus metrics (kvrecall_*), one registry per daemon."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kvrecall import captured, launch_gate


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("kvrecall_sessions", "Open sessions, by worker id", ["worker"], registry=r)
        self.sessions_opened = Counter("kvrecall_sessions_opened", "Sessions opened, by policy name", ["policy"], registry=r)
        self.sessions_closed = Counter(
            "kvrecall_sessions_closed", "Sessions closed; reason: closed | lease_expired | shutdown", ["reason"], registry=r
        )
        self.pool_used = Gauge("kvrecall_pool_used_bytes", "Pool bytes in use; tier: host | device", ["tier"], registry=r)
        self.pool_free = Gauge("kvrecall_pool_free_bytes", "Pool bytes free; tier: host | device", ["tier"], registry=r)
        self.pool_metadata = Gauge(
            "kvrecall_pool_metadata_bytes", "Of the pool's used bytes, those reserved for policy metadata; tier: device",
            ["tier"], registry=r,
        )
        self.boundaries = Counter("kvrecall_boundaries", "Boundary retrievals served, by policy name", ["policy"], registry=r)
        self.appends = Counter("kvrecall_appends", "Append notices served", registry=r)
        self.worker_copied_rows = Counter(
            "kvrecall_worker_copied_rows",
            "Retrieved K / V rows left in sessions' staging areas for their workers to copy (worker_copy_share; "
            "the daemon copied the rest)", registry=r,
        )  # fmt: skip
        self.host_selections = Counter(
            "kvrecall_host_selections",
            "Retrievals planned on the host, no retrieval kernel on the GPU; fetch: whole / log (selected on the host, "
            "host_selection: the unit table's host copy fetched whole | only the segments closed since) | worker "
            "(chosen by the worker over its mapped table, worker_selection) | worker-device (so chosen, placed by the "
            "daemon's placement kernels: worker_selection_place=device)",
            ["fetch"], registry=r,
        )  # fmt: skip
        self.bytes_moved = Counter(
            "kvrecall_bytes_moved",
            "Bytes moved between tiers; direction: worker_to_host | host_to_device | host_to_attention "
            "(a chunk's exact attention read the host tier)",
            ["direction"], registry=r,
        )
        self.rpc_latency = Histogram(
            "kvrecall_rpc_seconds",
            "Daemon-side handling time per RPC or Decode stream message (method: e.g. OpenSession, Decode.boundary)",
            ["method"],
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5, 10.0),
            registry=r,
        )
        self.boundaries_phase = Histogram(
            "kvrecall_boundaries_phase_seconds",
            "Where a Boundaries call's time went in the daemon, by phase (kvrecall/phases.py: e.g. select, plan_sync, "
            "gather, sync); kind: retrievals | notices (calls with and without a retrieval)",
            ["kind", "phase"],
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.5),
            registry=r,
        )
        self.retrieval_run_calls = Histogram(
            "kvrecall_retrieval_run_calls",
            "Retrieving Boundaries calls served by one run (coalesce_retrievals: the calls that arrived while a run "
            "was under way are served together by the next); _sum over _count is the mean",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.follow_wait = Histogram(
            "kvrecall_follow_wait_seconds",
            "How long a Boundaries event waited for the AppendNotice it follows (StepEvent.follows) to be applied "
            "before its call ran; a notice that never came ends as errors{method=Boundaries,code=FAILED_PRECONDITION}",
            buckets=(1e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 5.0, 30.0),
            registry=r,
        )
        self.prefixes = Gauge("kvrecall_prefixes", "Shared prompt prefixes held (referenced or cached)", registry=r)
        self.prefix_bytes = Gauge("kvrecall_prefix_bytes", "Host bytes of the shared prefixes held", registry=r)
        self.prefix_refs = Gauge("kvrecall_prefix_refs", "Open sessions reading a shared prefix", registry=r)
        self.prefix_hits = Counter("kvrecall_prefix_hits", "Sessions opened on a held prefix (no ingest of it)", registry=r)
        self.prefix_registered = Counter("kvrecall_prefix_registered", "Prefixes registered after their first ingest", registry=r)
        self.prefix_evictions = Counter(
            "kvrecall_prefix_evictions", "Unreferenced prefixes evicted to admit a session or a prefix", registry=r
        )
        # launch_gate's process-wide counts (gate_launches), read at scrape time
        self.launch_gate_calls = gated = Gauge("kvrecall_launch_gate_calls", "Retrieving calls whose kernels were queued behind the launch gate "
                      "(gate_launches), since start", registry=r)  # fmt: skip
        gated.set_function(lambda: launch_gate.STATS.closed)
        self.launch_gate_timeouts = late = Gauge("kvrecall_launch_gate_timeouts", "Gated calls the watchdog opened (a host sync inside the gate: "
                     "each cost its call 20 ms), since start", registry=r)  # fmt: skip
        late.set_function(lambda: launch_gate.STATS.timeouts)
        # captured's process-wide counts (capture_selection), read at scrape time
        self.captured_selections = graphs = Gauge("kvrecall_captured_selections", "Boundary selections by kind: "
                                                  "captures, replays (one CUDA graph launch each), failures "
                                                  "(then kernel by kernel), since start", ["kind"], registry=r)  # fmt: skip
        for kind in ("captures", "replays", "failures"):
            graphs.labels(kind).set_function(lambda kind=kind: captured.STATS[kind])
        self.errors = Counter("kvrecall_errors", "Requests answered with an error; code: the gRPC status name", ["method", "code"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
