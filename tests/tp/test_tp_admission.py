"""A rank whose daemon refuses the session does not leave the other rank waiting: both ranks
hear of it in the same collective, the one that opened closes its session, both exit."""

from __future__ import annotations

import os
import subprocess
import sys

from kvrecall.client import KVRecallClient
from kvrecall.local import LocalDaemon
from kvrecall.tp.launch import free_port


def test_a_refused_rank_stops_the_whole_group(tmp_path):
    roomy = LocalDaemon(host_pool_gb=0.25, device_pool_gb=0.1, log_path=str(tmp_path / "d0.log"))
    # ~100 KiB of host pages: less than one rank's prompt needs
    tiny = LocalDaemon(
        host_pool_gb=0.0001,
        device_pool_gb=0.1,
        extra_args=["--page-kb", "64"],
        log_path=str(tmp_path / "d1.log"),
    )
    with roomy, tiny:
        port = str(free_port())
        procs = []
        for rank, daemon in enumerate((roomy, tiny)):
            env = {
                **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                "KVRECALL_DEVICE": "cpu",  # the daemons run on the CPU, also where there is a GPU
            }  # fmt: skip
            argv = [
                sys.executable, "-m", "kvrecall.cli", "worker", "--target", daemon.target, "--worker-id", "tp",
                "--policy", "louiskv", "--sessions", "1", "--context-tokens", "200", "--max-new-tokens", "4",
            ]  # fmt: skip
            procs.append(
                subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        outputs = [p.communicate(timeout=240)[0] for p in procs]  # a hang would time out here
        assert all(p.returncode != 0 for p in procs), outputs
        assert "RESOURCE_EXHAUSTED" in outputs[1] or "ResourceExhausted" in outputs[1], outputs[1][-2000:]
        assert "RankOpenError" in outputs[0] and "ranks [1]" in outputs[0], outputs[0][-2000:]
        with KVRecallClient(roomy.target, "") as client:
            stats = client.stats()
            assert len(stats.sessions) == 0, "rank 0 must close the session it opened"
            assert {p.tier: p.used_bytes for p in stats.pools} == {"host": 0, "device": 0}
