"""Bearer tokens, roles, quotas and owner-only models, over a real socket (127.0.0.1:0)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from conftest import MLP_SPEC
from grpc_health.v1 import health_pb2
from ntk_client import Client, NTKError, codec
from ntk_client._proto.ntk.v1 import model_pb2, service_pb2, service_pb2_grpc
from ntk_server import auth, cli
from ntk_server.config import ServerConfig, load_config
from ntk_server.server import BackgroundServer, access_tokens
from scrape import assert_status, health_status, scrape, value, wait_for

TOKENS = {"alice": "alice-secret-1", "bob": "bob-secret-2", "reader": "reader-secret-3"}
ADMIN_TOKEN = "admin-secret-4"
LIMITED_TOKEN = "limited-secret-5"
TOKENS_FILE = f"""\
# name:token[:role][:quota=value...]
alice:{TOKENS["alice"]}
bob:{TOKENS["bob"]}:write

reader:{TOKENS["reader"]}:read
ops:{ADMIN_TOKEN}:admin
limited:{LIMITED_TOKEN}:write:concurrent_requests=1:kernel_entries=50
"""


def _start(tmp_path, **settings) -> BackgroundServer:
    path = tmp_path / "tokens"
    path.write_text(TOKENS_FILE)
    config = ServerConfig(
        address="127.0.0.1:0",
        registry=tmp_path / "reg",
        tokens_file=path,
        metrics_port=0,
        **settings,
    )
    return BackgroundServer(config).start()


@pytest.fixture
def server(tmp_path):
    srv = _start(tmp_path)
    yield srv
    srv.stop()


@pytest.fixture
def owner_only(tmp_path):
    srv = _start(tmp_path, owner_only=True)
    yield srv
    srv.stop()


def _client(server, token=None) -> Client:
    return Client(server.address, token=token, timeout=60)


# Authentication -------------------------------------------------------------------------------


def test_missing_token_is_unauthenticated(server):
    with _client(server) as c, pytest.raises(NTKError) as info:
        c.models()
    assert_status(info, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token", "authorization")


def test_unknown_token_is_unauthenticated_and_not_echoed(server):
    with _client(server, token="guessed-token-123") as c, pytest.raises(NTKError) as info:
        c.models()
    assert_status(info, grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
    assert "guessed-token-123" not in info.value.details


def test_malformed_authorization_is_unauthenticated(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.NTKServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(
                model_pb2.ListModelsRequest(),
                metadata=[("authorization", f"Basic {TOKENS['alice']}")],
                timeout=10,
            )
    assert_status(info, grpc.StatusCode.UNAUTHENTICATED, "malformed", "Bearer <token>")


def test_known_tokens_are_served_and_the_token_is_sent_on_streams(server, rng):
    with _client(server, token=TOKENS["alice"]) as c:
        model = c.register_model(MLP_SPEC)
        dataset = c.upload_dataset(rng.standard_normal((4, 6)))
        assert c.kernel(model, dataset.id).shape == (4, 4)
        with pytest.raises(ValueError, match="out has shape"):  # cancels an intercepted stream
            c.kernel(model, dataset.id, out=np.empty((3, 3)))
    with _client(server, token=TOKENS["reader"]) as c:
        assert [m.id for m in c.models()] == [model.id]
        k = c.kernel(model, rng.standard_normal((3, 6)))
        assert k.shape == (3, 3)


def test_token_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("NTK_TOKEN", TOKENS["bob"])
    with Client(server.address, timeout=10) as c:
        assert c.models() == []


def test_health_answers_without_a_token(server):
    with grpc.insecure_channel(server.address) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(channel, "ntk.v1.NTKService") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_a_token(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert_status(info, grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        metadata = [("authorization", f"Bearer {TOKENS['reader']}")]
        (answer,) = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    names = [s.name for s in answer.list_services_response.service]
    assert "ntk.v1.NTKService" in names


# Roles -----------------------------------------------------------------------------------------


def test_read_only_token_may_not_change_the_server(server, rng):
    with _client(server, token=TOKENS["alice"]) as c:
        model = c.register_model(MLP_SPEC)
    with _client(server, token=TOKENS["reader"]) as c:
        with pytest.raises(NTKError) as info:
            c.register_model(MLP_SPEC)
        assert_status(
            info,
            grpc.StatusCode.PERMISSION_DENIED,
            "token 'reader' has role read",
            "RegisterModel needs role write",
        )
        with pytest.raises(NTKError) as info:
            c.delete_model(model)
        assert_status(info, grpc.StatusCode.PERMISSION_DENIED, "DeleteModel needs role write")
        with pytest.raises(NTKError) as info:  # a client stream, refused before it is read
            c.upload_dataset(rng.standard_normal((3, 6)))
        assert_status(info, grpc.StatusCode.PERMISSION_DENIED, "UploadDataset needs role write")
        assert c.get_model(model).id == model.id
        assert c.predict(model, rng.standard_normal((3, 6)), rng.standard_normal((3, 3))).f.shape


def test_roles_cover_every_method():
    methods = set(service_pb2.DESCRIPTOR.services_by_name["NTKService"].methods_by_name)
    assert set(auth.METHOD_ROLES) == methods


# Starting up -----------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", ":0", "192.0.2.1:0"])
def test_refuses_a_public_address_without_tokens(tmp_path, address):
    config = ServerConfig(address=address, registry=tmp_path)
    with pytest.raises(ValueError, match="refusing to listen on .* without bearer tokens"):
        access_tokens(config)
    allowed = ServerConfig(address=address, registry=tmp_path, allow_insecure_public=True)
    assert access_tokens(allowed) is None
    with_tokens = ServerConfig(address=address, registry=tmp_path, tokens="a:b")
    assert access_tokens(with_tokens).names == ["a"]


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:0", "[::1]:0", "127.0.0.2:0"])
def test_auth_is_off_by_default_on_loopback(tmp_path, address):
    assert access_tokens(ServerConfig(address=address, registry=tmp_path)) is None


def test_cli_exits_with_an_error_for_a_public_address_without_tokens(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli, "setup_logging", lambda config: None)  # keep pytest's log capture
    argv = ["--address", "0.0.0.0:0", "--registry", str(tmp_path)]
    assert cli.main(argv) == 1
    assert "refusing to listen on 0.0.0.0:0 without bearer tokens" in caplog.text
    assert "--allow-insecure-public" in caplog.text


def test_settings_from_flags_and_environment(tmp_path):
    environ = {
        "NTK_TOKENS_FILE": str(tmp_path / "tokens"),
        "NTK_TOKENS": "x:sekrit-value",
        "NTK_METRICS_PORT": "9090",
        "NTK_QUOTA_KERNEL_ENTRIES": "1000",
        "NTK_TLS_CERT": "c.pem",
        "NTK_TLS_KEY": "k.pem",
        "NTK_TLS_CLIENT_CA": "ca.pem",
    }
    config = load_config(["--allow-insecure-public", "--owner-only"], environ)
    assert config.metrics_port == 9090 and config.quota_kernel_entries == 1000
    assert config.allow_insecure_public and config.owner_only
    assert str(config.tls_client_ca) == "ca.pem"
    assert config.tokens == "x:sekrit-value" and "sekrit" not in repr(config)
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        load_config(["--tls-cert", "c.pem"], {})
    with pytest.raises(ValueError, match="owner_only needs bearer tokens"):
        load_config(["--owner-only"], {})
    with pytest.raises(ValueError, match="quota_concurrent_requests must be >= 0"):
        load_config(["--quota-concurrent-requests", "-1"], {})


def test_token_entries_are_checked_without_showing_secrets(tmp_path):
    defaults = auth.Quotas(concurrent_requests=3)
    table = auth.TokenTable.parse(
        [("f:1", "# comment"), ("f:2", "a:s1:read:kernel_entries=5"), ("e:1", "b:s2")], defaults
    )
    principal = table.authenticate([("authorization", "Bearer s1")])
    assert principal == auth.Principal("a", auth.Role.READ, auth.Quotas(3, 5))
    assert table.authenticate([("authorization", "bearer s2")]).role == auth.Role.WRITE
    bad = {
        "a:topsecret\nb:topsecret": "has the same secret as 'a'",
        "a:topsecret\na:othersecret": "line 2: token name 'a' already used at",
        "a:topsecret:root": "unknown role 'root'",
        "a:topsecret:kernel_entries=-1": "quota kernel_entries of 'a' must be an integer >= 0",
        "a:topsecret:gpus=2": "unknown quota 'gpus'",
        "../x:topsecret": "token name '../x' must be",
        "a:": "the token of 'a' is empty",
        "justaname": "expected name:token",
    }
    for text, message in bad.items():
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValueError) as info:
            auth.TokenTable.load(path, None, defaults)
        assert message in str(info.value) and "topsecret" not in str(info.value)
    path.write_text("# no tokens yet\n")
    with pytest.raises(ValueError, match="holds no tokens"):
        access_tokens(ServerConfig(registry=tmp_path, tokens_file=path))


# Quotas ----------------------------------------------------------------------------------------


def test_concurrent_requests_quota_names_the_quota_and_the_server_stays_healthy(server, rng):
    release = threading.Event()

    def chunks():
        yield service_pb2.DatasetChunk(dtype=codec.dtype_enum("float32"), x_shape=[2, 6])
        release.wait(60)  # hold the request open until the test has seen the refusal
        yield service_pb2.DatasetChunk(x_data=np.zeros((2, 6), np.float32).tobytes())

    metadata = [("authorization", f"Bearer {LIMITED_TOKEN}")]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.NTKServiceStub(channel)
        upload = stub.UploadDataset.future(chunks(), metadata=metadata, timeout=60)
        try:
            wait_for(
                lambda: value(scrape(server.metrics_address), "ntk_inflight_requests") == 1,
                "the held upload to be in flight",
            )
            with _client(server, token=LIMITED_TOKEN) as c, pytest.raises(NTKError) as info:
                c.models()
            assert_status(
                info,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "quota concurrent_requests exceeded",
                "token 'limited' has 1 requests in flight, limit 1",
            )
            with _client(server, token=TOKENS["alice"]) as c:  # other tokens are not limited
                assert c.models() == []
        finally:
            release.set()
        assert upload.result(timeout=60).x_shape == [2, 6]
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    with _client(server, token=LIMITED_TOKEN) as c:
        assert c.models() == []
    samples = scrape(server.metrics_address)
    assert value(samples, "ntk_inflight_requests") == 0
    assert value(samples, "ntk_requests_total", method="ListModels", code="RESOURCE_EXHAUSTED") == 1


def test_kernel_entries_quota_names_the_quota_and_the_server_stays_healthy(server, rng):
    with _client(server, token=LIMITED_TOKEN) as c:
        model = c.register_model(MLP_SPEC)
        with pytest.raises(NTKError) as info:
            c.kernel(model, rng.standard_normal((10, 6)))
        assert_status(
            info,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "quota kernel_entries exceeded",
            "the kernel has 100 entries",
            "token 'limited' may compute at most 50 per request",
        )
        with pytest.raises(NTKError) as info:  # Predict's kernels count too
            c.predict(model, rng.standard_normal((8, 6)), rng.standard_normal((8, 3)))
        assert_status(info, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota kernel_entries")
        assert c.kernel(model, rng.standard_normal((7, 6))).shape == (7, 7)  # 49 entries
    with _client(server, token=TOKENS["alice"]) as c:  # no quota for alice
        assert c.kernel(model, rng.standard_normal((10, 6))).shape == (10, 10)
    with grpc.insecure_channel(server.address) as channel:
        assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING


def test_default_quotas_apply_without_authentication(tmp_path, rng):
    config = ServerConfig(address="127.0.0.1:0", registry=tmp_path, quota_kernel_entries=20)
    with BackgroundServer(config) as srv, Client(srv.address, timeout=60) as c:
        model = c.register_model(MLP_SPEC)
        with pytest.raises(NTKError) as info:
            c.kernel(model, rng.standard_normal((5, 6)))
        assert_status(
            info,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the kernel has 25 entries, token 'anonymous' may compute at most 20",
        )


# Ownership -------------------------------------------------------------------------------------


def test_models_are_visible_to_every_token_by_default(server):
    with _client(server, token=TOKENS["alice"]) as alice, _client(server, TOKENS["bob"]) as bob:
        model = alice.register_model(MLP_SPEC)
        assert [m.id for m in bob.models()] == [model.id]
        bob.delete_model(model)
        assert alice.models() == []


def test_owner_only_hides_other_tokens_models(owner_only, rng):
    x, y = rng.standard_normal((4, 6)), rng.standard_normal((4, 3))
    with (
        _client(owner_only, TOKENS["alice"]) as alice,
        _client(owner_only, TOKENS["bob"]) as bob,
        _client(owner_only, ADMIN_TOKEN) as ops,
    ):
        model = alice.register_model(MLP_SPEC)
        assert [m.id for m in alice.models()] == [model.id]
        assert bob.models() == []
        unknown = "0" * 32
        for call in (
            bob.get_model,
            bob.delete_model,
            lambda m: bob.kernel(m, x),
            lambda m: bob.predict(m, x, y),
            lambda m: bob.evaluate(m, x),
        ):
            # A foreign model answers exactly like an unknown id.
            with pytest.raises(NTKError) as foreign:
                call(model.id)
            with pytest.raises(NTKError) as missing:
                call(unknown)
            assert_status(foreign, grpc.StatusCode.NOT_FOUND, f"no model with id {model.id!r}")
            assert foreign.value.details.replace(model.id, unknown) == missing.value.details
        assert [m.id for m in ops.models()] == [model.id]  # admin sees every model
        assert alice.kernel(model, x).shape == (4, 4)


def test_owner_only_shares_identical_models_and_deletes_with_the_last_owner(owner_only, rng):
    root = owner_only.config.registry
    with _client(owner_only, TOKENS["alice"]) as alice, _client(owner_only, TOKENS["bob"]) as bob:
        model = alice.register_model(MLP_SPEC)
        again = bob.register_model(MLP_SPEC)  # same content, same id: bob becomes a co-owner
        assert again.id == model.id
        owners = root / "models" / model.id / "owners"
        assert sorted(p.name for p in owners.iterdir()) == ["alice", "bob"]
        stored = b"".join(p.read_bytes() for p in (root / "models" / model.id).rglob("*.json"))
        assert not any(t.encode() in stored for t in TOKENS.values())  # names, never tokens
        assert [m.id for m in bob.models()] == [model.id]

        bob.delete_model(model)  # removes bob's claim only
        assert bob.models() == []
        with pytest.raises(NTKError) as info:
            bob.get_model(model)
        assert_status(info, grpc.StatusCode.NOT_FOUND, model.id)
        assert alice.get_model(model).id == model.id

        alice.delete_model(model)  # the last owner: the model goes
        assert not (root / "models" / model.id).exists()
        with pytest.raises(NTKError) as info:
            alice.get_model(model)
        assert_status(info, grpc.StatusCode.NOT_FOUND, model.id)


def test_owner_only_models_registered_without_a_token_stay_public(tmp_path):
    with BackgroundServer(ServerConfig(address="127.0.0.1:0", registry=tmp_path / "reg")) as srv:
        with Client(srv.address, timeout=60) as anonymous:
            model = anonymous.register_model(MLP_SPEC)
    srv = _start(tmp_path, owner_only=True)
    try:
        with _client(srv, TOKENS["bob"]) as bob:
            assert [m.id for m in bob.models()] == [model.id]
    finally:
        srv.stop()


def test_command_line_sends_the_token_from_the_environment(server, monkeypatch, capsys):
    from ntk_client import cli

    monkeypatch.delenv("NTK_TOKEN", raising=False)
    assert cli.main(["--target", server.address, "models"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("NTK_TOKEN", TOKENS["alice"])
    assert cli.main(["--target", server.address, "models"]) == 0
