"""ntk_client: a thin client for the NTK kernel service (numpy and grpcio only)."""

__version__ = "0.1.0"
