"""``yolostream export``: the served truncated graph as ONNX and TorchScript files, against upstream's layer outputs,
with named outputs, metadata, dynamic axes, Detect's decoded output, the parity check and one-line refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fixture_path, torch_threads
from yolostream.server import cli
from yolostream.server.offline import export as export_module
from yolostream.server.offline.export import read_metadata, run_onnx, run_torchscript

pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'yolostream[onnx]') is not installed")

REL_TOL = 1e-4
#: yolov5n's named layers (see test_feature_extractor.py).
LAYERS = {"backbone": 9, "P3": 17, "P4": 20, "P5": 23}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine a second one mostly waits for a core."""
    with torch_threads(1):
        yield


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``yolostream ARGS`` in this process; (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def export(capsys, out: Path, *args: str, weights: Path | None = None) -> Path:
    source = ["--weights", str(weights)] if weights else []
    code, stdout, stderr = run_cli(capsys, "export", *source, "--device", "cpu", "--out", str(out), *args)
    assert code == 0, stderr
    assert f"wrote {out}" in stdout and "parity" in stdout
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_upstream_with_named_outputs_and_metadata(capsys, tmp_path, expected, fixture_weights, fmt):
    path = export(capsys, tmp_path / f"yolov5n.{fmt}", "--layers", "backbone,P3,P4,P5", "--imgsz", "256,320",
                  "--batch", "2", "--format", fmt, weights=fixture_weights)
    x = expected["input"]
    got = run_onnx(path, x) if fmt == "onnx" else run_torchscript(path, torch.from_numpy(x))
    assert list(got) == list(LAYERS)
    for name, index in LAYERS.items():
        want = expected[f"layer_{index}"]
        assert got[name].shape == want.shape, name
        assert relative_error(got[name], want) <= REL_TOL, name

    meta = read_metadata(path)
    assert meta["model"] == "yolov5n" and meta["random_weights"] is False and meta["source"].endswith("yolov5n.pt")
    assert meta["stride"] == 32 and meta["strides"] == {"backbone": 32, "P3": 8, "P4": 16, "P5": 32}
    assert [(row["name"], row["index"], row["stride"]) for row in meta["outputs"]] == [
        ("backbone", 9, 32), ("P3", 17, 8), ("P4", 20, 16), ("P5", 23, 32)]
    assert meta["outputs"][0]["shape"] == [256, 8, 10] and meta["outputs"][0]["aliases"] == ["backbone", "C5"]
    assert meta["input"] == {"name": "images", "shape": [2, 3, 256, 320], "dtype": "float32",
                             "layout": "NCHW, RGB, float in [0, 1] (uint8 / 255)"}
    assert meta["imgsz"] == 320 and meta["input_hw"] == [256, 320]
    assert meta["letterbox"] == "square" and meta["dynamic"] == "none" and meta["format"] == fmt
    if fmt == "onnx":
        import onnx

        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == ["images"]
        assert [o.name for o in model.graph.output] == list(LAYERS)
        assert all(p.key.startswith("yolostream.") for p in model.metadata_props)


def test_the_deepest_requested_layer_is_the_last_computed(capsys, tmp_path, fixture_weights):
    """``backbone`` alone: the file holds layers 0..9 and nothing of the neck (no node of layer 10 or later)."""
    import onnx

    path = export(capsys, tmp_path / "backbone.onnx", "--imgsz", "64", weights=fixture_weights)
    model = onnx.load(str(path))
    layers = {int(part.split(".")[1]) for node in model.graph.node for part in node.name.split("/")
              if part.startswith("model.") and part.split(".")[1].isdigit()}
    assert layers and max(layers) == 9, sorted(layers)


def test_dynamic_batch_and_dynamic_size(capsys, tmp_path, fixture_weights):
    batch = export(capsys, tmp_path / "batch.onnx", "--layers", "backbone,P3", "--imgsz", "64", "--dynamic",
                   weights=fixture_weights)
    size = export(capsys, tmp_path / "size.onnx", "--layers", "backbone,P3", "--imgsz", "128", "--dynamic", "shape",
                  weights=fixture_weights)
    from yolostream.server.model.loader import load_model
    from yolostream.server.device.engine import DeviceRunner

    engine = DeviceRunner(load_model(fixture_weights), device="cpu")
    rng = np.random.default_rng(3)
    assert read_metadata(batch)["input"]["shape"] == ["batch", 3, 64, 64]
    meta = read_metadata(size)
    assert meta["input"]["shape"] == ["batch", 3, "height", "width"] and meta["letterbox"] == "auto"
    cases = [(batch, (1, 64, 64)), (batch, (3, 64, 64)), (size, (2, 96, 128)), (size, (1, 128, 96))]
    for path, (n, h, w) in cases:
        x = (rng.integers(0, 256, (n, 3, h, w)).astype(np.float32) / 255)
        got = run_onnx(path, x)
        want = engine.forward(torch.from_numpy(x), [9, 17])
        for name, index in (("backbone", 9), ("P3", 17)):
            assert got[name].shape == tuple(want[index].shape), (path.name, n, h, w, name)
            assert relative_error(got[name], want[index].numpy()) <= REL_TOL, (path.name, n, h, w, name)


def test_detect_adds_the_decoded_output(capsys, tmp_path, expected, fixture_weights):
    """``--detect``: the output ``detect`` is upstream's decoded ``pred`` (the fused model's rows in the fixture)."""
    path = export(capsys, tmp_path / "detect.onnx", "--layers", "P3", "--detect", "--imgsz", "256,320", "--batch", "2",
                  weights=fixture_weights)
    got = run_onnx(path, expected["input"])
    assert list(got) == ["P3", "detect"]
    with np.load(fixture_path("yolov5n.detections.npz")) as data:
        rows, where = data["tensor|fused|pred_rows"], data["tensor|fused|pred_rows_bi"]
    pred = got["detect"]
    assert pred.shape == (2, 3 * (32 * 40 + 16 * 20 + 8 * 10), 85)
    assert relative_error(pred[where[:, 0], where[:, 1]], rows) <= REL_TOL
    meta = read_metadata(path)
    assert meta["strides"]["detect"] == [8, 16, 32] and meta["outputs"][-1]["name"] == "detect"


def one_line_error(capsys, *args: str) -> str:
    code, _, err = run_cli(capsys, "export", "--device", "cpu", *args)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("yolostream export: error: "), err
    return lines[0]


def test_refusals_are_one_line(capsys, tmp_path):
    out = str(tmp_path / "x.onnx")
    line = one_line_error(capsys, "--imgsz", "64", "--layers", "backbone,P9", "--out", out)
    assert "unknown layer 'P9'" in line and "valid layers" in line
    line = one_line_error(capsys, "--imgsz", "64", "--layers", "P3,24", "--out", out)
    assert "Detect head" in line and "--detect" in line
    assert "--half needs CUDA" in one_line_error(capsys, "--imgsz", "64", "--half", "--out", out)
    assert "--dynamic shape" in one_line_error(capsys, "--imgsz", "64", "--letterbox", "auto", "--out", out)
    assert not Path(out).exists()


def test_a_failed_parity_check_fails_the_export_and_leaves_no_file(capsys, tmp_path, monkeypatch):
    """The exported file's outputs 1 % of their scale away from the engine's, 100x the fp32 tolerance: exit 2,
    one line naming each output, no file. (An error just past the tolerance would land on either side of it.)"""
    run = export_module.run_onnx

    def off(*args, **kwargs):
        return {name: value * (1 + 1e-2) for name, value in run(*args, **kwargs).items()}

    monkeypatch.setattr(export_module, "run_onnx", off)
    out = tmp_path / "bad.onnx"
    line = one_line_error(capsys, "--imgsz", "64", "--layers", "backbone,P3", "--out", str(out))
    assert "parity check failed" in line
    reported = {name: float(value) for name, value in re.findall(r"\b(backbone|P3) ([0-9.]+e[-+][0-9]+)", line)}
    assert set(reported) == {"backbone", "P3"} and all(5e-3 < err < 2e-2 for err in reported.values())
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_model_onnxruntime_cannot_load_is_a_one_line_user_error():
    from yolostream.server.common.errors import UserError

    with pytest.raises(UserError, match="onnxruntime cannot run this model on cpu: ") as caught:
        run_onnx(b"not an onnx model", np.zeros((1, 3, 32, 32), np.float32))
    assert "\n" not in str(caught.value)
