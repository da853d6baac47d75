"""LocalDaemon (what `kvrecall demo`, `eval` and the benches start): a clean stop leaves nothing
behind in the temporary directory; a daemon that died keeps its log there for diagnosis."""

from __future__ import annotations

import shutil
from pathlib import Path

from kvrecall.local import LocalDaemon


def test_a_clean_stop_removes_the_daemons_directory_and_a_death_keeps_its_log():
    with LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.25) as daemon:
        home = Path(daemon.socket).parent
        assert home.is_dir() and Path(daemon.log_path).parent == home
    assert not home.exists(), "a clean stop left its directory"

    died = LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.25).start()
    died.kill()  # SIGKILL: not a clean stop
    assert died.stop() not in (0, None)
    assert Path(died.log_path).is_file() and died.log(), "the dead daemon's log is gone"
    shutil.rmtree(Path(died.log_path).parent)
