"""Pure torch: architectures, kernel blocks and linearised predictions. No gRPC here."""

from ntk_server.engine.blocks import Block, KernelPlan, plan_kernel
from ntk_server.engine.kernels import (
    LAYOUTS,
    METHODS,
    KernelComputer,
    compute_kernel,
    kernel_shape,
)
from ntk_server.engine.linearized import evaluate_linearized, gradient_descent_mse
from ntk_server.engine.network import Network

__all__ = [
    "Block",
    "KernelComputer",
    "KernelPlan",
    "LAYOUTS",
    "METHODS",
    "Network",
    "compute_kernel",
    "evaluate_linearized",
    "gradient_descent_mse",
    "kernel_shape",
    "plan_kernel",
]
