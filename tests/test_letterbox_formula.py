"""One letterbox back-mapping everywhere: every statement of the formula in the repository (README, the proto
comment, docstrings) is read and evaluated, and it must agree with ``yolostream.v1.vocab.input_to_frame`` (what the
server and ``cell_to_original`` run) and with the client's heatmap resampling (``viz.map_to_frame``) on frames
whose resize rounds: 479x637, 1x1000, 333x777, 1000x1. There, dividing by upstream's ``ratio`` instead is off by up
to 2 px, which these checks are tight enough to see."""

from __future__ import annotations

import re

import numpy as np
import pytest

from yolostream.client.viz import map_to_frame
from yolostream.server.common.preprocess import prepare
from yolostream.v1.vocab import cell_to_frame, input_to_frame

from conftest import REPO

#: Files that state the formula, and how many statements each must hold (x, and y where it is spelt out).
STATEMENTS = {
    "README.md": 3,
    "protos/yolostream/v1/feature_service.proto": 1,
    "protos/yolostream/v1/vocab.py": 1,
    "client/yolostream/client/results.py": 1,
    "client/yolostream/client/viz.py": 1,
    "server/yolostream/server/offline/extract.py": 1,
}
#: ``… = (x_input − pad_left) · original_width / resized_width``: the right-hand side, up to a backtick or comma.
FORMULA = re.compile(r"=\s*(\((?P<var>[xy]\w*)\s*[-−]\s*pad_(?:left|top)\)\s*[*·/][^`,\n]*)")
CASES = [(hw, imgsz, policy) for hw in [(479, 637), (1, 1000), (333, 777), (1000, 1)] for imgsz in (320, 640)
         for policy in ("auto", "square")]


def _letterbox(hw: tuple[int, int], imgsz: int, policy: str) -> dict:
    return prepare(np.zeros((*hw, 3), np.uint8), imgsz, 32, policy)[1].as_dict()


def _statements() -> list[tuple[str, str, str]]:
    """(file, variable, right-hand side) of every statement of the formula in the files of STATEMENTS."""
    found = []
    for name in STATEMENTS:
        for match in FORMULA.finditer((REPO / name).read_text()):
            found.append((name, match.group("var"), match.group(1).strip()))
    return found


def _evaluate(expression: str, variable: str, value: np.ndarray, letterbox: dict) -> np.ndarray:
    """The documented expression, in Python: − and · are the README's minus and times."""
    code = expression.replace("−", "-").replace("·", "*")
    return eval(code, {"__builtins__": {}}, {**letterbox, variable: value})  # noqa: S307 (our own docs)


def _readme(axis: str, value: np.ndarray, letterbox: dict) -> np.ndarray:
    """``value`` (model-input coordinates along ``axis``, "x" or "y") mapped by the README's own formula."""
    for name, variable, rhs in _statements():
        if name == "README.md" and variable.startswith(axis):
            return _evaluate(rhs, variable, value, letterbox)
    raise AssertionError(f"the README states no formula for {axis}")


def test_every_file_states_the_formula_with_the_letterbox_fields():
    found = _statements()
    for name, count in STATEMENTS.items():
        mine = [rhs for file, _, rhs in found if file == name]
        assert len(mine) >= count, f"{name} states the back-mapping {len(mine)} time(s), expected {count}: {mine}"
    for name, variable, rhs in found:
        fields = set(re.findall(r"[a-z_]+", rhs)) - {variable}
        assert fields <= {"pad_left", "pad_top", "original_width", "original_height", "resized_width",
                          "resized_height"}, f"{name}: {rhs!r} uses {sorted(fields)}"


@pytest.mark.parametrize("hw, imgsz, policy", CASES)
def test_every_statement_agrees_with_vocab_and_puts_the_content_edges_on_the_frame_edges(hw, imgsz, policy):
    lb = _letterbox(hw, imgsz, policy)
    rng = np.random.default_rng(hw[0] * 7 + imgsz)
    xs = np.concatenate([[lb["pad_left"], lb["pad_left"] + lb["resized_width"]],
                         rng.uniform(0, lb["input_width"], 50)])
    ys = np.concatenate([[lb["pad_top"], lb["pad_top"] + lb["resized_height"]],
                         rng.uniform(0, lb["input_height"], 50)])
    mapped = input_to_frame(np.stack([xs, ys], axis=-1), lb)
    np.testing.assert_array_equal(mapped[:2, 0], [0.0, hw[1]])
    np.testing.assert_array_equal(mapped[:2, 1], [0.0, hw[0]])
    for name, variable, rhs in _statements():
        along_x = "width" in rhs
        got = _evaluate(rhs, variable, xs if along_x else ys, lb)
        np.testing.assert_allclose(got, mapped[:, 0 if along_x else 1], rtol=0, atol=1e-9,
                                   err_msg=f"{name}: {rhs}")


@pytest.mark.parametrize("hw, imgsz, policy", CASES)
def test_cells_map_by_the_documented_formula(hw, imgsz, policy):
    lb = _letterbox(hw, imgsz, policy)
    stride = 8
    row = (lb["pad_top"] + lb["resized_height"] // 2) // stride  # the cell under the middle of the content
    col = (lb["pad_left"] + lb["resized_width"] // 2) // stride
    box = cell_to_frame(row, col, stride, lb, clip=False)
    x1, x2 = _readme("x", np.array([col, col + 1.0]) * stride, lb)
    y1, y2 = _readme("y", np.array([row, row + 1.0]) * stride, lb)
    np.testing.assert_allclose(box, [x1, y1, x2, y2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("hw, imgsz, policy", CASES)
def test_the_clients_heatmap_resampling_follows_the_formula(hw, imgsz, policy):
    """A map with one cell per model-input pixel whose value is that pixel's column (row) index, resampled onto the
    frame by ``map_to_frame``, gives each frame pixel the model-input coordinate it comes from; mapped back by the
    README's formula that must be the pixel's own centre. cv2's bilinear warp weighs in 1/32-pixel steps, so the
    bound is 1/32 of an input pixel in frame pixels; the ``ratio`` formula misses it by far in the first case."""
    lb = _letterbox(hw, imgsz, policy)
    h_in, w_in = lb["input_height"], lb["input_width"]
    for axis, size, pad, original, resized in ((1, w_in, "pad_left", "original_width", "resized_width"),
                                               (0, h_in, "pad_top", "original_height", "resized_height")):
        name = "x" if axis == 1 else "y"
        index = np.arange(size, dtype=np.float32)
        fmap = np.broadcast_to(index[None, :] if axis == 1 else index[:, None], (h_in, w_in))
        heat = map_to_frame(fmap, lb)
        assert heat.shape == hw
        centres = np.arange(hw[axis]) + 0.5
        source = centres * lb[resized] / lb[original] + lb[pad] - 0.5  # what the warp should sample
        inside = (source >= 0) & (source <= size - 1)  # past the edges the warp replicates the border
        sampled = (heat[0, :] if axis == 1 else heat[:, 0])[inside].astype(np.float64) + 0.5
        back = _readme(name, sampled, lb)
        bound = lb[original] / lb[resized] / 32 + 1e-3
        assert np.abs(back - centres[inside]).max() <= bound, (axis, np.abs(back - centres[inside]).max())
        if hw == (479, 637) and imgsz == 320 and axis == 0:
            by_ratio = (sampled - lb[pad]) / lb["ratio_h"]
            assert np.abs(by_ratio - centres[inside]).max() > 4 * bound, "the check could not tell the formulas apart"
