"""Letterbox preprocessing: bit-exact against upstream's outputs, plus geometry and input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from yolostream.server.common.preprocess import POLICIES, Letterbox, input_shape, letterbox, prepare

FIXTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "fixtures"
CASES_JSON = FIXTURES / "letterbox_cases.json"
CASES_NPZ = FIXTURES / "letterbox_cases.npz"


def _load_cases() -> list[dict]:
    if not (CASES_JSON.exists() and CASES_NPZ.exists()):
        return []
    return json.loads(CASES_JSON.read_text())["cases"]


CASES = _load_cases()


@pytest.fixture(scope="module")
def arrays():
    if not CASES_NPZ.exists():
        pytest.skip(f"letterbox fixtures not found at {FIXTURES}")
    with np.load(CASES_NPZ) as data:
        return {k: data[k] for k in data.files}


def _frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.skipif(not CASES, reason=f"letterbox fixtures not found at {FIXTURES}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c['case']}-{c['note']}")
def test_matches_upstream_fixture(case, arrays):
    i = case["case"]
    new_shape = case["new_shape"] if isinstance(case["new_shape"], int) else tuple(case["new_shape"])
    img, lb = letterbox(
        arrays[f"case{i}_frame_bgr_hwc"], new_shape, case["stride"], case["auto"], case["scaleup"]
    )
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])
    expected = arrays[f"case{i}_out_rgb_chw"]
    assert chw.dtype == np.uint8
    assert chw.shape == expected.shape
    assert np.array_equal(chw, expected)
    assert list(lb.out_hw) == case["out_hw"]
    assert list(lb.ratio) == case["ratio"]
    dw, dh = case["pad_dw_dh"]
    assert (lb.pad_left, lb.pad_right) == (round(dw - 0.1), round(dw + 0.1))
    assert (lb.pad_top, lb.pad_bottom) == (round(dh - 0.1), round(dh + 0.1))
    assert (lb.pad_left + lb.pad_right) / 2 == dw
    assert (lb.pad_top + lb.pad_bottom) / 2 == dh


@pytest.mark.skipif(not CASES, reason=f"letterbox fixtures not found at {FIXTURES}")
@pytest.mark.parametrize(
    "case",
    [
        c for c in CASES
        if c["scaleup"] and isinstance(c["new_shape"], int) and c["new_shape"] % c["stride"] == 0
    ],
    ids=lambda c: f"case{c['case']}",
)
def test_prepare_matches_fixture(case, arrays):
    policy = "auto" if case["auto"] else "square"
    i = case["case"]
    chw, lb = prepare(arrays[f"case{i}_frame_bgr_hwc"], case["new_shape"], case["stride"], policy)
    assert chw.flags.c_contiguous
    assert np.array_equal(chw, arrays[f"case{i}_out_rgb_chw"])
    assert list(lb.out_hw) == case["out_hw"]


def test_upstream_examples():
    _, lb = letterbox(_frame(720, 1280), 640, stride=32)
    assert lb.out_hw == (384, 640)
    assert (lb.pad_top, lb.pad_bottom, lb.pad_left, lb.pad_right) == (12, 12, 0, 0)
    assert lb.resized_hw == (360, 640)
    assert lb.ratio == (0.5, 0.5)

    _, lb32 = letterbox(_frame(300, 700), 640, stride=32)
    _, lb64 = letterbox(_frame(300, 700), 640, stride=64)
    assert lb32.out_hw == (288, 640)
    assert lb64.out_hw == (320, 640)


def test_odd_padding_goes_bottom_right():
    # 300x301 at 320: resized to 319x320 -> 1 spare row; at 301x300 the spare goes to the right.
    _, lb = letterbox(_frame(300, 301), 320, auto=False)
    assert (lb.pad_top, lb.pad_bottom) == (0, 1)
    _, lb = letterbox(_frame(301, 300), 320, auto=False)
    assert (lb.pad_left, lb.pad_right) == (0, 1)


def test_padding_value_and_content_placement():
    frame = np.full((100, 200, 3), 7, dtype=np.uint8)
    img, lb = letterbox(frame, 200, auto=False)
    assert img.shape == (200, 200, 3)
    assert (lb.pad_top, lb.pad_bottom) == (50, 50)
    assert np.all(img[:50] == 114) and np.all(img[150:] == 114)
    assert np.all(img[50:150] == 7)


def test_no_resize_when_size_unchanged():
    frame = _frame(64, 96)
    img, lb = letterbox(frame, 96, stride=32)
    assert lb.ratio == (1.0, 1.0)
    assert img.shape == (64, 96, 3)
    assert np.array_equal(img, frame)


def test_scaleup_false_never_enlarges():
    _, lb = letterbox(_frame(100, 150), 640, scaleup=False)
    assert lb.ratio == (1.0, 1.0)
    assert lb.resized_hw == (100, 150)
    assert lb.out_hw == (128, 160)


def test_square_policy_pads_to_full_target():
    chw, lb = prepare(_frame(720, 1280), 640, 32, policy="square")
    assert chw.shape == (3, 640, 640)
    assert lb.out_hw == (640, 640)
    assert (lb.pad_top, lb.pad_bottom) == (140, 140)


def test_prepare_is_chw_rgb_contiguous():
    frame = _frame(64, 64)
    frame[..., 0] = 10  # B
    frame[..., 1] = 20  # G
    frame[..., 2] = 30  # R
    chw, lb = prepare(frame, 64, 32)
    assert chw.shape == (3, 64, 64) and chw.dtype == np.uint8
    assert chw.flags.c_contiguous
    assert (chw[0] == 30).all() and (chw[1] == 20).all() and (chw[2] == 10).all()
    assert lb.out_hw == (64, 64)


def test_prepare_rounds_imgsz_up_to_stride():
    chw, lb = prepare(_frame(600, 600), 600, 64, policy="square")
    assert chw.shape == (3, 640, 640)


@pytest.mark.parametrize(
    ("imgsz", "stride", "expected"),
    [(640, 32, (640, 640)), (600, 32, (608, 608)), (600, 64, (640, 640)), (641, 32, (672, 672)),
     ((480, 640), 32, (480, 640)), ((470, 630), 64, (512, 640)), (1, 32, (32, 32))],
)
def test_input_shape_rounds_up(imgsz, stride, expected):
    assert input_shape(imgsz, stride) == expected


@pytest.mark.parametrize(
    ("imgsz", "stride"), [(0, 32), (-640, 32), (640, 0), ((640,), 32), ("640", 32), (True, 32)]
)
def test_input_shape_rejects_bad_values(imgsz, stride):
    with pytest.raises(ValueError):
        input_shape(imgsz, stride)


def test_back_mapping_of_points_and_cells():
    _, lb = letterbox(_frame(720, 1280), 640)
    # Model-input pixel (x, y) = (320, 12 + 180) is the frame centre (640, 360).
    np.testing.assert_allclose(lb.to_original([320.0, 192.0]), [640.0, 360.0])
    # Corners of the resized content land on the frame's corners.
    np.testing.assert_allclose(lb.to_original([[0, 12], [640, 372]]), [[0, 0], [1280, 720]])
    # A stride-32 cell in row 0 lies partly in the top padding; clipped it starts at y=0.
    np.testing.assert_allclose(lb.cell_to_original(0, 1, 32), [64, 0, 128, 40])
    np.testing.assert_allclose(lb.cell_to_original(0, 1, 32, clip=False), [64, -24, 128, 40])
    boxes = lb.box_to_original(np.array([[[0, 0, 640, 384]]]))
    assert boxes.shape == (1, 1, 4)
    np.testing.assert_allclose(boxes[0, 0], [0, 0, 1280, 720])


def test_back_mapping_agrees_with_ratio_formula():
    # With the odd pad (case 7 geometry) the actual per-axis scale differs slightly from r; the
    # difference stays under one original pixel.
    _, lb = letterbox(_frame(250, 251), 320)
    x, y = 100.0, 200.0
    px, py = lb.to_original([x, y])
    r = lb.ratio[0]
    assert abs(px - (x - lb.pad_left) / r) < 1.0
    assert abs(py - (y - lb.pad_top) / r) < 1.0
    np.testing.assert_allclose(lb.to_original([320, 319]), [251, 250])


def test_back_mapping_rejects_bad_shapes():
    _, lb = letterbox(_frame(32, 32), 32)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        lb.to_original([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        lb.box_to_original([1.0, 2.0])
    with pytest.raises(ValueError, match="stride"):
        lb.cell_to_original(0, 0, 0)


def test_letterbox_is_frozen_and_dict_matches_geometry():
    _, lb = letterbox(_frame(720, 1280), 640)
    assert isinstance(lb, Letterbox)
    with pytest.raises(AttributeError):
        lb.pad_top = 3  # type: ignore[misc]
    d = lb.as_dict()
    assert d["input_height"] == d["resized_height"] + d["pad_top"] + d["pad_bottom"]
    assert d["input_width"] == d["resized_width"] + d["pad_left"] + d["pad_right"]
    assert (d["original_height"], d["original_width"]) == (720, 1280)
    assert (d["ratio_w"], d["ratio_h"]) == (0.5, 0.5)


def test_dict_fits_wire_message():
    wire = pytest.importorskip("yolostream.v1.wire")
    _, lb = letterbox(_frame(250, 251), 320)
    msg = wire.letterbox_to_proto(lb.as_dict())
    assert wire.letterbox_from_proto(msg) == lb.as_dict()


def test_non_contiguous_frame_is_accepted():
    big = _frame(100, 200)
    view = big[:, ::2]
    img, _ = letterbox(view, 100)
    ref, _ = letterbox(np.ascontiguousarray(view), 100)
    assert np.array_equal(img, ref)


@pytest.mark.parametrize(
    ("frame", "pattern"),
    [
        (np.zeros((32, 32), np.uint8), r"HxWx3.*\(32, 32\)"),
        (np.zeros((32, 32, 4), np.uint8), r"HxWx3.*\(32, 32, 4\)"),
        (np.zeros((32, 32, 3), np.float32), r"uint8.*float32"),
        (np.zeros((0, 32, 3), np.uint8), r"empty"),
        ([[[0, 0, 0]]], r"numpy.ndarray.*list"),
    ],
)
def test_rejects_bad_frames(frame, pattern):
    with pytest.raises(ValueError, match=pattern):
        prepare(frame, 64, 32)


def test_rejects_unknown_policy():
    with pytest.raises(ValueError, match="auto, square"):
        prepare(_frame(32, 32), 32, 32, policy="stretch")
    assert POLICIES == ("auto", "square")
