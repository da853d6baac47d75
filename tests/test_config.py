"""The daemon's settings: defaults < file < KVRECALL_* environment < flags, typed, and every
error names the setting where it came from."""

from __future__ import annotations

import json

import pytest

from kvrecall.server.config import ConfigError, load_config


def test_defaults():
    config = load_config(env={})
    assert config.listen == ["unix:///tmp/kvrecall.sock"] and config.host_pool_gb == 4.0
    assert config.socket_mode == 0o600 and config.session_ops == "thread"
    assert config.notice_ops == "thread" and config.notice_stream and config.switch_interval_ms == 0.5
    assert config.host_pool_bytes == 4 << 30


def test_layers_in_order(tmp_path):
    file = tmp_path / "kvrecall.json"
    file.write_text(json.dumps({"host_pool_gb": 8, "page_kb": 64, "lease_seconds": 10, "log_level": "debug"}))
    env = {"KVRECALL_PAGE_KB": "128", "KVRECALL_LEASE_SECONDS": "20", "KVRECALL_SOCKET_MODE": "0o660",
           "KVRECALL_LISTEN": "unix:///tmp/a.sock,127.0.0.1:7000"}  # fmt: skip
    config = load_config(str(file), overrides={"lease_seconds": 40, "device": None}, env=env)
    assert config.host_pool_gb == 8.0  # file
    assert config.page_kb == 128  # env beats file
    assert config.lease_seconds == 40.0  # flag beats env
    assert config.log_level == "DEBUG" and config.socket_mode == 0o660
    assert config.listen == ["unix:///tmp/a.sock", "127.0.0.1:7000"]
    assert config.device == "cpu"  # an unset flag (None) leaves the layers below
    assert load_config(env={"KVRECALL_OPERATORS": "ops-a,ops-b"}).operators == ["ops-a", "ops-b"]


def test_toml_file(tmp_path):
    file = tmp_path / "kvrecall.toml"
    file.write_text('device_pool_gb = 0.5\nlisten = ["127.0.0.1:7001"]\n')
    config = load_config(str(file), env={})
    assert config.device_pool_gb == 0.5 and config.listen == ["127.0.0.1:7001"]


@pytest.mark.parametrize(
    ("env", "overrides", "message"),
    [
        ({"KVRECALL_PAGE_KB": "lots"}, {}, "KVRECALL_PAGE_KB: .*integer"),
        ({"KVRECALL_PAGE_KB": "6"}, {}, "KVRECALL_PAGE_KB: .*multiple of 4"),
        ({}, {"host_pool_gb": 0}, "host_pool_gb: .*greater than 0"),
        ({"KVRECALL_DEVICE": "tpu"}, {}, "KVRECALL_DEVICE: 'tpu' must be cpu, cuda or cuda:N"),
        ({}, {"listen": "nowhere"}, "listen: 'nowhere' must be unix:///path or HOST:PORT"),
        ({}, {"log_level": "loud"}, "log_level: "),
        ({}, {"session_ops": "fork"}, "session_ops: "),
        ({}, {"tls_cert": "/no/such.pem"}, "tls_cert: no file '/no/such.pem'"),
        ({}, {"lease_seconds": 7200}, r"lease_seconds: must be in \(0, max_lease_seconds\]"),
        ({"KVRECALL_METRICS_PORT": "70000"}, {}, "KVRECALL_METRICS_PORT: .*65535"),
        ({"KVRECALL_WORKER_SHARE": "1.5"}, {}, "KVRECALL_WORKER_SHARE: .*less than or equal to 1"),
        ({"KVRECALL_WORKER_COPY_SHARE": "-0.1"}, {}, "KVRECALL_WORKER_COPY_SHARE: .*greater than or equal to 0"),
        ({"KVRECALL_SWITCH_INTERVAL_MS": "0"}, {}, "KVRECALL_SWITCH_INTERVAL_MS: .*greater than 0"),
        ({"KVRECALL_NOTICE_OPS": "fork"}, {}, "KVRECALL_NOTICE_OPS: "),
        ({"KVRECALL_NOTICE_STREAM": "maybe"}, {}, "KVRECALL_NOTICE_STREAM: "),
    ],
)
def test_errors_name_the_setting(env, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides, env=env)


