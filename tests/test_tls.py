"""TLS and mutual TLS on the gRPC port, with certificates the test generates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import MLP_SPEC
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2
from ntk_client import Client, NTKError
from ntk_server.config import ServerConfig
from ntk_server.server import BackgroundServer
from scrape import assert_status, health_status

CERT_VALIDITY = datetime.timedelta(days=1)
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA the server does not trust
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(subject, key, issuer, issuer_key, *, ca=False, server=False, client=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    if client:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("test CA", ca_key, "test CA", ca_key, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    return Pki(
        ca=_write_cert(ca, d / "ca.pem"),
        server_cert=_write_cert(
            _certificate("localhost", server_key, "test CA", ca_key, server=True), d / "srv.pem"
        ),
        server_key=_write_key(server_key, d / "srv.key"),
        client_cert=_write_cert(
            _certificate("client", client_key, "test CA", ca_key, client=True), d / "cli.pem"
        ),
        client_key=_write_key(client_key, d / "cli.key"),
        rogue_cert=_write_cert(
            _certificate("rogue", rogue_key, "rogue CA", rogue_ca_key, client=True),
            d / "rogue.pem",
        ),
        rogue_key=_write_key(rogue_key, d / "rogue.key"),
    )


def _server(tmp_path, pki: Pki, *, mutual: bool, **settings) -> BackgroundServer:
    config = ServerConfig(
        address="127.0.0.1:0",
        registry=tmp_path / "reg",
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca if mutual else None,
        **settings,
    )
    return BackgroundServer(config).start()


@pytest.fixture
def tls_server(tmp_path, pki):
    srv = _server(tmp_path, pki, mutual=False)
    yield srv
    srv.stop()


@pytest.fixture
def mtls_server(tmp_path, pki):
    srv = _server(tmp_path, pki, mutual=True)
    yield srv
    srv.stop()


def _assert_cannot_connect(client: Client, *fragments: str) -> None:
    with client, pytest.raises(NTKError) as info:
        client.models()
    assert_status(info, grpc.StatusCode.UNAVAILABLE, "failed to connect", *fragments)


def test_tls_client_with_the_ca_is_served(tls_server, pki, rng):
    with Client(tls_server.address, tls_ca=pki.ca, timeout=60) as c:
        model = c.register_model(MLP_SPEC)
        assert c.kernel(model, rng.standard_normal((3, 6))).shape == (3, 3)


def test_tls_server_name_override(tls_server, pki):
    port = tls_server.address.rpartition(":")[2]
    with Client(f"localhost:{port}", tls_ca=pki.ca, tls_server_name="localhost") as c:
        assert c.models() == []


def test_client_without_the_ca_fails_to_connect(tls_server, pki):
    # TLS trusting only the system's roots: the test CA is not among them.
    _assert_cannot_connect(
        Client(tls_server.address, tls=True, timeout=CONNECT_TIMEOUT_S),
        "CERTIFICATE_VERIFY_FAILED",
    )
    # Plaintext to a TLS port.
    _assert_cannot_connect(Client(tls_server.address, timeout=CONNECT_TIMEOUT_S))


def test_health_over_tls_needs_no_token(tmp_path, pki):
    srv = _server(tmp_path, pki, mutual=False, tokens="alice:alice-secret")
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with grpc.secure_channel(srv.address, credentials) as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        with Client(srv.address, tls_ca=pki.ca, timeout=CONNECT_TIMEOUT_S) as c:
            with pytest.raises(NTKError) as info:
                c.models()
            assert_status(info, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        with Client(srv.address, tls_ca=pki.ca, token="alice-secret") as c:
            assert c.models() == []
    finally:
        srv.stop()


def test_mtls_client_with_a_certificate_from_the_ca_is_served(mtls_server, pki):
    with Client(
        mtls_server.address,
        tls_ca=pki.ca,
        tls_cert=pki.client_cert,
        tls_key=pki.client_key,
        timeout=60,
    ) as c:
        assert c.register_model(MLP_SPEC).parameter_count > 0


def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server, pki):
    address = mtls_server.address
    _assert_cannot_connect(Client(address, tls_ca=pki.ca, timeout=CONNECT_TIMEOUT_S))
    _assert_cannot_connect(
        Client(
            address,
            tls_ca=pki.ca,
            tls_cert=pki.rogue_cert,
            tls_key=pki.rogue_key,
            timeout=CONNECT_TIMEOUT_S,
        )
    )
    # Refusing them left the server healthy for a client that does present one.
    with Client(address, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as c:
        assert c.models() == []


def test_tls_settings_are_checked(tmp_path, pki):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        Client("127.0.0.1:1", tls_cert=pki.client_cert)
    with pytest.raises(ValueError, match="tls_ca .*No such file"):
        Client("127.0.0.1:1", tls_ca=tmp_path / "missing.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    config = ServerConfig(
        address="127.0.0.1:0", registry=tmp_path / "reg", tls_cert=not_pem, tls_key=not_pem
    )
    with pytest.raises(ValueError, match="tls_cert .*not a PEM file"):
        BackgroundServer(config).start()


def test_command_line_speaks_mutual_tls(mtls_server, pki, capsys):
    from ntk_client import cli

    argv = ["--target", mtls_server.address, "--tls-ca", str(pki.ca)]
    client_pair = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert cli.main([*argv, *client_pair, "models"]) == 0
    assert cli.main([*argv, "--timeout", str(CONNECT_TIMEOUT_S), "models"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
