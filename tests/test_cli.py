"""The `ntk` command line against a real server, and the progress bar."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
from conftest import MLP_SPEC
from ntk_client.cli import main
from ntk_client.progress import ProgressBar, progress_for
from procs import child_env


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_register_upload_kernel_predict_and_list(server, client, tmp_path, rng, capsys):
    target = ("--target", server.address, "--quiet")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(MLP_SPEC))
    code, out, _ = _run(capsys, *target, "register", str(spec_path))
    assert code == 0
    model_id = out.strip()
    assert model_id == client.register_model(MLP_SPEC).id

    weights = {k: rng.standard_normal(s) for k, s in client.get_model(model_id).parameters.items()}
    np.savez(tmp_path / "w.npz", **weights)
    code, out, _ = _run(
        capsys, *target, "register", str(spec_path), "--weights", str(tmp_path / "w.npz")
    )
    assert code == 0 and out.strip() == client.register_model(MLP_SPEC, weights).id

    x, y = rng.standard_normal((9, 6)), rng.standard_normal((9, 3))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code, out, _ = _run(capsys, *target, "upload", str(tmp_path / "x.npy"), str(tmp_path / "y.npy"))
    assert code == 0
    dataset_id = out.strip()

    expected = client.kernel(model_id, x, layout="full", dtype="float64", block_shape=(4, 4))
    kernel_args = ("--layout", "full", "--dtype", "float64", "--block-shape", "4,4")
    code, _, err = _run(
        capsys,
        *target,
        "kernel",
        model_id,
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "k.npy"),
        *kernel_args,
    )
    assert code == 0 and "shape=[9, 9, 3, 3]" in err
    np.testing.assert_array_equal(np.load(tmp_path / "k.npy"), expected)
    code, _, _ = _run(
        capsys,
        *target,
        "kernel",
        model_id,
        "--x1",
        f"dataset:{dataset_id}",
        "--out",
        str(tmp_path / "m.npy"),
        "--memmap",
        *kernel_args,
    )
    assert code == 0
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), expected)
    assert sorted(p.name for p in tmp_path.glob("*.partial")) == []

    code, _, _ = _run(
        capsys,
        *target,
        "predict",
        model_id,
        "--x-train",
        f"dataset:{dataset_id}",
        "--x-test",
        str(tmp_path / "x.npy"),
        "--t",
        "0",
        "1.5",
        "inf",
        "--dtype",
        "float64",
        "--diag-reg",
        "1e-3",
        "--out",
        str(tmp_path / "p.npz"),
    )
    assert code == 0
    saved = np.load(tmp_path / "p.npz")
    direct = client.predict(model_id, x, y, x, t=[0, 1.5, np.inf], dtype="float64", diag_reg=1e-3)
    np.testing.assert_allclose(saved["f"], direct.f, rtol=1e-10)
    assert list(saved["t"]) == [0, 1.5, np.inf]
    code, _, _ = _run(
        capsys, *target, "predict", model_id, "--x-train", f"dataset:{dataset_id}",
        "--t", "2", "--dtype", "float64", "--diag-reg", "0.5", "--diag-reg-absolute",
        "--method", "jacobian_contraction", "--out", str(tmp_path / "abs.npz"),
    )  # fmt: skip
    assert code == 0
    direct = client.predict(
        model_id, x, y, t=[2], dtype="float64", diag_reg=0.5, diag_reg_absolute=True
    )
    np.testing.assert_allclose(np.load(tmp_path / "abs.npz")["f"], direct.f, rtol=1e-8)

    code, out, _ = _run(capsys, *target, "models")
    assert code == 0 and model_id in out and "parameters" in out.splitlines()[0]


def test_errors_exit_with_the_status_and_a_message(server, tmp_path, capsys):
    target = ("--target", server.address)
    np.save(tmp_path / "x.npy", np.ones((2, 6)))
    missing = "0123456789abcdef0123456789abcdef"
    code, _, err = _run(
        capsys,
        *target,
        "kernel",
        missing,
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "k.npy"),
    )
    assert code == 1 and "NOT_FOUND" in err and "model_id" in err
    assert not (tmp_path / "k.npy").exists()
    code, _, err = _run(capsys, *target, "upload", str(tmp_path / "nope.npy"))
    assert code == 2 and "nope.npy" in err
    code, _, err = _run(
        capsys,
        *target,
        "kernel",
        missing,
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(tmp_path / "k.npy"),
        "--block-shape",
        "4",
    )
    assert code == 2 and "--block-shape" in err
    code, out, err = _run(
        capsys, *target, "kernel", missing, "--x1", str(tmp_path / "x.npy"),
        "--out", str(tmp_path / "no-such-dir" / "k.npy"),
    )  # fmt: skip
    assert code == 2 and "no-such-dir" in err and "does not exist" in err
    (tmp_path / "list.json").write_text("[1, 2]")
    code, _, err = _run(capsys, *target, "register", str(tmp_path / "list.json"))
    assert code == 2 and "JSON object" in err
    code, out, err = _run(capsys, "--target", "127.0.0.1:1", "--timeout", "2", "models")
    assert code == 1 and out == "" and "UNAVAILABLE" in err


BLOCKED_TORCH_CLI = r"""
import sys, importlib.abc

class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")

sys.meta_path.insert(0, BlockTorch())
from ntk_client.cli import main
code = main(sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_the_command_line_needs_no_torch(server, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_TORCH_CLI, "models"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(NTK_TARGET=server.address),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("id")


def test_progress_bar_reports_blocks_entries_rate_and_time_left():
    stream = io.StringIO()
    bar = ProgressBar("kernel", stream=stream)
    bar(1, 4, 250, 1000)
    bar(4, 4, 1000, 1000)
    bar.close()
    text = stream.getvalue()
    assert "1/4 blocks" in text and "250/1.0k entries" in text and "left" in text
    assert "4/4 blocks" in text and "entries/s" in text and "done in" in text
    assert text.endswith("\n")

    assert progress_for(False) is None
    assert progress_for(None) is None  # pytest captures stderr: not a terminal
    assert isinstance(progress_for(True), ProgressBar)