def test_file_errors_name_the_file(tmp_path):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps({"page_kb": "big"}))
    with pytest.raises(ConfigError, match=f"config {file}: page_kb: "):
        load_config(str(file), env={})
    file.write_text(json.dumps({"pool_gb": 1}))
    with pytest.raises(ConfigError, match="unknown setting 'pool_gb'"):
        load_config(str(file), env={})
    with pytest.raises(ConfigError, match="config: no file"):
        load_config(str(tmp_path / "missing.json"), env={})


def test_the_host_tier_asks_for_huge_pages_by_default_and_the_advice_is_harmless_on_any_mapping():
    import mmap

    from kvrecall.server.config import ServerConfig
    from kvrecall.server.pinned import advise_hugepages, thp_mode

    assert ServerConfig().host_hugepages is True
    region = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        advised = advise_hugepages(region)
        assert advised == hasattr(mmap, "MADV_HUGEPAGE")  # Linux: the kernel takes the advice in any THP mode
        region[:4] = b"kvrc"  # still ordinary memory
        assert region[:4] == b"kvrc"
    finally:
        region.close()
    assert thp_mode() in ("always", "madvise", "never", "unknown")


def test_plan_readback_is_read_from_the_environment_and_checked():
    """KVRECALL_PLAN_READBACK (the staged placement's plan into pinned host memory by its kernel,
    or copied there): read at the edge, an unknown mode refused naming the variable and the modes."""
    assert load_config(None, env={}).plan_readback == "mapped"
    assert load_config(None, env={"KVRECALL_PLAN_READBACK": "copy"}).plan_readback == "copy"
    with pytest.raises(ConfigError, match="KVRECALL_PLAN_READBACK.*mapped.*copy"):
        load_config(None, env={"KVRECALL_PLAN_READBACK": "dma"})
    assert load_config(None, env={"KVRECALL_DRY_TRANSFERS": "1"}).dry_transfers is True
    assert load_config(None, env={"KVRECALL_DRY_INDEX_SCRATCH": "1"}).dry_index_scratch is True
    assert load_config(None, env={"KVRECALL_DRY_INDEX_SHARE": "0.5"}).dry_index_share == 0.5
    with pytest.raises(ConfigError, match="KVRECALL_DRY_INDEX_SHARE"):
        load_config(None, env={"KVRECALL_DRY_INDEX_SHARE": "2"})


def test_unit_reps_dtype_is_read_from_the_environment_and_checked():
    """KVRECALL_UNIT_REPS_DTYPE (louiskv's unit table in the layout's dtype, or float8 e4m3)."""
    assert load_config(None, env={}).unit_reps_dtype == "layout"
    assert load_config(None, env={"KVRECALL_UNIT_REPS_DTYPE": "fp8"}).unit_reps_dtype == "fp8"
    with pytest.raises(ConfigError, match="KVRECALL_UNIT_REPS_DTYPE.*layout.*fp8"):
        load_config(None, env={"KVRECALL_UNIT_REPS_DTYPE": "fp16"})


def test_each_staged_diagnostic_on_warns_once_and_the_inert_ones_do_not(caplog):
    """The daemon's start-up warnings for the staged-placement diagnostics: several on together warn
    one each; those a broader one leaves nothing to do (dry_index_copies: no index copy to share
    out, defer or redirect) stay silent."""
    from kvrecall.server.config import ServerConfig
    from kvrecall.server.daemon import _warn_staged_diagnostics

    def warned(**settings) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="kvrecall.daemon"):
            _warn_staged_diagnostics(ServerConfig(**settings))
        return sorted(r.getMessage().split(" ", 1)[0] for r in caplog.records)

    assert warned() == []
    assert warned(dry_index_share=0.5, dry_index_scratch=True, dry_index_defer=True) == [
        "dry_index_defer", "dry_index_scratch", "dry_index_share"]
    assert warned(dry_index_copies=True, dry_index_share=0.5, dry_index_defer=True) == ["dry_index_copies"]
    assert warned(dry_transfers=True, dry_index_scratch=True) == ["dry_index_scratch", "dry_transfers"]
    assert warned(dry_uploads=True, dry_transfers=True, dry_index_copies=True) == ["dry_uploads"]
