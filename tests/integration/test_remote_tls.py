"""Remote access: a TCP listener with TLS and per-worker bearer tokens, inline transport."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kvrecall.client import KVRecallClient, PermissionDeniedError, UnauthenticatedError, UnavailableError
from kvrecall.local import LocalDaemon
from tests.conftest import SMALL, random_kv


def self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.pem", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(tmp)
    tokens = tmp / "tokens"
    tokens.write_text("# worker_id token\nremote-a secret-a\nremote-b secret-b\n")
    port = free_port()
    daemon = LocalDaemon(
        host_pool_gb=0.25, device_pool_gb=0.1,
        extra_args=["--tls-cert", cert, "--tls-key", key, "--tokens-file", str(tokens)],
    )
    # A TLS TCP listener beside the local socket (health checks use the socket).
    daemon.args[daemon.args.index("--listen") + 1] += f",localhost:{port}"
    with daemon:
        yield daemon, f"localhost:{port}", cert


def test_remote_worker_over_tls_with_token(tls_daemon):
    _, address, cert = tls_daemon
    kv = random_kv(SMALL, 120, seed=41)
    with KVRecallClient(address, "remote-a", token="secret-a", tls_ca=cert) as client:
        with client.open_session(SMALL, "streaming", {"n_sink": 4, "window": 32}, transport="inline") as session:
            session.ingest(kv[:, :, :, :100].contiguous())
            for position in range(100, 120):
                session.write_token(position, kv[:, 0, :, position], kv[:, 1, :, position])
                session.advance()
            session.flush()
            # The inline mirror matches what the daemon holds.
            for slot, p in enumerate(session.slot_pos[0, 0].tolist()):
                if p >= 0:
                    assert torch.equal(session.keys[0, 0, slot], kv[0, 0, 0, p])
            assert session.stats().tokens == 120


def test_wrong_or_missing_token_is_refused(tls_daemon):
    _, address, cert = tls_daemon
    for token in ("nope", None):
        with KVRecallClient(address, "remote-a", token=token, tls_ca=cert, connect_retries=0) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.open_session(SMALL, "full", transport="inline")
            assert "authorization" in info.value.details


def test_token_of_another_worker_is_refused(tls_daemon):
    _, address, cert = tls_daemon
    with KVRecallClient(address, "remote-a", token="secret-b", tls_ca=cert) as client:
        with pytest.raises(PermissionDeniedError) as info:
            client.open_session(SMALL, "full", transport="inline")
        assert "worker_id" in info.value.details


def test_plaintext_client_cannot_talk_to_the_tls_listener(tls_daemon):
    _, address, _ = tls_daemon
    with KVRecallClient(address, "remote-a", token="secret-a", connect_retries=0, timeout=5) as client:
        with pytest.raises(UnavailableError):
            client.stats()
