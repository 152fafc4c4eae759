"""What the one device process runs: the model engine and its backends, staging, the micro-batcher, and the host
that serves every front-end's frames through their shared-memory arenas.
"""
