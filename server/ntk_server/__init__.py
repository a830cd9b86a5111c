"""ntk_server: a gRPC service computing empirical neural tangent kernels.

Layers, top to bottom: service (gRPC translation) -> scheduler (device work queue) ->
engine (pure torch) -> registry (models and datasets on disk).
"""

__version__ = "0.1.0"
