"""The feature extractor as a new user meets it: outputs keyed by what was asked for (``out[9]`` after
``layers=[9, 17]``), and one clear error, naming the rule, for a wrong input, a missing GPU and a cell or output that
does not exist — instead of a KeyError, a dtype error from a convolution, "Sizes of tensors must match", or a
silently misaligned map. The checks must not cost tracing, ``torch.export`` or ``torch.compile`` anything."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from conftest import torch_threads
from yolostream.server import FeatureExtractor, feature_extractor

#: yolov5n: SPPF is 9, the neck's P3 output 17, the C3 at stride 8 layer 4.
P3, SPPF, C3 = 17, 9, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: this machine's cores are shared, and one thread keeps every forward short."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def by_int(fixture_weights) -> FeatureExtractor:
    return feature_extractor(weights=fixture_weights, layers=[SPPF, P3])


@pytest.fixture(scope="module")
def mixed(fixture_weights) -> FeatureExtractor:
    return feature_extractor(weights=fixture_weights, layers=[P3, "P3", "backbone", np.int64(SPPF)])


@pytest.fixture(scope="module")
def by_name(fixture_weights) -> FeatureExtractor:
    return feature_extractor(weights=fixture_weights, layers=["9", "P3"])


def _image(height: int = 64, width: int = 96, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


# Keys of the outputs.


def test_int_layers_give_int_keys_and_out_9_works(by_int):
    with torch.no_grad():
        out = by_int(_image())
    assert list(out) == [SPPF, P3] and all(type(k) is int for k in out)
    assert out[9].shape == (2, 256, 2, 3) and out[17].shape == (2, 64, 8, 12)
    assert by_int.feature_info.names() == [9, 17]
    assert by_int.by_index(_image()).keys() == {9, 17}


def test_names_keep_str_keys_and_mixed_requests_keep_each_type(by_name, mixed):
    x = _image()
    with torch.no_grad():
        named, both = by_name(x), mixed(x)
    assert list(named) == ["9", "P3"] and all(type(k) is str for k in named)
    assert list(both) == [17, "P3", "backbone", 9]
    assert [type(k) for k in both] == [int, str, str, int], "a numpy integer is an int key too"
    assert torch.equal(both[17], both["P3"]) and torch.equal(both[9], named["9"])
    assert mixed.feature_info.names() == [17, "P3", "backbone", 9]
    assert all(torch.equal(both[f.name], both[f.index]) for f in mixed.feature_info)


def test_extract_results_are_keyed_and_mapped_by_the_same_keys(by_int):
    frame = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    result = by_int.extract([frame], imgsz=128)[0]
    assert list(result.features) == [9, 17] and result.strides == {9: 32, 17: 8}
    np.testing.assert_array_equal(result.cell_to_original(17, 1, 2), result.letterbox.cell_to_original(1, 2, 8))


def test_int_keyed_results_write_the_extract_format(by_int, tmp_path):
    """.npz keys are strings: an int-keyed result is written under the decimal name, as ``extract`` writes it."""
    from yolostream.server.offline.extract import write_npz

    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    result = by_int.extract([frame], imgsz=64)[0]
    write_npz(tmp_path / "f.npz", result, 0, "yolov5n", False)
    with np.load(tmp_path / "f.npz") as saved:
        np.testing.assert_array_equal(saved["9"], result.features[9])
        np.testing.assert_array_equal(saved["17"], result.features[17])


def test_export_and_compile_keep_int_and_mixed_keys(mixed):
    x = _image()
    with torch.no_grad():
        want = mixed(x)
        exported = mixed.export(x).module()(x)
        torch._dynamo.reset()
        compiled = torch.compile(mixed, fullgraph=True, backend="eager")(x)
    assert [type(k) for k in want] == [int, str, str, int]
    for got in (exported, compiled):
        assert list(got) == list(want) and [type(k) for k in got] == [int, str, str, int]
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_trace_needs_str_keys_and_says_how_to_get_them(by_int, by_name):
    x = _image()
    with pytest.raises(TypeError, match=re.escape("layers=['9', '17']")):
        torch.jit.trace(by_int, x, strict=False, check_trace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(by_name, x, strict=False, check_trace=False)
    with torch.no_grad():
        got, want = traced(x[:1].clone()), by_name(x[:1].clone())
    assert list(got) == ["9", "P3"] and all(torch.equal(got[k], want[k]) for k in want)


# The input rules.

RULE = "float RGB in [0, 1] shaped (N, 3, H, W), H and W multiples of 32"


@pytest.mark.parametrize("height, width", [(250, 320), (100, 100), (64, 16)])
def test_sides_that_are_not_a_multiple_of_the_stride_are_refused_with_the_stride(by_name, height, width):
    with pytest.raises(ValueError, match=re.escape(RULE)) as caught:
        by_name(_image(height, width, batch=1))
    assert f"got {height}x{width}" in str(caught.value) and "Sizes of tensors" not in str(caught.value)


def test_integer_and_wrong_float_dtypes_are_refused_with_the_conversion(by_name):
    with pytest.raises(TypeError, match=re.escape(RULE)) as caught:
        by_name((_image() * 255).to(torch.uint8))
    assert "torch.uint8" in str(caught.value) and "x.float() / 255" in str(caught.value)
    with pytest.raises(TypeError, match=r"input is torch\.float64 but the weights are torch\.float32"):
        by_name(_image().double())


def test_wrong_ranks_channels_and_non_tensors_are_refused(by_name):
    with pytest.raises(ValueError, match=r"got shape \(3, 64, 96\): add the batch dimension"):
        by_name(_image(batch=1)[0])
    with pytest.raises(ValueError, match=re.escape(RULE) + r"; got shape \(1, 4, 64, 96\)"):
        by_name(torch.rand(1, 4, 64, 96))
    with pytest.raises(TypeError, match=r"got a ndarray, not a torch\.Tensor"):
        by_name(np.zeros((1, 3, 64, 96), np.float32))


def test_the_stride_is_that_of_the_deepest_layer_that_runs(fixture_weights):
    """Layer 4 (stride 8) needs only multiples of 8, and its map is then exactly H/8 × W/8."""
    shallow = feature_extractor(weights=fixture_weights, layers=[C3])
    assert shallow.input_stride == 8
    with torch.no_grad():
        assert shallow(_image(200, 200, batch=1))[C3].shape == (1, 64, 25, 25)
    with pytest.raises(ValueError, match="multiples of 8; got 100x100"):
        shallow(_image(100, 100, batch=1))


def test_a_compiled_extractor_raises_the_same_error_for_a_bad_input(by_name):
    torch._dynamo.reset()
    compiled = torch.compile(by_name, backend="eager")
    with torch.no_grad():
        compiled(_image())
        with pytest.raises(ValueError, match=re.escape(RULE)):
            compiled(_image(250, 320, batch=1))


# Device and cells.


def test_cuda_without_cuda_is_a_clear_error_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="device=cuda was requested but torch sees no CUDA device"):
            feature_extractor(weights="no-such-file.pt", device=device)
    assert next(feature_extractor(layers=[C3], device="auto").parameters()).device.type == "cpu"


@pytest.fixture(scope="module")
def one_result(by_name):
    frame = np.random.default_rng(1).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    return by_name.extract([frame], imgsz=128)[0]


def test_cell_to_original_names_the_outputs_it_holds_for_an_unknown_one(one_result):
    with pytest.raises(ValueError, match=r"no output 'P4' in this result: it holds '9', 'P3'"):
        one_result.cell_to_original("P4", 0, 0)
    with pytest.raises(ValueError, match=r"no output 9 in this result"):
        one_result.cell_to_original(9, 0, 0)


def test_cell_to_original_refuses_cells_outside_the_map_with_the_valid_range(one_result):
    height, width = one_result.features["P3"].shape[1:]
    assert (height, width) == (12, 16)
    last = one_result.cell_to_original("P3", height - 1, width - 1, clip=False)
    assert last[2] > last[0] and last[3] > last[1]
    for row, col in ((height, 0), (0, width), (-1, 0), (0, -1)):
        with pytest.raises(IndexError, match=r"valid cells are rows 0\.\.11 and columns 0\.\.15"):
            one_result.cell_to_original("P3", row, col)
    with pytest.raises(TypeError, match="row must be an integer"):
        one_result.cell_to_original("P3", 1.5, 0)
