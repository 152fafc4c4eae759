"""yolostream server: model, engine, batcher and gRPC service."""
