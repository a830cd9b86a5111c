"""The wire stubs match proto/, the client works without torch, and the server's command line
starts, serves and stops."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60


def test_generated_stubs_match_the_protos(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    gen_proto.generate(tmp_path / "out")
    shipped = ROOT / "client" / "ntk_client" / "_proto"
    fresh = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*.py*"))
    current = sorted(
        p.relative_to(shipped) for p in shipped.rglob("*.py*") if "__pycache__" not in p.parts
    )
    assert fresh == current, "stub files differ; run `make proto`"
    for rel in fresh:
        assert filecmp.cmp(tmp_path / "out" / rel, shipped / rel, shallow=False), (
            f"{rel} is out of date with proto/; run `make proto`"
        )


# Runs in a fresh interpreter in which `import torch` fails, as in a client-only install.
NO_TORCH_CLIENT = r"""
import sys, importlib.abc

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
import ntk_client
from ntk_client import Client
assert "torch" not in sys.modules
with Client(sys.argv[1]) as c:
    m = c.register_model({"input_shape": [3], "layers": [{"type": "dense", "width": 2}]})
    k = c.kernel(m, np.eye(3))
    assert k.shape == (3, 3), k.shape
assert "torch" not in sys.modules
print("ok", m.id)
"""


def _start_server(tmp_path, *extra):
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ntk_server",
            "--address",
            "127.0.0.1:0",
            "--registry",
            str(tmp_path / "reg"),
            "--port-file",
            str(port_file),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.1)
    return proc, port_file.read_text()


def test_client_without_torch_against_the_server_cli(tmp_path):
    proc, address = _start_server(tmp_path, "--log-level", "DEBUG")
    try:
        result = subprocess.run(
            [sys.executable, "-c", NO_TORCH_CLIENT, address],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("ok ")
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "serving address=" in output and "stopped" in output
    assert "block index=" in output  # per-block detail at DEBUG


def test_environment_configures_the_server(tmp_path):
    from ntk_server.config import load_config

    env = {"NTK_ADDRESS": "127.0.0.1:7777", "NTK_REGISTRY": str(tmp_path), "NTK_DEVICE": "cpu"}
    config = load_config([], env)
    assert config.address == "127.0.0.1:7777" and config.device == "cpu"
    assert load_config(["--address", "127.0.0.1:8888"], env).address == "127.0.0.1:8888"


def test_bad_flag_exits_with_a_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ntk_server", "--log-format", "xml"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 2 and "log_format" in result.stderr


def test_wheel_ships_the_stubs_and_imports_from_the_installed_files(tmp_path):
    import zipfile

    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("ntk_service-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "ntk_client/_proto/ntk/v1/service_pb2_grpc.py",
        "ntk_client/py.typed",
        "ntk_server/engine/kernels.py",
    ):
        assert required in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    check = (
        "import ntk_client, ntk_client._proto.ntk.v1.service_pb2_grpc as s;"
        "print(ntk_client.__file__); assert s.NTKServiceStub"
    )
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path / "site"))


def test_an_unusable_registry_stops_the_server_with_a_message(tmp_path):
    not_a_directory = tmp_path / "registry"
    not_a_directory.write_text("a file where the registry should be")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ntk_server",
            "--address",
            "127.0.0.1:0",
            "--registry",
            str(not_a_directory),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "registry directory" in result.stderr and "not usable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--address", "127.0.0.1:99999"], "port in 0..65535"),
        (["--address", "127.0.0.1:-5"], "port in 0..65535"),
        (["--address", "nohost"], "host:port"),
        (["--log-level", "bogus"], "log_level"),
        (["--queue-limit", "0"], "queue_limit"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(argv, fragment):
    from ntk_server.config import load_config

    with pytest.raises(ValueError, match=fragment):
        load_config(argv, {})


def test_a_second_server_on_a_busy_port_exits_with_an_error(tmp_path):
    proc, address = _start_server(tmp_path)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "ntk_server",
                "--address",
                address,
                "--registry",
                str(tmp_path / "other"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert "bind" in result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
