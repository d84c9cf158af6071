"""tickscale's policy behind KEDA's external scaler interface (``tickscale scaler keda``).

Kubernetes' HPA owns the handler replicas; this process measures and decides as the
scaler does and reports the count its policy wants over gRPC.

The ``externalscaler_pb2*`` modules are generated from ``externalscaler.proto`` beside
them (KEDA's interface, unchanged); after editing the proto or upgrading grpcio-tools,
regenerate them from the repository root with:

    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
        --grpc_python_out=. scaler/keda/externalscaler.proto

and pin grpcio and protobuf in pyproject.toml at or above the versions the generated
files name (they refuse an older runtime at import).
"""
