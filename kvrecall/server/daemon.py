"""Daemon assembly: grpc.aio on uvloop, health + reflection, leases, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvrecall import __version__, captured, gcfreeze, kernels, launch_gate
from kvrecall.fdpass import FdServer, claim_socket_path
from kvrecall.kernels import placement_staged
from kvrecall.phases import PhaseLog
from kvrecall.server import host_selection, step_batch
from kvrecall.server.config import ServerConfig, cpu_set
from kvrecall.server.metrics import Metrics
from kvrecall.server.policies import louiskv
from kvrecall.server.pools import DevicePool, HostPool
from kvrecall.server.profiling import KernelProfiler, OpsProfiler
from kvrecall.server.service import AuthConfig, KVRecallService
from kvrecall.server.session import SessionRegistry
from kvrecall.server.warmup import warm_up
from kvrecall.server.wire import add_service
from kvrecall.shm import remove_stale_segments
from kvrecall.v1 import kvrecall_pb2 as pb

log = logging.getLogger("kvrecall.daemon")


def _warn_staged_diagnostics(config: ServerConfig) -> None:
    """Log each staged-placement diagnostic that is on and does something (dry_uploads and
    dry_plan_sync leave no index copy to alter; dry_index_copies leaves none to defer, share out
    or redirect): one warning each, as several can be on together."""
    if config.dry_uploads or config.dry_plan_sync:
        log.warning("%s is on: staged retrievals neither gather nor move their rows%s (a diagnostic; accuracy is "
                    "not kvrecall's)", "dry_plan_sync" if config.dry_plan_sync else "dry_uploads",
                    ", nor read their plans back" if config.dry_plan_sync else "")  # fmt: skip
        return
    if config.dry_transfers:
        log.warning("dry_transfers is on: staged retrievals write zeros into their rows' slots instead of the rows "
                    "(a diagnostic; accuracy is not kvrecall's)")
    if config.dry_index_copies:
        log.warning("dry_index_copies is on: staged retrievals never write their rows into the working sets "
                    "(a diagnostic; accuracy is not kvrecall's)")
        return
    if config.dry_index_defer:
        log.warning("dry_index_defer is on: staged retrievals' rows reach their slots at the next staged retrieval, "
                    "after their answers (a diagnostic; accuracy is not kvrecall's)")
    if config.dry_index_share < 1:
        log.warning("dry_index_share is %s: staged retrievals write only that share of their rows into the working "
                    "sets (a diagnostic; accuracy is not kvrecall's)", config.dry_index_share)
    if config.dry_index_scratch:
        log.warning("dry_index_scratch is on: staged retrievals write their rows into stand-ins of the working sets "
                    "that no worker reads (a diagnostic; accuracy is not kvrecall's)")


def _warn_needs_share_one(config: ServerConfig, name: str, who: str, on: str, needed: bool = True) -> None:
    """Log that setting `name` is on (`on`), or that it can do nothing without worker_copy_share 1
    (where it `needed` it)."""
    if not getattr(config, name):
        return
    if needed and config.worker_copy_share < 1:
        log.warning("%s is on but worker_copy_share is %s: %s only for sessions whose staging area takes a whole "
                    "retrieval (worker_copy_share 1), so none will", name, config.worker_copy_share, who)  # fmt: skip
    else:
        log.warning("%s is on: %s", name, on)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVRecall"].full_name
REAP_INTERVAL = 1.0
PARENT_POLL_S = 0.5  # parent_pid: how often the daemon checks that its parent is still there


class Daemon:
    """Owns the pools, the registry and the gRPC server; `run()` serves until a signal."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        if config.cpus:  # this thread's CPUs, so every thread it starts (embedded: the daemon's threads only)
            os.sched_setaffinity(0, cpu_set(config.cpus))
            log.info("cpus: the daemon's threads run on CPUs %s", config.cpus)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:  # --device cuda: the first GPU
            self.device = torch.device("cuda", 0)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("device: CUDA requested but torch sees no CUDA device")
            torch.cuda.set_device(self.device)
        removed = remove_stale_segments()
        if removed:
            log.warning("removed %d shared-memory segments left by dead daemons", len(removed))
        kernels.set_host_reads(config.host_reads)
        launch_gate.configure(config.gate_launches)
        captured.configure(config.capture_selection)
        step_batch.configure(config.dry_retrievals, config.dry_retrievals_close, config.dry_launches,
                             config.dry_launch_cycles)
        host_selection.configure(config.host_selection, config.worker_selection_place)
        louiskv.configure(config.select_before_close, config.unit_reps_dtype)
        if config.select_before_close:
            log.warning("select_before_close is on: louiskv selects at a boundary before closing the open output "
                        "segment (a diagnostic of a worker-side selection's accuracy)")
        _warn_needs_share_one(config, "host_selection", "the daemon selects on the host",
                              "louiskv retrievals are selected on the host (experimental; on an H200 its answers "
                              "came 3-4x past a 4-step lag at 32K x 8, docs/TUNING.md)")  # fmt: skip
        by_kernels = config.worker_selection_place == "device"  # (no staging area needed)
        place = "by the daemon's kernels" if by_kernels else "from the host"
        _warn_needs_share_one(config, "worker_selection", "workers choose",
                              f"workers choose louiskv retrievals over their mapped unit tables, placed {place} "
                              "(experimental: on an H200 a boundary cost more than with the daemon's own choice, docs/TUNING.md)", needed=not by_kernels)  # fmt: skip
        placement_staged.configure(config.dry_index_copies, config.dry_uploads, config.dry_plan_sync,
                                   config.plan_readback, config.dry_transfers, config.dry_index_scratch,
                                   config.dry_index_share, config.dry_index_defer)
        _warn_staged_diagnostics(config)
        if config.dry_launches:
            log.warning("dry_launches is on: Boundaries retrievals place nothing and launch %d stand-in kernels of %d "
                        "cycles each (a diagnostic)", config.dry_launches, config.dry_launch_cycles)
        elif config.dry_retrievals or config.dry_retrievals_close:
            log.warning("dry_retrievals%s is on: Boundaries retrievals select and place nothing (a diagnostic; "
                        "the working sets keep what they hold and accuracy is not kvrecall's)",
                        "_close (louiskv's open segments still close)" if config.dry_retrievals_close else "")
        sys.setswitchinterval(config.switch_interval_ms / 1e3)
        self.host_pool = HostPool(
            config.host_pool_bytes, page_bytes=config.page_kb * 1024, pinned=self.device.type == "cuda",
            hugepages=config.host_hugepages,
        )
        self.device_pool = DevicePool(config.device_pool_bytes, self.device)
        self.registry = SessionRegistry(
            self.host_pool,
            self.device_pool,
            default_lease=config.lease_seconds,
            max_lease=config.max_lease_seconds,
            worker_quota_bytes=int(config.worker_quota_gb * (1 << 30)),
            worker_share=config.worker_share,
            worker_copy_share=config.worker_copy_share,
            worker_selection=config.worker_selection,
            worker_selection_place=config.worker_selection_place,
        )
        self.metrics = Metrics()
        auth = AuthConfig(config.tokens(), tuple(config.operators))
        # Working sets in shared memory (a CPU daemon) reach their workers as file descriptors.
        fd_socket = config.fd_socket_path if self.device.type == "cpu" else ""
        self.kernel_profiler = (
            KernelProfiler(config.kernel_profile_out, self.device, config.kernel_profile_s)
            if config.kernel_profile_out
            else None
        )
        self.service = KVRecallService(
            self.registry, self.device, self.metrics, auth, config.session_ops, fd_socket,
            notice_ops=config.notice_ops, notice_stream=config.notice_stream,
            profiler=OpsProfiler(config.profile_out) if config.profile_out else None,
            kernel_profiler=self.kernel_profiler, follow_wait_s=config.follow_wait_s,
            phase_log=PhaseLog(config.phases_out) if config.phases_out else None,
            coalesce_retrievals=config.coalesce_retrievals,
        )  # fmt: skip
        self.fd_server = FdServer(fd_socket, config.socket_mode, self.service.segment_fd) if fd_socket else None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._stopping = asyncio.Event()

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        c = self.config
        if not c.tls_cert:
            return None
        with open(c.tls_key, "rb") as f:
            key = f.read()
        with open(c.tls_cert, "rb") as f:
            cert = f.read()
        ca = None
        if c.tls_client_ca:
            with open(c.tls_client_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=bool(ca))

    async def start(self) -> None:
        c = self.config
        if self.device.type == "cuda" and c.warmup_shapes:  # before serving: the first session pays nothing
            seconds = warm_up(self.registry, c.warmup_shapes)
            log.info("warm-up: kernels for %s ready in %.1fs", c.warmup, seconds)
        max_bytes = c.max_message_mb * (1 << 20)
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_bytes),
                ("grpc.max_send_message_length", max_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        add_service(self.service, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), self.server)
        credentials = self._server_credentials()
        for address in c.listen:
            if address.startswith("unix://"):
                claim_socket_path(address[len("unix://") :])  # a live daemon's socket is never taken over
                old = os.umask(0o777 & ~c.socket_mode)
                try:
                    self.server.add_insecure_port(address)
                finally:
                    os.umask(old)
            elif credentials is not None:
                self.server.add_secure_port(address, credentials)
            else:
                self.server.add_insecure_port(address)
        if self.fd_server is not None:
            await self.fd_server.start()
        await self.server.start()
        for address in c.listen:
            if address.startswith("unix://"):
                os.chmod(address[len("unix://") :], c.socket_mode)
        for name in ("", SERVICE_NAME):
            await self._set_health(name, health_pb2.HealthCheckResponse.SERVING)
        if c.metrics_port:
            self.metrics.serve(c.metrics_port, c.metrics_addr)
        self.service._update_pool_gauges()
        if c.gc_freeze:
            log.info("gc_freeze: %d objects of startup frozen (kvrecall/gcfreeze.py)", gcfreeze.freeze())
        log.info(
            "kvrecall %s serving on %s device=%s host_pool=%s (%d bytes) device_pool=%d bytes tls=%s auth=%s metrics=%s",
            __version__, ",".join(c.listen), self.device, self.host_pool.kind, self.host_pool.capacity_bytes,
            self.device_pool.capacity_bytes, bool(c.tls_cert), bool(c.tokens_file), c.metrics_port or "off",
        )

    async def _set_health(self, name: str, status: int) -> None:
        result = self.health.set(name, status)
        if asyncio.iscoroutine(result):
            await result

    async def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), REAP_INTERVAL)
            await self.service.reap_expired()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self.start()
        await self.serve_until_stopped()

    async def serve_until_stopped(self, signals: bool = True) -> None:
        """After start(): reap expired leases until request_stop() (or SIGINT / SIGTERM where
        `signals`: a daemon of its own process), then stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM) if signals else ():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        reaper = asyncio.create_task(self._reap_loop())
        watcher = asyncio.create_task(self._watch_parent()) if self.config.parent_pid else None
        await self._stopping.wait()
        await self.stop()
        reaper.cancel()
        if watcher is not None:
            watcher.cancel()

    async def _watch_parent(self) -> None:
        """parent_pid: stop once the parent is gone (the daemon is reparented), e.g. a bench
        killed by a time limit, whose private daemon would otherwise hold its pools."""
        while not self._stopping.is_set():
            if os.getppid() != self.config.parent_pid:
                log.warning("parent process %d is gone (the daemon's parent is now %d): stopping",
                            self.config.parent_pid, os.getppid())
                self.request_stop()
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PARENT_POLL_S)

    async def stop(self, grace: float = 2.0) -> None:
        log.info("shutting down: %d open sessions will be released", len(self.registry.sessions))
        for name in ("", SERVICE_NAME):
            await self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(grace)
        if self.fd_server is not None:
            await self.fd_server.close()
        for session in list(self.registry.sessions.values()):
            self.service._close(session, "shutdown")
        if self.service.profiler is not None:  # before the pool's release, which can take a while
            self.service.profiler.write()
            log.info("profile of the Boundaries work written to %s", self.service.profiler.path)
        if self.service.phase_log is not None:
            self.service.phase_log.write()
            log.info("the Boundaries calls' phases written to %s", self.service.phase_log.path)
        if self.kernel_profiler is not None:
            self.kernel_profiler.finish()
            log.info("profile of the daemon's GPU kernels written to %s", self.kernel_profiler.path)
        if self.config.capture_selection:
            stats = captured.STATS
            log.info("captured selections: %d captures, %d replays, %d failed captures (then kernel by kernel)",
                     stats["captures"], stats["replays"], stats["failures"])  # fmt: skip
        self.host_pool.close()
        for address in self.config.listen:
            if address.startswith("unix://"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(address[len("unix://") :])
        log.info("stopped")


def serve(config: ServerConfig) -> None:
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("config: %s", json.dumps(config.summary(), default=str))
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop not installed; using the default asyncio loop")
        asyncio.run(Daemon(config).run())
        return
    uvloop.run(Daemon(config).run())
