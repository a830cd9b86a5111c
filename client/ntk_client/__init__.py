"""ntk_client: a thin client for the NTK kernel service (numpy and grpcio only).

from ntk_client import Client
with Client("127.0.0.1:50051") as client:
    model = client.register_model(spec)
    k = client.kernel(model, x_train)            # (N, N), trace layout

Several replicas sharing one registry: ReplicaSet("dns:///name:port") or a list of targets.
"""

from ntk_client.assemble import RetryPolicy
from ntk_client.client import (
    Client,
    KernelBlock,
    KernelStream,
    ModelInfo,
    NTKError,
    Predictions,
    place_block,
)
from ntk_client.distributed import ReplicaSet, distributed_kernel

__version__ = "0.1.0"

__all__ = [
    "Client",
    "KernelBlock",
    "KernelStream",
    "ModelInfo",
    "NTKError",
    "Predictions",
    "ReplicaSet",
    "RetryPolicy",
    "distributed_kernel",
    "place_block",
]
