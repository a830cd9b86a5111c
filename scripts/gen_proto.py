"""Generate the Python stubs of proto/ntk/v1 into client/ntk_client/_proto.

protoc writes absolute imports (`from ntk.v1 import tensor_pb2`); they are rewritten to point
inside the client package so the stubs import from an installed wheel without touching sys.path.
`python scripts/gen_proto.py --out DIR` writes elsewhere (the drift test compares the two).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
DEFAULT_OUT = ROOT / "client" / "ntk_client" / "_proto"
PACKAGE = "ntk_client._proto"
_IMPORT_RE = re.compile(r"^from ntk\.v1 import", re.MULTILINE)
HEADER = "# Generated from proto/ by scripts/gen_proto.py. Do not edit.\n"


def generate(out: Path) -> list[Path]:
    """Write the stubs under `out`; returns the written files."""
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.glob("ntk/v1/*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")

        written = []
        if out.exists():
            shutil.rmtree(out)
        for src in sorted(Path(tmp).rglob("*.py*")):
            dest = out / src.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT_RE.sub(f"from {PACKAGE}.ntk.v1 import", src.read_text())
            dest.write_text(HEADER + text)
            written.append(dest)
    for pkg in (out, out / "ntk", out / "ntk" / "v1"):
        (pkg / "__init__.py").write_text(HEADER)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    files = generate(args.out)
    print(f"wrote {len(files)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
