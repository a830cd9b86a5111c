"""The bench on a GPU: W1-W4 at larger N, float32 and float64, TF32 off; about 3-5 minutes.

    python bench/gpu.py                      # on a machine with a CUDA GPU
    python bench/gpu.py --device cpu --tiny  # the same path at tiny sizes (CI, no GPU)

Prints the same tables as run.py, with the GPU's own float32 and float64 matmul rates, and
writes them to bench/RESULTS-GPU.md. The neural-tangents rows are left out: .bench-env holds
a CPU build of jaxlib. Peak memory is torch.cuda.max_memory_allocated of each row's process
(the service row: the server's host resident memory).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

GPU_SIZES = {"W1": 8000, "W1-f64": 4000, "W2": 1024, "W3": 4096, "W4": 8000}
TINY_SIZES = {"W1": 64, "W1-f64": 32, "W2": 16, "W3": 32, "W4": 32}
GPU_REPEATS = 5
# Slow peer rows stop growing once they would take this long on the GPU.
GPU_ROW_BUDGET_S = 8.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, to test the script's path")
    ap.add_argument("--markdown", type=Path, default=Path(__file__).with_name("RESULTS-GPU.md"))
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device cpu --tiny to test the path")
    # TF32 off here and in every row process (row.py), so float32 means float32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run.ROW_BUDGET_S = GPU_ROW_BUDGET_S
    sizes = TINY_SIZES if args.tiny else GPU_SIZES
    argv = [
        "--device", args.device, "--skip-nt", "--repeats", str(2 if args.tiny else GPU_REPEATS),
        "--workloads", ",".join(sizes), "--sizes", ",".join(f"{k}={v}" for k, v in sizes.items()),
        "--markdown", str(args.markdown),
    ]  # fmt: skip
    run.main(argv)


if __name__ == "__main__":
    main()
