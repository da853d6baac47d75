"""A tool's private daemon (LocalDaemon, `serve --parent-pid`) stops once the process that
started it is gone: a bench or eval killed by a time limit must not leave a daemon holding its
pools. Real processes: a parent that starts a daemon, then is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent(
    """
    import sys, time
    from kvrecall.local import LocalDaemon
    daemon = LocalDaemon(host_pool_gb=0.05, device_pool_gb=0.05, extra_args=["--warmup", ""]).start()
    print(daemon.process.pid, daemon.log_path, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.exists("/proc"), reason="reads /proc")
def test_the_daemon_stops_when_its_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, log_path = parent.stdout.readline().split()
        daemon = int(pid_text)
        assert _alive(daemon)
        parent.send_signal(signal.SIGKILL)  # no cleanup of any kind runs in the parent
        parent.wait(10)
        deadline = time.monotonic() + 20
        while _alive(daemon) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(daemon), "the daemon outlived its parent"
        with open(log_path) as f:
            log = f.read()
        assert "parent process" in log and "is gone" in log and "stopped" in log, log[-2000:]
        shutil.rmtree(os.path.dirname(log_path), ignore_errors=True)  # the parent could not remove it
    finally:
        parent.kill()
        parent.wait()


def test_parent_pid_is_off_by_default_and_validated():
    """parent_pid 0 (the default for `kvrecall serve`): no watch."""
    from kvrecall.server.config import ConfigError, load_config

    assert load_config(None, {}).parent_pid == 0
    with pytest.raises(ConfigError, match="parent_pid"):
        load_config(None, {"parent_pid": -1})
