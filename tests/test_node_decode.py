"""The wire formulas are language-neutral: JavaScript (Node, protobufjs on the .proto alone, no generated code of
ours) decodes DTYPE_UINT8_AFFINE codes and COMPRESSION_SHUFFLE_ZSTD payloads to the same float32 bits as Python.

Needs ``node`` and the two npm packages of tests/node (``npm ci --prefix tests/node``); skipped without them.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import regenerate, wire

NODE_DIR = Path(__file__).resolve().parent / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (apt-get install nodejs)"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules" / "protobufjs").is_dir()
                       or not (NODE_DIR / "node_modules" / "fzstd").is_dir(),
                       reason="the npm packages of tests/node are not installed: npm ci --prefix tests/node"),
]
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None
RNG = np.random.default_rng(23)


def _features(shape) -> np.ndarray:
    x = np.cumsum(RNG.standard_normal(shape), axis=-1) * RNG.uniform(0.01, 20)
    return (x / (1 + np.exp(-x))).astype(np.float32)


def _cases() -> dict[str, pb.Tensor]:
    """Tensors of every kind the server sends: codes of maps, pooled vectors and object features, and floats."""
    cases = {}
    for name, shape in (("map", (16, 12, 20)), ("pooled", (64,)), ("objects", (7, 40)), ("scalar", ())):
        x = _features(shape)
        if name == "map":
            x[3] = 1.25  # a constant channel
        codes = wire.quantize_affine(x)
        cases[f"affine_{name}"] = wire.fill_tensor_affine(pb.Tensor(), name, 1, 8, codes.codes, codes.scales,
                                                          codes.offsets)
    cases["float32"] = wire.tensor_to_proto("f32", 2, 16, _features((8, 9, 10)))
    cases["float16"] = wire.tensor_to_proto("f16", 2, 16, _features((8, 9, 10)).astype(np.float16))
    cases["bfloat16"] = wire.tensor_to_proto("bf16", 2, 16, _features((8, 9, 10)), pb.DTYPE_BFLOAT16)
    if HAVE_ZSTD:
        from yolostream.server.frontend import compression
        for name in ("affine_map", "float32", "float16"):
            packed = pb.Tensor()
            packed.CopyFrom(cases[name])
            packed.data = compression.compress_tensor(packed, cases[name].data, pb.COMPRESSION_SHUFFLE_ZSTD)
            assert packed.compression == pb.COMPRESSION_SHUFFLE_ZSTD
            cases[f"{name}_zstd"] = packed
    return cases


def test_node_decodes_every_kind_to_the_same_float32_bits(tmp_path):
    cases = _cases()
    inputs = []
    for name, tensor in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(tensor.SerializeToString())
        inputs.append(str(path))
    run = subprocess.run([NODE, str(NODE_DIR / "decode.js"), str(regenerate.PROTO_ROOT), str(tmp_path), *inputs],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name, tensor in cases.items():
        expected = np.ascontiguousarray(wire.decode_tensor(tensor), dtype=np.float32)
        got = (tmp_path / f"{name}.f32").read_bytes()
        assert got == expected.tobytes(), name
    if not HAVE_ZSTD:
        pytest.skip("zstandard is not installed: the compressed cases were left out (pip install 'yolostream[compress]')")
