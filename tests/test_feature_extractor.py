"""The feature extractor for your own PyTorch code: upstream-equal outputs (eager, TorchScript, torch.compile,
torch.export), truncation, freezing and training, feature_info against GetModelInfo, the numpy extract, the README
and the example."""

from __future__ import annotations

import json
import os
import re
import runpy
from typing import Callable

import numpy as np
import pytest
import torch
import torch.fx.experimental._config
from torch import nn

from conftest import REPO, engine_extract, fixture_path, torch_threads
from yolostream.client import FeatureClient
from yolostream.server import FeatureExtractor
from yolostream.server import feature_extractor
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.common.settings import ServerSettings
from yolostream.server.serve.in_process import ServerThread
from yolostream.server.model.loader import load_model

REL_TOL = 1e-4
#: yolov5n's named layers (the published architecture: SPPF is 9, the C3 blocks feeding the FPN are 4 and 6, the
#: neck outputs read by Detect are 17, 20 and 23).
ALIASES = {"backbone": 9, "C3": 4, "C4": 6, "C5": 9, "P3": 17, "P4": 20, "P5": 23}
EVERY_NAME = [str(i) for i in range(24)] + list(ALIASES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on this shared 2-core machine torch's second thread spins waiting for a core, making
    every op several times slower; one thread also keeps each result independent of the load."""
    with torch_threads(1):
        yield


def _index(name: str) -> int:
    return ALIASES.get(name, int(name) if name.isdigit() else -1)


@pytest.fixture(scope="module", params=[True, False], ids=["fused", "unfused"])
def every_layer(request, fixture_weights) -> FeatureExtractor:
    return FeatureExtractor(load_model(fixture_weights), EVERY_NAME, fuse=request.param)


def _assert_upstream(out: dict[str, torch.Tensor], expected: dict[str, np.ndarray], rows: slice) -> None:
    assert list(out) == EVERY_NAME
    for name, tensor in out.items():
        want = expected[f"layer_{_index(name)}"][rows]
        got = tensor.detach().numpy()
        assert got.shape == want.shape, name
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= REL_TOL, f"{name}: relative error {err:.2e}"


def _compiled(module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """torch.compile with fullgraph=True (any graph break fails) and a symbolic batch: one graph for batch 1 and 2.

    The backend is Dynamo's ``eager`` unless YOLOSTREAM_TEST_COMPILE_BACKEND names another: capture is where our
    code matters, and inductor's C++ code generation takes about three minutes per graph on this 2-core machine
    (measured: 171 s, outputs within 1e-4 of eager).
    """
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(module, fullgraph=True, backend=os.environ.get("YOLOSTREAM_TEST_COMPILE_BACKEND", "eager"))

    def run(batch: torch.Tensor) -> dict[str, torch.Tensor]:
        # A dynamic batch that is not specialised at 1 (size-oblivious), so batch 1 reuses the batch-2 graph.
        batch = batch.clone()
        torch._dynamo.mark_dynamic(batch, 0)
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return compiled(batch)

    def graphs() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before

    run.graphs = graphs
    return run


def _traced(module: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.jit.trace(module, x, strict=False, check_trace=False)


def _eager(module: nn.Module, x: torch.Tensor) -> nn.Module:
    return module


@pytest.mark.parametrize("wrap", [_eager, _traced, _compiled], ids=["eager", "torchscript-trace", "compile"])
def test_every_layer_name_equals_upstream_at_batch_1_and_2(every_layer, expected, wrap):
    x = torch.from_numpy(expected["input"])
    runner = wrap(every_layer, x)
    with torch.no_grad():
        _assert_upstream(runner(x), expected, slice(0, 2))
        _assert_upstream(runner(x[:1].clone()), expected, slice(0, 1))
    if wrap is _compiled:
        assert runner.graphs() == 1, "batch 1 and 2 should share one full graph"


def test_export_with_a_symbolic_batch_equals_upstream(fixture_weights, expected):
    names = ["backbone", "P3", "P4", "P5", "C3"]
    module = FeatureExtractor(load_model(fixture_weights), names)
    x = torch.from_numpy(expected["input"])
    program = module.export(x).module()
    for rows in (slice(0, 2), slice(0, 1)):
        out = program(x[rows].clone())
        assert list(out) == names
        for name in names:
            want = expected[f"layer_{ALIASES[name]}"][rows]
            assert np.abs(out[name].numpy() - want).max() <= REL_TOL * np.abs(want).max(), name
    with pytest.raises(ValueError, match="at least 2"):
        module.export(x[:1])


def test_layer_9_runs_no_module_past_9_and_holds_none(fixture_weights):
    loaded = load_model(fixture_weights)
    module = FeatureExtractor(loaded, ["9"])
    ran: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: ran.append(i)) for i, m in enumerate(loaded.model.model)]
    try:
        out = module(torch.rand(1, 3, 64, 64))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == list(range(10)) and list(out) == ["9"] and out["9"].shape == (1, 256, 2, 2)
    assert {int(k.split(".")[1]) for k in module.state_dict()} == set(range(10))


def test_only_the_closure_is_held_and_its_keys_are_upstreams(fixture_weights):
    loaded = load_model(fixture_weights)
    full = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    module = FeatureExtractor(loaded, ["C4"], fuse=False)
    own = module.state_dict()
    assert {int(k.split(".")[1]) for k in own} == set(range(7))
    assert all(torch.equal(v, full[k]) for k, v in own.items())
    assert module.feature_info.indices() == [6] and module.by_index(torch.rand(1, 3, 64, 64)).keys() == {6}


def test_frozen_by_default_stays_frozen_in_a_training_parent(fixture_weights):
    module = FeatureExtractor(load_model(fixture_weights), ["P3"], fuse=False)
    assert not any(p.requires_grad for p in module.parameters()) and not module.training
    parent = nn.Sequential(module).train()
    assert not module.training and not any(m.training for m in module.modules())
    x = torch.rand(2, 3, 64, 64)
    before = module(x)["P3"]
    parent(x)
    assert torch.equal(module(x)["P3"], before), "BatchNorm statistics of a frozen extractor changed"
    assert not before.requires_grad
    fused = FeatureExtractor(load_model(fixture_weights), ["P3"])
    assert fused.fused and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_trainable_gets_gradients_trains_batchnorm_and_an_optimizer_step_changes_outputs(fixture_weights):
    module = FeatureExtractor(load_model(fixture_weights), ["P3", "P5"], trainable=True)
    assert not module.fused and all(p.requires_grad for p in module.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = module(x)
    module.train()
    batchnorms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and all(m.training for m in batchnorms)
    image = x.clone().requires_grad_(True)
    out = module(image)
    assert not torch.allclose(out["P3"], before["P3"]), "training mode should normalise with batch statistics"
    loss = sum(t.square().mean() for t in out.values())
    loss.backward()
    no_grad = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"
    assert image.grad is not None and image.grad.abs().sum() > 0
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    module.eval()
    with torch.no_grad():
        after = module(x)
    assert all(not torch.allclose(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="trainable"):
        FeatureExtractor(load_model(fixture_weights), ["P3"], trainable=True, fuse=True)


def test_feature_info_matches_the_catalogue_that_getmodelinfo_reports(fixture_weights):
    names = ["backbone", "C3", "C4", "C5", "P3", "P4", "P5", "2", "13"]
    module = feature_extractor(weights=fixture_weights, layers=names)
    assert module.feature_info.names() == names
    runner = DeviceRunner(load_model(fixture_weights), device="cpu", imgsz=128)
    with ServerThread(runner, ServerSettings(port=0)) as server, FeatureClient(server.address) as client:
        info = client.model_info()
    for feature in module.feature_info:
        row = info.layer(feature.name)
        assert (feature.index, feature.channels, feature.stride, feature.type) == (
            row.index, row.out_channels, row.stride, row.type), feature.name
    assert module.feature_info.channels() == [info.layer(n).out_channels for n in names]
    assert module.feature_info.reduction() == module.feature_info.strides() == [info.layer(n).stride for n in names]


def test_layer_requests_by_list_or_comma_string_and_unknown_names(fixture_weights):
    module = feature_extractor(weights=fixture_weights, layers="P5, 4,C3")
    assert module.feature_info.names() == ["P5", "4", "C3"] and module.feature_info.indices() == [23, 4, 4]
    with pytest.raises(ValueError, match=r"unknown layer 'P7'.*backbone"):
        feature_extractor(weights=fixture_weights, layers=["P3", "P7"])
    with pytest.raises(ValueError, match="Detect"):
        feature_extractor(weights=fixture_weights, layers=["24"])


@pytest.fixture(scope="module")
def letterbox_cases() -> tuple[list[dict], dict[str, np.ndarray]]:
    cases = json.loads(fixture_path("letterbox_cases.json").read_text())["cases"]
    with np.load(fixture_path("letterbox_cases.npz")) as data:
        return cases, {k: data[k] for k in data.files}


@pytest.mark.parametrize("case, policy", [(0, "auto"), (2, "auto"), (3, "square")])
def test_extract_letterboxes_as_upstream_and_returns_the_module_outputs(fixture_weights, letterbox_cases, case,
                                                                        policy):
    cases, arrays = letterbox_cases
    spec = cases[case]
    assert spec["auto"] == (policy == "auto") and spec["stride"] == 32 and spec["scaleup"]
    module = feature_extractor(weights=fixture_weights, layers=["P4", "backbone"])
    frame = arrays[f"case{case}_frame_bgr_hwc"]
    result = module.extract([frame], imgsz=spec["new_shape"], letterbox=policy)[0]
    upstream_input = torch.from_numpy(arrays[f"case{case}_out_rgb_chw"][None].astype(np.float32) / 255)
    with torch.no_grad():
        want = module(upstream_input)
    assert list(result.features) == ["P4", "backbone"]
    for name, tensor in want.items():
        assert result.features[name].dtype == np.float32
        np.testing.assert_allclose(result.features[name], tensor[0].numpy(), rtol=0,
                                   atol=1e-6 * float(tensor.abs().max()))
    assert list(result.letterbox.out_hw) == spec["out_hw"] and list(result.letterbox.ratio) == spec["ratio"]
    np.testing.assert_array_equal(result.cell_to_original("P4", 2, 3),
                                  result.letterbox.cell_to_original(2, 3, stride=16))


def test_extract_batches_by_shape_keeps_order_and_equals_the_server_path(fixture_weights):
    rng = np.random.default_rng(0)
    sizes = [(120, 160), (90, 200), (120, 160), (64, 64), (120, 160), (90, 200)]
    frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for hw in sizes]
    module = feature_extractor(weights=fixture_weights, layers=["P3", "C4"], imgsz=128)
    calls: list[int] = []
    hook = module.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        results = module.extract(frames, batch_size=2)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 1, 2, 2] and len(results) == len(frames)
    server = engine_extract(DeviceRunner(load_model(fixture_weights), device="cpu", imgsz=128), frames, ["P3", "C4"])
    for mine, theirs, hw in zip(results, server, sizes):
        assert mine.letterbox == theirs.letterbox and mine.letterbox.orig_hw == hw
        for name in ("P3", "C4"):
            np.testing.assert_allclose(mine.features[name], theirs.features[name], rtol=0,
                                       atol=1e-5 * float(np.abs(theirs.features[name]).max()))
    trainable = feature_extractor(weights=fixture_weights, layers=["P3"], trainable=True, imgsz=128).train()
    trainable.extract(frames[:1])
    assert trainable.training, "extract must restore the training mode it found"


def _readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Use it in your own PyTorch code\n(.*?)^## ", text, re.S | re.M)
    assert section, "README lost its 'Use it in your own PyTorch code' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert len(blocks) == 2
    return blocks


def test_the_readme_examples_run_as_written(fixture_weights, tmp_path, monkeypatch, capsys):
    """The README's code, unchanged, in a folder where ``yolov5s.pt`` is the fixture and ``street.jpg`` exists."""
    import cv2

    (tmp_path / "yolov5s.pt").symlink_to(fixture_weights)
    cv2.imwrite(str(tmp_path / "street.jpg"), np.random.default_rng(0).integers(0, 256, (96, 160, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    train, images = _readme_blocks()
    scope: dict = {}
    exec(compile(train, "README.md", "exec"), scope)
    assert scope["step"] == 2 and torch.isfinite(scope["loss"])
    assert list(scope["features"]) == ["P3", "P4", "P5"] and scope["backbone"].source == "yolov5s.pt"
    exec(compile(images, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "(64, 48, 80)" in out and "'pad_top'" in out and "(96, 160)" in out


def test_the_example_trains_a_head_on_the_fixture(fixture_weights, tmp_path, capsys):
    main = runpy.run_path(str(REPO / "examples" / "train_head.py"))["main"]
    out_file = tmp_path / "head.pt"
    main(["--weights", str(fixture_weights), "--steps", "3", "--imgsz", "64", "--batch", "2", "--out", str(out_file)])
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step ")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    saved = torch.load(out_file, weights_only=True)
    assert [f["name"] for f in saved["feature_info"]] == ["P3", "P4", "P5"] and saved["backbone"] is None
    assert saved["head"]["lateral.0.weight"].shape == (64, 64, 1, 1)
