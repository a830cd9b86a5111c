"""The end-to-end digits job runs (smaller widths than `make demo`) and meets its own checks:
test accuracy >= 0.95 and a linearisation gap that shrinks with width."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_digits_example_end_to_end(capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import digits
    finally:
        sys.path.pop(0)
    argv = ["--mlp-width", "128", "--widths", "32,512", "--steps", "150", "--gap-examples", "128"]
    assert digits.main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "MLP 64-128-128-10" in out and "CNN" in out
    assert "linearisation gap shrinks with width: yes" in out
