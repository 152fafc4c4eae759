"""The YAML → layer-graph builder reproduces upstream's parse_model: same layers, arguments, keys and strides."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from yolostream.server.model import build_model, load_config
from yolostream.server.model.config import (
    builtin_configs,
    parse_activation,
    parse_model,
    resolve_arg,
    scale_depth,
    scale_width,
)
from yolostream.server.model.modules import Conv, Detect, fuse_model

P5_ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


def _small(backbone, head=(), nc=4, anchors=None):
    """A tiny config (width 0.25) around the modules under test."""
    return {"nc": nc, "depth_multiple": 1.0, "width_multiple": 0.25,
            "anchors": anchors if anchors is not None else [[10, 13, 16, 30]],
            "backbone": [list(r) for r in backbone], "head": [list(r) for r in head]}


def _listing(model: nn.Module) -> list[tuple[str, list[int]]]:
    return [(k, list(v.shape)) for k, v in model.state_dict().items()]


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.1)


@pytest.fixture(scope="module")
def fixture_model(layers_json):
    return build_model(layers_json["model_attributes"]["yaml"])


# --- the upstream fixture -----------------------------------------------------------------------------------


def test_fixture_yaml_gives_upstream_state_dict_listing(layers_json, fixture_model):
    expected = [(k, shape) for k, shape, _ in layers_json["state_dict"]]
    assert len(expected) == 349
    assert _listing(fixture_model) == expected
    dtypes = {k: str(v.dtype) for k, v in fixture_model.state_dict().items()}
    assert all(dtypes[k] == "torch.int64" for k, _, d in layers_json["state_dict"] if d == "int64")


def test_fixture_layers_match_upstream_parse(layers_json, fixture_model):
    assert fixture_model.save == layers_json["save"] == [4, 6, 10, 14, 17, 20, 23]
    for row, layer, spec in zip(layers_json["layers"], fixture_model.model, fixture_model.specs, strict=True):
        i = row["index"]
        assert (layer.i, layer.f, layer.type, layer.np) == (i, row["from"], row["type"], row["params"]), i
        assert (spec.index, spec.from_, spec.n, spec.params, spec.section) == (
            i, row["from"], row["n"], row["params"], row["section"]), i
        assert spec.args == row["resolved_args"], i
        assert spec.type == row["type"]
        out = row["outputs"][0]["shape"]
        if spec.module != "Detect":
            assert spec.channels == out[1], i
    assert fixture_model.backbone_end == layers_json["backbone_layers"][1] == 9
    assert fixture_model.detect_index == 24
    assert fixture_model.stride.tolist() == layers_json["stride"]
    detect = fixture_model.model[24]
    assert detect.anchors.tolist() == layers_json["anchors_buffer_grid_units"]
    assert (detect.nc, detect.no, detect.nl, detect.na) == (80, 85, 3, 3)


def test_our_yolov5n_yaml_is_the_upstream_schema(layers_json, fixture_model):
    ours = load_config("yolov5n")
    upstream = {k: v for k, v in layers_json["model_attributes"]["yaml"].items() if k != "ch"}
    assert ours == upstream
    assert _listing(build_model("yolov5n")) == _listing(fixture_model)


# --- shipped configs ------------------------------------------------------------------------------------------

# Published sizes (millions of parameters, nc=80) of the YOLOv5 v6+ family; rounded from fused models, so ±0.1.
PUBLISHED_M_PARAMS = {"yolov5n": 1.9, "yolov5s": 7.2, "yolov5m": 21.2, "yolov5l": 46.5, "yolov5x": 86.7,
                      "yolov5n6": 3.2, "yolov5s6": 12.6, "yolov5m6": 35.7, "yolov5l6": 76.8, "yolov5x6": 140.7}


def test_exact_parameter_counts():
    assert sum(p.numel() for p in build_model("yolov5n").parameters()) == 1_872_157
    assert sum(p.numel() for p in build_model("yolov5s.yaml").parameters()) == 7_235_389


@pytest.mark.parametrize("name", sorted(PUBLISHED_M_PARAMS))
def test_every_shipped_config_builds(name):
    assert name in builtin_configs()
    model = build_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - PUBLISHED_M_PARAMS[name]) < 0.1
    p6 = name.endswith("6")
    assert model.stride.tolist() == ([8.0, 16.0, 32.0, 64.0] if p6 else [8.0, 16.0, 32.0])
    assert (model.backbone_end, model.detect_index) == ((11, 33) if p6 else (9, 24))
    assert type(model.model[model.backbone_end]).__name__ == "SPPF"
    assert model.training and all(bn.eps == 1e-3 and bn.momentum == 0.03
                                  for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    if name in ("yolov5n", "yolov5n6"):
        with torch.no_grad():
            decoded, raw = model.eval()(torch.rand(1, 3, 128, 192))
        cells = sum((128 // s) * (192 // s) for s in model.stride.int().tolist())
        assert decoded.shape == (1, 3 * cells, 85)
        assert [tuple(r.shape) for r in raw] == [(1, 3, 128 // s, 192 // s, 85) for s in model.stride.int().tolist()]


def test_s6_layer_strides_and_save():
    model = build_model("yolov5s6").eval()
    assert model.save == [4, 6, 8, 12, 16, 20, 23, 26, 29, 32]
    heights: dict[int, int] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, i=i: heights.__setitem__(i, out.shape[-2]))
             for i, m in enumerate(model.model) if i != model.detect_index]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 256, 256))
    finally:
        for h in hooks:
            h.remove()
    table = {0: 2, 1: 4, 2: 4, 3: 8, 4: 8, 5: 16, 6: 16, 7: 32, 8: 32, 9: 64, 10: 64, 11: 64, 12: 64,
             13: 32, 14: 32, 15: 32, 16: 32, 17: 16, 18: 16, 19: 16, 20: 16, 21: 8, 22: 8, 23: 8,
             24: 16, 25: 16, 26: 16, 27: 32, 28: 32, 29: 32, 30: 64, 31: 64, 32: 64}
    assert {i: 256 // h for i, h in heights.items()} == table
    assert model.model[33].f == [23, 26, 29, 32]
    pixels = torch.tensor([[19, 27, 44, 40, 38, 94], [96, 68, 86, 152, 180, 137],
                           [140, 301, 303, 264, 238, 542], [436, 615, 739, 380, 925, 792]]).float().view(4, 3, 2)
    assert torch.equal(model.model[33].anchors, pixels / torch.tensor([8.0, 16, 32, 64]).view(4, 1, 1))


def test_input_channels_are_recorded():
    model = build_model("yolov5n", ch=1)
    assert model.model[0].conv.weight.shape == (16, 1, 6, 6) and model.yaml["ch"] == 1


def test_anchors_listed_large_to_small_are_flipped():
    cfg = load_config("yolov5n")
    cfg["anchors"] = cfg["anchors"][::-1]
    model = build_model(cfg)
    assert model.model[24].anchors[0].tolist() == [[1.25, 1.625], [2.0, 3.75], [4.125, 2.875]]


# --- parse rules ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, gd, expected", [
    (1, 0.33, 1), (3, 0.33, 1), (6, 0.33, 2), (9, 0.33, 3),
    (3, 0.67, 2), (6, 0.67, 4), (9, 0.67, 6),
    (3, 1.0, 3), (9, 1.0, 9),
    (3, 1.33, 4), (6, 1.33, 8), (9, 1.33, 12),
    (3, 0.5, 2), (5, 0.5, 2), (7, 0.5, 4),  # banker's rounding: 1.5 → 2, 2.5 → 2, 3.5 → 4
    (2, 0.1, 1), (1, 0.1, 1),
])
def test_depth_rounding(n, gd, expected):
    assert scale_depth(n, gd) == expected


@pytest.mark.parametrize("channels, outs", [
    (64, [16, 32, 48, 64, 80]), (1024, [256, 512, 768, 1024, 1280]), (768, [192, 384, 576, 768, 960]),
    (100, [32, 56, 80, 104, 128]),
])
def test_width_rounding(channels, outs):
    assert [scale_width(channels, gw) for gw in (0.25, 0.5, 0.75, 1.0, 1.25)] == outs


def test_string_arguments_are_interpreted_without_eval():
    names = {"nc": 80, "anchors": P5_ANCHORS, "na": 3, "no": 255}
    assert resolve_arg("None", names) is None
    assert resolve_arg("nc", names) == 80 and resolve_arg("anchors", names) is P5_ANCHORS
    assert resolve_arg("nearest", names) == "nearest"
    assert resolve_arg("na * (nc + 5)", names) == 255
    assert resolve_arg("1e-3", names) == 0.001 and resolve_arg("(3, 5, 7)", names) == (3, 5, 7)
    hostile = "__import__('os').getpid()"
    assert resolve_arg(hostile, names) == hostile
    assert resolve_arg(False, names) is False


def test_output_conv_width_equal_to_na_times_no_is_not_scaled():
    cfg = _small([[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", ["na * (nc + 5)", 1, 1]]])
    assert [s.channels for s in parse_model(cfg).layers] == [16, 2 * (4 + 5)]


def test_non_c3_repeats_become_a_sequential():
    model = build_model(_small([[-1, 1, "Conv", [64, 3, 2]], [-1, 2, "Conv", [64, 3, 1]]]))
    assert isinstance(model.model[1], nn.Sequential) and model.specs[1].n == 2
    assert "model.1.1.conv.weight" in model.state_dict()


# --- activations --------------------------------------------------------------------------------------------------


def test_yaml_activation_does_not_leak_into_later_builds():
    cfg = load_config("yolov5n")
    cfg["activation"] = "nn.LeakyReLU(0.1)"
    leaky = build_model(cfg)
    acts = [m.act for m in leaky.modules() if isinstance(m, Conv)]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    broken = dict(cfg, head=cfg["head"] + [[-1, 1, "Conv", [8, "k"]]])
    with pytest.raises(ValueError):
        build_model(broken)
    later = build_model("yolov5n")
    assert all(type(m.act) is nn.SiLU for m in later.modules() if isinstance(m, Conv))
    assert type(Conv(3, 8).act) is nn.SiLU


@pytest.mark.parametrize("text, kind", [
    ("nn.LeakyReLU(0.1)", nn.LeakyReLU), ("nn.SiLU()", nn.SiLU), ("nn.Hardswish()", nn.Hardswish),
    ("nn.ReLU()", nn.ReLU), ("torch.nn.LeakyReLU(negative_slope=0.2)", nn.LeakyReLU),
])
def test_activation_strings(text, kind):
    act = parse_activation(text)()
    assert type(act) is kind
    assert parse_activation(text)() is not act


@pytest.mark.parametrize("text", [
    "__import__('os')", "nn.LeakyReLU(__import__('os'))", "os.system('true')", "nn.Conv2d(3, 3, 1)",
    "nn.SiLU", "nn.LeakyReLU('0.1')", "nn.ReLU(**{})", "nn.LeakyReLU(0.1",
])
def test_unsafe_or_unknown_activation_is_refused(text):
    with pytest.raises(ValueError, match="activation"):
        parse_activation(text)
    cfg = load_config("yolov5n")
    cfg["activation"] = text
    with pytest.raises(ValueError, match="activation"):
        build_model(cfg)


# --- errors --------------------------------------------------------------------------------------------------------


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"unknown module 'C4'.*supported:.*C3.*nn\.Upsample"):
        build_model(_small([[-1, 1, "C4", [64]]]))
    with pytest.raises(ValueError, match="built-in configs: .*yolov5s6"):
        load_config("yolov5q")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nc: 80\nbackbone: [[-1, 1, Conv\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="depth_multiple"):
        load_config({"nc": 80, "width_multiple": 1, "anchors": 3, "backbone": [], "head": []})
    with pytest.raises(ValueError, match="anchors"):
        load_config(_small([[-1, 1, "Conv", [64]]], anchors=[[10, 13, 16]]))
    with pytest.raises(ValueError, match=r"layer 1 .*'from' entry 5"):
        load_config(_small([[-1, 1, "Conv", [64]], [5, 1, "Conv", [64]]]))
    with pytest.raises(ValueError, match=r"head row 0.*\[from, number, module, args\]"):
        load_config(_small([[-1, 1, "Conv", [64]]], head=[[-1, 1, "Conv"]]))
    with pytest.raises(ValueError, match="2 anchor levels but 1 inputs"):
        build_model(_small([[-1, 1, "Conv", [64, 3, 2]]], head=[[[0], 1, "Detect", ["nc", [[1, 2], [3, 4]]]]]))
    hostile = "__import__('os').getpid()"
    with pytest.raises(ValueError, match=r"layer 0: cannot build Conv"):
        build_model(_small([[-1, 1, "Conv", [64, hostile]]]))


def test_dict_config_is_copied():
    cfg = _small([[-1, 1, "Conv", [64, 3, 2]]])
    snapshot = copy.deepcopy(cfg)
    build_model(cfg).yaml["backbone"].append("changed")
    assert cfg == snapshot


# --- other module families -------------------------------------------------------------------------------------------

V5_BACKBONE = [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
               [-1, 1, "Conv", [256, 3, 2]], [-1, 9, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
               [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPP", [1024, [5, 9, 13]]],
               [-1, 3, "C3", [1024, False]]]
V5_HEAD = [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
           [[-1, 6], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
           [-1, 1, "torch.nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
           [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]],
           [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]],
           [-1, 3, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]]


def test_legacy_v5_layout():
    cfg = {"nc": 80, "depth_multiple": 0.33, "width_multiple": 0.5, "anchors": P5_ANCHORS,
           "backbone": V5_BACKBONE, "head": V5_HEAD}
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7_276_605
    assert [model.model[i].type for i in (0, 8, 9)] == ["models.common.Focus", "models.common.SPP", "models.common.C3"]
    assert model.specs[8].args == [512, 512, [5, 9, 13]] and model.specs[9].args == [512, 512, 1, False]
    assert "model.0.conv.conv.weight" in model.state_dict()
    assert model.model[11].type == "torch.nn.modules.upsampling.Upsample"


def test_legacy_v3_bottleneck_csp_runs():
    backbone = [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "BottleneckCSP", [128]],
                [-1, 1, "SPP", [128, [5, 9, 13]]], [-1, 1, "BottleneckCSP", [128, False]]]
    head = [[-1, 1, "nn.BatchNorm2d", []], [[-1, 2], 1, "Concat", [1]], [[-1], 1, "Detect", ["nc", "anchors"]]]
    model = build_model(_small(backbone, head, anchors=1))
    keys = model.state_dict()
    assert {"model.2.cv2.weight", "model.2.cv3.weight", "model.2.bn.running_var",
            "model.2.m.2.cv1.conv.weight"} <= set(keys)
    assert model.model[5].eps == 1e-3 and model.specs[5].args == [32]
    assert model.model[7].anchors.shape == (1, 1, 2) and model.stride.tolist() == [4.0]
    with torch.no_grad():
        decoded, raw = model.eval()(torch.rand(2, 3, 32, 32))
    assert decoded.shape == (2, 64, 9) and raw[0].shape == (2, 1, 8, 8, 9)


@pytest.mark.parametrize("rows, keys", [
    ([[-1, 1, "GhostConv", [64, 3, 2]], [-1, 2, "C3Ghost", [64]], [-1, 1, "GhostBottleneck", [128, 3, 2]]],
     ["model.0.cv2.conv.weight", "model.1.m.0.conv.0.cv1.conv.weight", "model.1.m.1.conv.2.cv2.bn.running_mean",
      "model.2.shortcut.0.conv.weight", "model.2.conv.1.conv.weight"]),
    # attention is quadratic in pixels: keep C3TR at stride 16 (the build probes at 256x256).
    ([[-1, 1, "Conv", [64, 3, 2]]] * 4 + [[-1, 2, "C3TR", [64]]],
     ["model.4.m.linear.weight", "model.4.m.tr.1.ma.in_proj_weight", "model.4.m.tr.0.fc2.weight"]),
    ([[-1, 1, "DWConv", [64, 3, 2]], [-1, 2, "C3x", [64]], [-1, 1, "CrossConv", [64, 3, 1]],
      [-1, 1, "C3SPP", [64, [3, 5]]]],
     ["model.1.m.1.cv1.conv.weight", "model.2.cv2.conv.weight", "model.3.m.cv2.conv.weight"]),
])
def test_other_module_families_build_and_run(rows, keys):
    model = build_model(_small(rows, head=[[[-1], 1, "Detect", ["nc", "anchors"]]])).eval()
    assert set(keys) <= set(model.state_dict())
    _randomise_batchnorm(model, seed=4)
    x = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    fused = fuse_model(copy.deepcopy(model))
    with torch.no_grad():
        decoded, raw = model(x)
        decoded_fused, _ = fused(x)
    assert decoded.shape == (1, 2 * sum(r.shape[2] * r.shape[3] for r in raw), 9)
    assert torch.isfinite(decoded).all()
    assert (decoded_fused - decoded).abs().max() <= 1e-5 * decoded.abs().max()


# --- fusion ----------------------------------------------------------------------------------------------------------


def test_fused_model_matches_unfused():
    torch.manual_seed(0)
    model = build_model("yolov5n")
    _randomise_batchnorm(model, seed=1)
    model.eval()
    x = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    fused = fuse_model(copy.deepcopy(model))
    with torch.no_grad():
        decoded, raw = model(x)
        decoded_f, raw_f = fused(x)
    for a, b in zip([decoded, *raw], [decoded_f, *raw_f]):
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    keys = fused.state_dict()
    assert "model.0.conv.bias" in keys and not any(".bn." in k for k in keys)
    assert all(c.fused for c in fused.modules() if isinstance(c, Conv))


def test_bottleneck_csp_keeps_its_standalone_batchnorm_when_fused():
    model = build_model(_small([[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "BottleneckCSP", [64]]]))
    _randomise_batchnorm(model, seed=3)
    model.eval()
    x = torch.rand(1, 3, 32, 32)
    fused = fuse_model(copy.deepcopy(model))
    assert isinstance(fused.model[1].bn, nn.BatchNorm2d) and fused.model[1].cv1.fused
    with torch.no_grad():
        a, b = model(x), fused(x)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


# --- Detect -----------------------------------------------------------------------------------------------------------


def test_detect_shapes_and_decode():
    det = Detect(nc=3, anchors=[[10, 13, 16, 30], [30, 61, 62, 45]], ch=(8, 16))
    det.stride = torch.tensor([8.0, 16.0])
    det.anchors /= det.stride.view(-1, 1, 1)
    for conv in det.m:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    maps = [torch.rand(2, 8, 4, 6), torch.rand(2, 16, 2, 3)]
    assert [tuple(r.shape) for r in det.train()(maps)] == [(2, 2, 4, 6, 8), (2, 2, 2, 3, 8)]
    decoded, raw = det.eval()(maps)
    assert decoded.shape == (2, 2 * (24 + 6), 8) and [tuple(r.shape) for r in raw] == [(2, 2, 4, 6, 8), (2, 2, 2, 3, 8)]
    # zero logits: sigmoid 0.5 → centre of each cell, box = the anchor in pixels, scores 0.5.
    level0 = decoded[0, :48].view(2, 4, 6, 8)
    assert torch.equal(level0[1, 2, 5, :2], torch.tensor([5.5 * 8, 2.5 * 8]))
    assert torch.equal(level0[1, 2, 5, 2:4], torch.tensor([16.0, 30.0]))
    assert torch.equal(decoded[0, -1], torch.tensor([2.5 * 16, 1.5 * 16, 62.0, 45.0, 0.5, 0.5, 0.5, 0.5]))


def test_legacy_anchor_grid_key_loads_strictly(fixture_model):
    state = fixture_model.state_dict()
    state["model.24.anchor_grid"] = torch.zeros(3, 1, 3, 1, 1, 2)
    fresh = build_model("yolov5n")
    fresh.load_state_dict(state, strict=True)
    assert "model.24.anchor_grid" not in fresh.state_dict()
    assert "model.24.anchor_grid" in state
