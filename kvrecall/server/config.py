"""ServerConfig: one typed configuration from defaults < file < environment < flags.

Validated once, at start, with errors that name the setting; logged in full at start.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1 << 30
ENV_PREFIX = "KVRECALL_"


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    listen: list[str] = field(default_factory=lambda: ["unix:///tmp/kvrecall.sock"])  # unix:///path or HOST:PORT
    device: str = "cpu"                 # cpu | cuda | cuda:N
    host_pool_gb: float = 4.0           # host tier (pinned on CUDA, shared memory on CPU)
    device_pool_gb: float = 2.0         # working sets (GPU memory, or shared memory on CPU)
    page_kb: int = 2048                 # host page size
    lease_seconds: float = 30.0         # default session lease
    max_lease_seconds: float = 3600.0
    max_message_mb: int = 512           # largest gRPC message accepted
    worker_quota_gb: float = 0.0        # per-worker pool bytes (0 = unlimited)
    worker_share: float = 0.5           # most of each pool one worker (tenant) may hold, as a
                                        # fraction; 1 = no fair-share limit (single-tenant hosts)
    metrics_port: int = 0               # Prometheus /metrics port (0 = off)
    metrics_addr: str = "0.0.0.0"
    socket_mode: int = 0o600            # unix socket permissions
    fd_socket: str = ""                 # unix socket handing working-set fds to workers (CPU daemons);
                                        # "" = beside the first unix listener ("<path>.fds")
    tls_cert: str = ""                  # PEM server certificate for TCP listeners
    tls_key: str = ""
    tls_client_ca: str = ""             # PEM CA bundle: require client certificates (mutual TLS)
    tokens_file: str = ""               # lines "worker_id token": bearer-token auth
    operators: list[str] = field(default_factory=list)  # worker ids (of tokens_file) that see every
                                        # tenant's sessions in GetStats
    log_level: str = "INFO"
    session_ops: str = "thread"         # append / boundary work: "thread" (a worker thread, sessions
                                        # overlap) or "inline" (on the event loop: no thread hop)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if isinstance(self.listen, str):
            self.listen = [a for a in self.listen.split(",") if a]
        if not self.listen:
            raise ConfigError("listen: at least one address is required")
        for address in self.listen:
            if not address.startswith("unix://") and ":" not in address:
                raise ConfigError(f"listen: {address!r} must be unix:///path or HOST:PORT")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"device: {self.device!r} must be cpu, cuda or cuda:N")
        for name in ("host_pool_gb", "device_pool_gb"):
            if not 0 < getattr(self, name) <= 4096:
                raise ConfigError(f"{name}: must be in (0, 4096]")
        if self.page_kb < 4 or self.page_kb % 4:
            raise ConfigError("page_kb: must be a multiple of 4, at least 4")
        if not 0 < self.lease_seconds <= self.max_lease_seconds:
            raise ConfigError("lease_seconds: must be in (0, max_lease_seconds]")
        if not 0 < self.worker_share <= 1:
            raise ConfigError("worker_share: must be in (0, 1]")
        if isinstance(self.operators, str):
            self.operators = [a for a in self.operators.split(",") if a]
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port: must be in [0, 65535]")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca: needs tls_cert and tls_key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "tokens_file"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{name}: no file {path!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level: DEBUG, INFO, WARNING or ERROR")
        if self.session_ops not in ("thread", "inline"):
            raise ConfigError(f"session_ops: {self.session_ops!r} must be thread or inline")

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
        return dataclasses.asdict(self)


def _coerce(name: str, raw: Any, current: Any) -> Any:
    try:
        if isinstance(current, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
        if isinstance(current, int):
            return int(raw, 0) if isinstance(raw, str) else int(raw)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, list):
            return [a for a in raw.split(",") if a] if isinstance(raw, str) else list(raw)
        return str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {raw!r} as {type(current).__name__}") from None


def load_config(file: str | None = None, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> ServerConfig:
    """defaults < JSON/TOML file < KVRECALL_* environment < explicit overrides (flags)."""
    defaults = ServerConfig()
    values: dict[str, Any] = dataclasses.asdict(defaults)
    names = set(values)
    if file:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config: no file {file!r}")
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
        for key, raw in data.items():
            if key not in names:
                raise ConfigError(f"config {file}: unknown setting {key!r}")
            values[key] = _coerce(key, raw, values[key])
    env = os.environ if env is None else env
    for key in names:
        raw = env.get(ENV_PREFIX + key.upper())
        if raw is not None:
            values[key] = _coerce(ENV_PREFIX + key.upper(), raw, getattr(defaults, key))
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _coerce(key, raw, getattr(defaults, key))
    return ServerConfig(**values)
