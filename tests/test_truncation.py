"""Truncated forwards run only the dependency closure of the requested layers, and names come from the graph."""

from __future__ import annotations

import pytest
import torch

from yolostream.server.model.catalogue import build_catalogue, resolve_layers
from yolostream.server.model.graph import build_model
from yolostream.server.model.plan import make_plan, run_plan


@pytest.fixture(scope="module")
def yolov5s():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_model("yolov5s").eval()


def _executed(model, targets, size=64):
    ran: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: ran.append(i)) for i, m in enumerate(model.model)]
    try:
        with torch.inference_mode():
            out = run_plan(model.model, torch.rand(1, 3, size, size), make_plan(model.model, targets))
    finally:
        for h in hooks:
            h.remove()
    return ran, out


def test_layer_9_of_yolov5s_never_runs_layers_10_to_24(yolov5s):
    ran, out = _executed(yolov5s, [9])
    assert ran == list(range(10))
    assert list(out) == [9]


def test_neck_request_runs_only_its_closure_and_matches_the_full_forward(yolov5s):
    ran, out = _executed(yolov5s, [17, 4])
    assert ran == list(range(18))
    assert sorted(out) == [4, 17]
    full = {}
    hooks = [yolov5s.model[i].register_forward_hook(lambda m, a, o, i=i: full.__setitem__(i, o)) for i in (4, 17)]
    try:
        with torch.inference_mode():
            torch.manual_seed(1)
            x = torch.rand(1, 3, 64, 64)
            yolov5s(x)
            mine = run_plan(yolov5s.model, x, make_plan(yolov5s.model, [4, 17]))
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(mine[4], full[4]) and torch.equal(mine[17], full[17])


def test_intermediates_are_released_after_their_last_consumer(yolov5s):
    plan = make_plan(yolov5s.model, [23])
    held, peak = set(), 0
    for i in plan.steps:
        held.add(i)
        held -= set(plan.release_after.get(i, ()))
        peak = max(peak, len(held))
    assert held == {23}
    # layers 4, 6, 10, 14, 17 and 20 are waited on by later Concats (the save list); nothing else is kept.
    assert peak <= 8


def test_detect_and_out_of_range_are_refused(yolov5s):
    with pytest.raises(ValueError, match="Detect"):
        make_plan(yolov5s.model, [24])
    with pytest.raises(ValueError, match="0..24"):
        make_plan(yolov5s.model, [25])


@pytest.mark.parametrize(
    "cfg, names",
    [
        ("yolov5s", {"backbone": 9, "C3": 4, "C4": 6, "C5": 9, "P3": 17, "P4": 20, "P5": 23}),
        ("yolov5n6", {"backbone": 11, "C3": 4, "C4": 6, "C5": 8, "C6": 11, "P3": 23, "P4": 26, "P5": 29, "P6": 32}),
    ],
)
def test_aliases_are_derived_from_the_graph(cfg, names):
    model = build_model(cfg).eval()
    rows = build_catalogue(model, (128, 128))
    resolved = {r.name: r.index for r in resolve_layers(rows, list(names))}
    assert resolved == names
    assert rows[-1].role == "detect"
    assert {r.role for r in rows[: names["backbone"] + 1]} == {"backbone"}
    assert {r.role for r in rows[names["backbone"] + 1 : -1]} == {"neck"}


def test_legacy_v5_layout_names_its_own_layers():
    """v5.0: SPP at 8 and C3 at 9, so ``backbone`` is 9 (a C3), never assumed to be an SPPF."""
    cfg = {
        "nc": 80, "depth_multiple": 0.33, "width_multiple": 0.25,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                     [-1, 1, "Conv", [256, 3, 2]], [-1, 9, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                     [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPP", [1024, [5, 9, 13]]],
                     [-1, 3, "C3", [1024, False]]],
        "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                 [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
                 [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
                 [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]],
                 [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]],
                 [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]],
    }
    rows = build_catalogue(build_model(cfg).eval(), (64, 64))
    table = {a: r.index for r in rows for a in r.aliases}
    assert table["backbone"] == 9 and rows[9].type == "C3" and rows[8].type == "SPP"
    assert table["C5"] == 9 and table["P5"] == 23


def test_catalogue_shapes_strides_and_errors():
    rows = build_catalogue(build_model("yolov5n").eval(), (640, 640))
    assert rows[9].shape == (256, 20, 20) and rows[9].stride == 32 and rows[9].type == "SPPF"
    assert rows[17].shape == (64, 80, 80) and rows[17].stride == 8
    assert rows[0].stride == 2 and rows[0].source == ()
    assert rows[16].source == (15, 4)
    assert rows[24].source == (17, 20, 23) and rows[24].shape == ()
    assert sum(r.params for r in rows) == 1_872_157
    everything = resolve_layers(rows, ["all"])
    assert [r.name for r in everything] == [str(i) for i in range(24)]
    with pytest.raises(ValueError, match=r"unknown layer 'P7'.*backbone.*C3.*P5"):
        resolve_layers(rows, ["P7"])
    with pytest.raises(ValueError, match="Detect"):
        resolve_layers(rows, ["24"])
    assert [(r.name, r.index) for r in resolve_layers(rows, ["p3", "9", "backbone"])] == [
        ("p3", 17), ("9", 9), ("backbone", 9)]
