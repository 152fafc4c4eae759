"""The front-end ⇄ device contract: typed control messages, the batching settings both sides know, and the
shared-memory arena frames and features cross in. Torch-free and grpc-free: both kinds of process import it.
"""
