"""`ntk`: the command line of the NTK service client (no torch needed).

    ntk register SPEC.json [--weights W.safetensors|W.npz]
    ntk upload X.npy [Y.npy]
    ntk kernel MODEL --x1 X.npy|dataset:ID [--x2 ...] --out K.npy [--memmap] [--layout ...]
    ntk predict MODEL --x-train X.npy|dataset:ID [--y-train Y.npy] [--x-test ...] --out P.npz
    ntk models

--target (or NTK_TARGET) names the server; --quiet silences the progress bar, which is shown
only when stderr is a terminal. Exit status: 0 done, 1 the server refused, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from ntk_client.assemble import PARTIAL_SUFFIX
from ntk_client.client import DEFAULT_MAX_MESSAGE_BYTES, LAYOUTS, METHODS, Client, NTKError

DEFAULT_TARGET = "127.0.0.1:50051"
DATASET_PREFIX = "dataset:"


class UsageError(Exception):
    """A bad argument or input file; exit status 2."""


def _array(path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{what}: cannot read {path!r} as .npy ({exc})") from None


def _inputs(value: str | None, what: str):
    """'dataset:ID' -> the id; a path -> its array; None -> None."""
    if value is None:
        return None
    if value.startswith(DATASET_PREFIX):
        return value[len(DATASET_PREFIX) :]
    return _array(value, what)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write next to `path` and rename, so `path` never holds a half-written file."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def _weights(path: str | None):
    if path is None:
        return None
    if path.endswith(".safetensors"):
        return Path(path).read_bytes()  # sent as it is; the server checks it
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    raise UsageError(f"--weights: expected a .safetensors or .npz file, got {path!r}")


def _block_shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        rows, cols = (int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"--block-shape: expected ROWS,COLS such as 512,512, got {text!r}"
        ) from None
    return rows, cols


def cmd_register(client: Client, args) -> None:
    try:
        spec = json.loads(Path(args.spec).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"spec: cannot read {args.spec!r} as JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise UsageError(f"spec: {args.spec!r} must hold a JSON object, got {type(spec).__name__}")
    model = client.register_model(spec, _weights(args.weights))
    print(model.id)
    print(
        f"parameters={model.parameter_count} input_shape={list(model.input_shape)} "
        f"output_size={model.output_size}",
        file=sys.stderr,
    )


def cmd_upload(client: Client, args) -> None:
    x = _array(args.x, "x")
    y = None if args.y is None else _array(args.y, "y")
    dataset = client.upload_dataset(x, y)
    print(dataset.id)


def _writable_out(path: str) -> Path:
    """Check --out before any work: the kernel may take long to compute."""
    out = Path(path)
    if not out.parent.is_dir():
        raise UsageError(f"--out: directory {str(out.parent)!r} does not exist")
    return out


def cmd_kernel(client: Client, args) -> None:
    out = _writable_out(args.out)
    options = dict(
        layout=args.layout,
        method=args.method,
        dtype=args.dtype,
        batch_diagonal=args.batch_diagonal,
        block_shape=_block_shape(args.block_shape),
        timeout=args.timeout,
        progress=False if args.quiet else None,
    )
    x1, x2 = _inputs(args.x1, "--x1"), _inputs(args.x2, "--x2")
    if args.memmap:
        k = client.kernel(args.model, x1, x2, out=out, **options)  # renamed into place at the end
    else:
        k = client.kernel(args.model, x1, x2, **options)
        _save_npy(out, k)
    print(f"{out} shape={list(k.shape)} dtype={k.dtype}", file=sys.stderr)


def cmd_predict(client: Client, args) -> None:
    _writable_out(args.out)
    y_train = None if args.y_train is None else _array(args.y_train, "--y-train")
    try:
        times = [float(t) for t in args.t]  # "inf" parses as math.inf
    except ValueError:
        raise UsageError(f"--t: expected numbers or inf, got {args.t}") from None
    predictions = client.predict(
        args.model,
        _inputs(args.x_train, "--x-train"),
        y_train,
        _inputs(args.x_test, "--x-test"),
        t=times,
        learning_rate=args.learning_rate,
        diag_reg=args.diag_reg,
        diag_reg_absolute=args.diag_reg_absolute,
        layout=args.layout,
        method=args.method,
        dtype=args.dtype,
        timeout=args.timeout,
    )
    out = Path(args.out)
    if out.suffix == ".npz":
        partial = out.with_name(out.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as f:
            np.savez(f, t=np.array(predictions.t), f=predictions.f, f0=predictions.f0)
        os.replace(partial, out)
    else:
        _save_npy(out, predictions.f)
    print(f"{out} f shape={list(predictions.f.shape)} (t, N_test, O)", file=sys.stderr)


def cmd_models(client: Client, args) -> None:
    models = client.models()  # before the header, so a failed call prints only the error
    print(f"{'id':32}  {'parameters':>12}  {'input_shape':16}  {'outputs':>7}  created")
    for m in models:
        shape = "x".join(map(str, m.input_shape))
        print(f"{m.id:32}  {m.parameter_count:>12}  {shape:16}  {m.output_size:>7}  {m.created_at}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntk", description="Client of the NTK kernel service.", allow_abbrev=False
    )
    p.add_argument(
        "--target",
        default=os.environ.get("NTK_TARGET", DEFAULT_TARGET),
        help="server address host:port or any gRPC target [NTK_TARGET, default %(default)s]",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds per command")
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="largest message to send or receive (default %(default)s)",
    )
    # The token itself only through the environment: a flag would show it in `ps`.
    p.add_argument("--tls-ca", help="PEM CA that signed the server's certificate (enables TLS)")
    p.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", help="PEM key of --tls-cert")
    sub = p.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register a spec file; prints the model id")
    reg.add_argument("spec", help="architecture spec as JSON (see ntk_client.spec)")
    reg.add_argument("--weights", help="initial weights: .safetensors or .npz by parameter name")
    reg.set_defaults(run=cmd_register)

    up = sub.add_parser("upload", help="upload inputs (and targets); prints the dataset id")
    up.add_argument("x", help="inputs X.npy, shape (N, *input_shape)")
    up.add_argument("y", nargs="?", help="targets Y.npy, shape (N, O)")
    up.set_defaults(run=cmd_upload)

    ker = sub.add_parser("kernel", help="compute K(x1, x2) into an .npy file")
    ker.add_argument("model", help="model id")
    ker.add_argument("--x1", required=True, help="X.npy or dataset:ID")
    ker.add_argument("--x2", help="X.npy or dataset:ID (absent: the Gram matrix of x1)")
    ker.add_argument("--out", required=True, help="output .npy")
    ker.add_argument(
        "--memmap", action="store_true", help="write blocks straight into --out (any size)"
    )
    ker.add_argument("--layout", choices=sorted(LAYOUTS), default="trace")
    ker.add_argument("--method", choices=sorted(METHODS), default="auto")
    ker.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ker.add_argument("--batch-diagonal", action="store_true", help="only K(x1_i, x1_i)")
    ker.add_argument("--block-shape", help="ROWS,COLS of each block (default: the server's)")
    ker.set_defaults(run=cmd_kernel)

    pre = sub.add_parser("predict", help="linearised-network predictions into .npz or .npy")
    pre.add_argument("model", help="model id")
    pre.add_argument("--x-train", required=True, help="X.npy or dataset:ID (with targets)")
    pre.add_argument("--y-train", help="Y.npy (N, O); optional for a dataset with targets")
    pre.add_argument("--x-test", help="X.npy or dataset:ID (absent: predict on x-train)")
    pre.add_argument("--t", nargs="+", default=["inf"], help="training times; inf allowed")
    pre.add_argument("--learning-rate", type=float, default=1.0)
    pre.add_argument("--diag-reg", type=float, default=0.0, help="times mean(diag K), or ...")
    pre.add_argument("--diag-reg-absolute", action="store_true", help="... added as it is")
    pre.add_argument("--method", choices=sorted(METHODS), default="auto")
    pre.add_argument("--layout", choices=["trace", "full"], default="trace")
    pre.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    pre.add_argument("--out", required=True, help=".npz (t, f, f0) or .npy (f: t x N x O)")
    pre.set_defaults(run=cmd_predict)

    lst = sub.add_parser("models", help="list registered models")
    lst.set_defaults(run=cmd_models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        client = Client(
            args.target,
            max_message_bytes=args.max_message_bytes,
            timeout=args.timeout,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        with client:
            args.run(client, args)
    except UsageError as exc:
        print(f"ntk: {exc}", file=sys.stderr)
        return 2
    except NTKError as exc:
        print(f"ntk: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # the client's own argument checks
        print(f"ntk: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
