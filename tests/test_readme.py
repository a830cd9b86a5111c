"""The README's Python tour runs as written against a real server."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"
DOC_TARGET = "127.0.0.1:50051"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quick_tour_runs(server):
    tour = _python_blocks()[0]
    assert DOC_TARGET in tour
    namespace: dict = {}
    exec(compile(tour.replace(DOC_TARGET, server.address), "README tour", "exec"), namespace)
    assert namespace["k_train"].shape == (1200, 1200)
    assert namespace["full"].shape == (597, 1200, 10, 10)
    accuracy = (
        namespace["preds"].at(float("inf")).argmax(1)
        == np.argmax(np.eye(10)[namespace["digits"].target[1200:]], 1)
    ).mean()
    assert accuracy > 0.9
