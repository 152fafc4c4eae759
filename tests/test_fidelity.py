"""Features equal upstream YOLOv5's layer outputs for the same checkpoint (fp32 CPU, ≤ 1e-4 × layer absmax)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fixture_path
from yolostream.server.engine import Engine
from yolostream.server.model.loader import load_model

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(fixture_path("yolov5n.expected.npz")) as data:
        return {k: data[k] for k in data.files}


def _feature_layers(expected: dict[str, np.ndarray]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in expected if k.startswith("layer_") and "_raw" not in k)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_every_layer_matches_upstream(fixture_weights, expected, fuse):
    engine = Engine(load_model(fixture_weights), device="cpu", fuse=fuse)
    layers = _feature_layers(expected)
    assert layers == list(range(24))
    out = engine.forward(torch.from_numpy(expected["input"]), layers)
    for i in layers:
        want = expected[f"layer_{i}"]
        got = out[i].numpy()
        assert got.shape == want.shape, f"layer {i}"
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= REL_TOL, f"layer {i}: relative error {err:.2e}"


def test_truncated_backbone_is_bit_exact_to_the_full_forward(fixture_weights, expected):
    engine = Engine(load_model(fixture_weights), device="cpu", fuse=False)
    x = torch.from_numpy(expected["input"])
    backbone = engine.forward(x, [engine.resolve(["backbone"])[0].index])
    full = engine.forward(x, range(24))
    assert torch.equal(backbone[9], full[9])
    np.testing.assert_allclose(backbone[9].numpy(), expected["layer_9"], rtol=0, atol=REL_TOL * 31)


def test_detect_raw_maps_match_upstream(fixture_weights, expected):
    model = load_model(fixture_weights).model.float().eval()
    with torch.inference_mode():
        _, raw = model(torch.from_numpy(expected["input"]))
    for k, level in enumerate(raw):
        want = expected[f"layer_24_raw{k}"]
        err = np.abs(level.numpy() - want).max() / np.abs(want).max()
        assert err <= REL_TOL, f"Detect level {k}: relative error {err:.2e}"
