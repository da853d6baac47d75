"""Launch gate: a retrieval's kernels reach the GPU as one burst, not one by one (issue #17).

The daemon launches a retrieval's ~70 kernels from Python over 2-4 ms; each is a few
microseconds of GPU work, so the GPU runs each as it arrives, and a worker decoding on the same
GPU (another process: the two contexts time-slice) is preempted once per kernel rather than once
per retrieval. With the gate on, a retrieving Boundaries call first queues on its stream a wait
on a pinned host word (cuStreamWaitValue32); everything it launches queues behind it; the host
opens the gate (writes the word) before its first host sync, and the GPU runs the whole queue
at once.

A sync while the gate is closed would wait for ever for a word only this thread writes, so
`release()` must come first: the staged placement calls it before its plan sync and the
Boundaries call before its last sync. A sync nobody found (a `.item()` in a policy, say) is
covered by a watchdog that opens the gate after `WATCHDOG_S` and counts it (`timeouts`), so
the cost of a missed one is a delay, not a hang.

Off by default (`gate_launches` in the daemon's config, KVRECALL_GATE_LAUNCHES); a CPU daemon
never gates. Needs the CUDA driver's stream memory operations (every Hopper GPU with a
recent driver); where the driver refuses them the gate logs once and stays open.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Iterator

import torch

log = logging.getLogger("kvrecall.launch_gate")

WATCHDOG_S = 0.02  # a gate still closed this long after it closed is opened by the watchdog
_WAIT_GEQ = 0  # CU_STREAM_WAIT_VALUE_GEQ


class Driver:
    """The two driver calls (libcuda through ctypes; torch does not expose them)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self.device_pointer = lib.cuMemHostGetDevicePointer_v2
        self.device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self.wait = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        self.wait.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]


class Gate:
    """One thread's gate on one device: a pinned int32 word and the value it waits for next."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver
        self.word = torch.zeros(1, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        pointer = ctypes.c_uint64()
        code = driver.device_pointer(ctypes.byref(pointer), ctypes.c_void_p(self.word.data_ptr()), 0)
        if code != 0:
            raise RuntimeError(f"cuMemHostGetDevicePointer: CUresult {code}")
        self._address = pointer.value
        self._value = 0
        self._closed = False
        self._lock = threading.Lock()

    def close(self, stream: torch.cuda.Stream) -> None:
        """Queue on `stream` a wait for the next value; what follows on it waits for open()."""
        code = self._driver.wait(ctypes.c_void_p(stream.cuda_stream), self._address, self._value + 1, _WAIT_GEQ)
        if code != 0:
            raise RuntimeError(f"cuStreamWaitValue32: CUresult {code}")
        with self._lock:
            self._value += 1
            self._closed = True
            value = self._value
        _WATCHDOG.watch(self, value)

    def open(self) -> bool:
        """Let the queued work run; False when it was not closed."""
        with self._lock:
            if not self._closed:
                return False
            self.word[0] = self._value
            self._closed = False
            return True

    def _watchdog(self, value: int) -> None:
        with self._lock:
            late = self._closed and self._value == value
        if late and self.open():
            STATS.count_timeout()


class _Watchdog:
    """One thread for every gate (not a timer thread per retrieval): opens a gate still closed
    WATCHDOG_S after it closed, in closing order (every deadline is the same span after its close)."""

    def __init__(self) -> None:
        self._due: collections.deque[tuple[float, Gate, int]] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, gate: Gate, value: int) -> None:
        with self._wake:
            self._due.append((time.monotonic() + WATCHDOG_S, gate, value))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvrecall-launch-gate", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due:
                    self._wake.wait()
                deadline, gate, value = self._due[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                self._due.popleft()
            gate._watchdog(value)  # a gate opened in time (or closed again since) is left alone


class _Stats:
    def __init__(self) -> None:
        self.closed = 0
        self.timeouts = 0
        self._lock = threading.Lock()

    def count_close(self) -> None:
        with self._lock:
            self.closed += 1

    def count_timeout(self) -> None:
        with self._lock:
            self.timeouts += 1
        log.warning("a retrieval's launch gate was still closed after %.0f ms (a host sync inside it?): "
                    "the watchdog opened it", WATCHDOG_S * 1e3)  # fmt: skip


STATS = _Stats()
_WATCHDOG = _Watchdog()
_enabled = False
_driver: Driver | None = None
_gates: dict[tuple[int, int | None], Gate] = {}
_current = threading.local()
_setup_lock = threading.Lock()


def configure(enabled: bool) -> None:
    """The daemon's setting (at start). Turning it on loads the driver calls once; where that
    fails the gate stays off and the log says why."""
    global _enabled, _driver
    with _setup_lock:
        if enabled and _driver is None and torch.cuda.is_available():
            try:
                _driver = Driver()
            except (OSError, AttributeError) as exc:
                log.warning("launch gate off: the CUDA driver's stream wait is not available (%s)", exc)
                enabled = False
        _enabled = enabled and _driver is not None


def enabled() -> bool:
    return _enabled


def _gate(device: torch.device) -> Gate:
    index = device.index if device.index is not None else torch.cuda.current_device()  # "cuda" alone
    key = (threading.get_ident(), index)
    with _setup_lock:
        gate = _gates.get(key)
        if gate is None:
            assert _driver is not None
            # The driver calls need the device's context current on this thread (a daemon worker
            # thread may not have bound it yet: CUresult 201); cudaSetDevice binds the primary one.
            torch.cuda.set_device(index)
            gate = _gates[key] = Gate(_driver)
        return gate


@contextlib.contextmanager
def held(device: torch.device | None) -> Iterator[None]:
    """Gate the calling thread's current stream on `device` for the block (nothing on a CPU or
    with the gate off); the gate opens at release() or at the block's end, whichever is first."""
    if not _enabled or device is None or device.type != "cuda":
        yield
        return
    try:
        gate = _gate(device)
        gate.close(torch.cuda.current_stream(device))
    except Exception as exc:  # noqa: BLE001 - an optimisation never fails a retrieval: run ungated from here on
        configure(False)
        log.warning("launch gate off: %s", exc)
        yield
        return
    STATS.count_close()
    _current.gate = gate
    try:
        yield
    finally:
        _current.gate = None
        gate.open()


def release() -> None:
    """Open the calling thread's gate, if one is closed: call before any host sync."""
    gate = getattr(_current, "gate", None)
    if gate is not None:
        gate.open()
