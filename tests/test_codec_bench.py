"""bench/codec_bench.py's parts on small inputs: every installed codec round-trips, the choice rule, the box matching.

The study itself (the fixture model on 480x640 frames) is run by hand: ``.venv/bin/python bench/codec_bench.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the codec bench runs the model (the server extra)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import codec_bench  # noqa: E402
from yolostream.server.model import detections as det  # noqa: E402


@pytest.mark.parametrize("itemsize", [1, 2, 4])
def test_every_installed_codec_round_trips(itemsize):
    payload = (np.cumsum(np.random.default_rng(itemsize).integers(-2, 3, 4096 * itemsize)) % 256).astype(np.uint8)
    found = codec_bench.codecs()
    assert "gzip-6" in {c.name for c in found}
    for codec in found:
        cell = codec_bench.time_codec(codec, [payload.tobytes()], itemsize, repeats=1)
        assert cell["plain_bytes"] == payload.size and cell["ratio"] > 0
        assert cell["compress_mb_s"] > 0 and cell["decompress_mb_s"] > 0


def _row(codec, dtype, ratio, pct, wire=True):
    return {"layers": "P3,P4,P5", "dtype": dtype, "codec": codec, "wire_candidate": wire, "ratio": ratio,
            "core_pct_at_camera": pct}


def test_choose_takes_the_best_ratio_that_fits_the_budget_and_the_cheapest_among_near_ties():
    rows = []
    for codec, ratio, pct, wire in (("slow", 1.6, 60.0, True), ("good", 1.3, 10.0, True),
                                    ("near", 1.29, 5.0, True), ("fast", 1.05, 1.0, True),
                                    ("container", 1.5, 2.0, False)):
        rows += [_row(codec, d, ratio, pct, wire) for d in ("float32", "float16", "uint8")]
    choice = codec_bench.choose(rows, max_core_pct=25.0)
    assert choice["codec"] == "near"  # within 2 % of "good" and cheaper; "slow" is over budget, "container" not wire
    assert set(choice["affordable"]) == {"good", "near", "fast"}
    assert codec_bench.choose(rows, max_core_pct=0.5)["codec"] is None


def _dets(boxes, classes):
    b = torch.tensor(boxes, dtype=torch.float32)
    return det.Detections(b, torch.ones(len(b)), torch.tensor(classes), torch.arange(len(b)))



def test_box_matching_needs_the_same_class_and_iou_09():
    ref = _dets([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60]], [1, 2, 3])
    other = _dets([[0, 0, 10, 10.5], [20, 20, 40, 40], [50, 50, 70, 70]], [1, 5, 3])
    assert codec_bench._match_fraction(ref, other) == (1, 3)
    assert codec_bench._match_fraction(ref, _dets(np.zeros((0, 4)), [])) == (0, 3)


def test_anchor_rows_count_only_well_posed_rows():
    nc = 3
    rows = torch.zeros(1, 3, 5 + nc)
    rows[0, 0] = torch.tensor([50, 50, 20, 20, 0.9, 0.9, 0.1, 0.1])   # well posed
    rows[0, 1] = torch.tensor([50, 50, 20, 20, 0.9, 0.9, 0.9, 0.1])   # tied classes: left out
    rows[0, 2] = torch.tensor([50, 50, 1, 1, 0.9, 0.9, 0.1, 0.1])     # box under 2 pixels: left out
    moved = rows.clone()
    moved[0, 0, 0] += 5  # IoU 0.6
    assert codec_bench._anchor_match(rows, rows) == (1, 1, 1, 1)
    assert codec_bench._anchor_match(rows, moved) == (0, 1, 0, 1)
