"""yolostream wire contract, version 1: the proto, its generated stubs and numpy-only wire helpers."""
