"""Safe loading of YOLOv5 checkpoints: the real release file, synthetic training files, and hostile pickles."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from yolostream.server.model.checkpoint import (
    CheckpointError,
    StubAttribute,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict_file,
)

# --------------------------------------------------------------------------------------------------------
# The shared release fixture


@pytest.fixture(scope="module")
def release(fixture_weights: Path):
    return load_checkpoint(fixture_weights)


def test_release_state_dict_matches_upstream_listing(release, layers_json):
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in release.state_dict.items()]
    assert len(got) == 349
    assert got == layers_json["state_dict"]


def test_release_metadata(release, layers_json, fixture_weights):
    assert release.path == fixture_weights
    assert release.yaml == layers_json["model_attributes"]["yaml"]
    assert release.source_key == "model"  # ema is present but None in release files
    assert release.nc == 80
    assert len(release.names) == 80 and release.names[0] == "person" and release.names[79] == "toothbrush"
    assert release.names_given
    assert release.info["kind"] == "release"
    assert release.info["epoch"] == -1
    assert release.info["model_type"] == "models.yolo.DetectionModel"
    assert release.info["git_commit"] == layers_json["upstream"]["commit"]


def test_release_activations_are_the_pickled_silu_of_every_conv(release):
    conv_paths = {k.removesuffix(".conv.weight") for k in release.state_dict if k.endswith(".conv.weight")}
    assert set(release.activations) == {f"{p}.act" for p in conv_paths}
    assert all(type(a) is nn.SiLU for a in release.activations.values())


# --------------------------------------------------------------------------------------------------------
# A stand-in for upstream's package, only present while the synthetic files are written


def _upstream_classes() -> dict[str, type]:
    class Conv(nn.Module):
        def __init__(self, c1: int, c2: int, act: nn.Module | None = None):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03)
            self.act = act if act is not None else nn.SiLU()

    class BottleneckCSP(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.cv1 = Conv(c, c)
            self.bn = nn.BatchNorm2d(2 * c)
            self.act = nn.LeakyReLU(0.1)

    class Detect(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.m = nn.ModuleList([nn.Conv2d(c, 18, 1)])
            self.register_buffer("anchors", torch.ones(1, 3, 2))
            self.stride = torch.tensor([8.0])

        def forward(self, x):
            return x

    class Segment(Detect):
        def __init__(self, c: int):
            super().__init__(c)
            self.detect = Detect.forward

    class DetectionModel(nn.Module):
        def __init__(self, head: type = Detect):
            super().__init__()
            self.model = nn.Sequential(Conv(3, 4, nn.Hardswish()), BottleneckCSP(4), head(4))
            self.yaml = {"nc": 1, "depth_multiple": 0.33, "width_multiple": 0.25, "backbone": [], "head": []}
            self.names = ["thing"]
            self.nc = 1

    for module, cls in (("models.common", Conv), ("models.common", BottleneckCSP), ("models.yolo", Detect),
                        ("models.yolo", Segment), ("models.yolo", DetectionModel)):
        cls.__module__, cls.__qualname__ = module, cls.__name__
    Detect.forward.__module__, Detect.forward.__qualname__ = "models.yolo", "Detect.forward"
    return {c.__name__: c for c in (Conv, BottleneckCSP, Detect, Segment, DetectionModel)}


class _WindowsPath:
    """Pickles as ``pathlib.WindowsPath`` (as a Windows-written file would) while pathlib is patched."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __reduce__(self):
        return type(self), self.parts


_WindowsPath.__module__, _WindowsPath.__qualname__, _WindowsPath.__name__ = "pathlib", "WindowsPath", "WindowsPath"


@pytest.fixture
def upstream(monkeypatch):
    """Yields a ``save(obj, path, **kw)`` that writes with upstream-named classes, and the classes; both are
    gone from ``sys.modules`` once the test body runs its loads (so no upstream code can be reached)."""
    classes = _upstream_classes()

    def save(obj, path: Path, **kwargs) -> Path:
        with monkeypatch.context() as m:
            for name, members in (("models.common", ("Conv", "BottleneckCSP")),
                                  ("models.yolo", ("Detect", "Segment", "DetectionModel"))):
                mod = types.ModuleType(name)
                for member in members:
                    setattr(mod, member, classes[member])
                m.setitem(sys.modules, name, mod)
            m.setitem(sys.modules, "models", types.ModuleType("models"))
            m.setattr(pathlib, "WindowsPath", _WindowsPath)
            with warnings.catch_warnings():
                # the legacy writer looks for our test classes' source code, which lives in a function
                warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
                torch.save(obj, path, **kwargs)
        assert "models.yolo" not in sys.modules
        return path

    return save, classes


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _training_ckpt(classes: dict) -> dict:
    model = _randomised(classes["DetectionModel"](), 1).half()
    ema = _randomised(classes["DetectionModel"](), 2).half().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return {
        "epoch": 7,
        "best_fitness": np.array([0.5]),
        "model": model,
        "ema": ema,
        "updates": 123,
        "optimizer": optimizer.state_dict(),
        "opt": {"save_dir": pathlib.PosixPath("runs/train/exp"), "weights": _WindowsPath("C:\\", "w", "best.pt")},
        "git": {"remote": "x", "branch": "master", "commit": "abc123"},
        "date": "2024-01-01T00:00:00",
    }


def _globals_in(path: Path) -> str:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(name).decode("latin-1")


def test_mid_training_file_prefers_ema(tmp_path, upstream):
    save, classes = upstream
    ckpt = _training_ckpt(classes)
    path = save(ckpt, tmp_path / "last.pt")
    loaded = load_checkpoint(path)
    assert loaded.source_key == "ema"
    expected = ckpt["ema"].state_dict()
    assert list(loaded.state_dict) == list(expected)
    for key, value in expected.items():
        assert loaded.state_dict[key].dtype == value.dtype
        assert torch.equal(loaded.state_dict[key], value), key
    differs = ckpt["model"].state_dict()["model.0.conv.weight"]
    assert not torch.equal(loaded.state_dict["model.0.conv.weight"], differs)
    assert loaded.info["kind"] == "training"
    assert loaded.info["best_fitness"] == 0.5
    assert loaded.info["updates"] == 123 and loaded.info["git_commit"] == "abc123"
    assert loaded.names == ["thing"] and loaded.nc == 1


def test_windows_path_and_numpy_fitness_load(tmp_path, upstream):
    save, classes = upstream
    path = save(_training_ckpt(classes), tmp_path / "win.pt")
    text = _globals_in(path)
    assert "pathlib\nWindowsPath" in text and "pathlib\nPosixPath" in text and "numpy" in text
    assert load_checkpoint(path).info["best_fitness"] == 0.5


def test_v4_style_dict_without_ema_and_pickled_activations(tmp_path, upstream):
    save, classes = upstream
    model = _randomised(classes["DetectionModel"](), 3).half().eval()
    ckpt = {"epoch": -1, "best_fitness": np.array([0.3]), "training_results": None, "model": model, "optimizer": None}
    loaded = load_checkpoint(save(ckpt, tmp_path / "v4.pt"))
    assert loaded.source_key == "model"
    assert loaded.info["kind"] == "release"
    assert torch.equal(loaded.state_dict["model.0.conv.weight"], model.state_dict()["model.0.conv.weight"])
    acts = loaded.activations
    assert set(acts) == {"model.0.act", "model.1.act", "model.1.cv1.act"}
    assert type(acts["model.0.act"]) is nn.Hardswish
    assert type(acts["model.1.act"]) is nn.LeakyReLU and acts["model.1.act"].negative_slope == 0.1
    assert "model.1.bn.running_var" in loaded.state_dict  # BottleneckCSP's own BN


def test_bare_model_object_loads(tmp_path, upstream):
    save, classes = upstream
    loaded = load_checkpoint(save(classes["DetectionModel"]().eval(), tmp_path / "bare.pt"))
    assert loaded.source_key == "model" and loaded.info["kind"] == "bare-model"
    assert loaded.yaml["nc"] == 1


@pytest.mark.parametrize("protocol", [2, 4])
def test_segment_reference_to_upstream_method_loads(tmp_path, upstream, protocol):
    """``Segment.detect = Detect.forward`` pickles as getattr(Detect, 'forward'), or a dotted name in protocol 4."""
    save, classes = upstream
    model = classes["DetectionModel"](classes["Segment"])
    path = save({"model": model, "ema": None}, tmp_path / "seg.pt", pickle_protocol=protocol)
    assert ("getattr" if protocol == 2 else "Detect.forward") in _globals_in(path)
    loaded = load_checkpoint(path)
    assert "model.2.anchors" in loaded.state_dict


def test_stub_getattr_result_is_not_callable():
    label = StubAttribute("models.yolo.Detect", "forward")
    assert not callable(label)


def test_legacy_format_with_numpy1_names_and_torch1_module_state(tmp_path, upstream, monkeypatch):
    """Old torch wrote the tar-less legacy stream, no newer nn.Module fields, and numpy-1 module paths."""
    save, classes = upstream
    newer = {"_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
             "_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_non_persistent_buffers_set",
             "_backward_pre_hooks", "_is_full_backward_hook", "inplace"}
    monkeypatch.setattr(nn.Module, "__getstate__",
                        lambda self: {k: v for k, v in self.__dict__.items() if k not in newer}, raising=False)
    ckpt = {"epoch": -1, "best_fitness": np.array([0.25]), "model": classes["DetectionModel"]().eval()}
    path = save(ckpt, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    monkeypatch.undo()
    raw = path.read_bytes()
    assert b"numpy._core.multiarray\n" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))

    loaded = load_checkpoint(path)
    assert loaded.info["best_fitness"] == 0.25
    assert len(loaded.state_dict) == len(ckpt["model"].state_dict())
    x = torch.randn(2, 3)
    assert torch.equal(loaded.activations["model.0.act"](x), nn.functional.hardswish(x))


# --------------------------------------------------------------------------------------------------------
# Hostile files: the payload must never run


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "system": _Payload(os.system, f"touch {marker}"),
        "eval": _Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        "Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("kind", ["system", "eval", "Popen"])
@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle", "torch-legacy"])
def test_malicious_globals_are_refused_before_running(tmp_path, kind, container):
    marker = tmp_path / "pwned"
    payload = {"epoch": 0, "model": _payloads(marker)[kind]}
    path = tmp_path / "evil.pt"
    if container == "torch-zip":
        torch.save(payload, path)
    elif container == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    assert kind in str(info.value) and str(path) in str(info.value)
    assert not marker.exists()


def test_getattr_on_anything_but_upstream_classes_is_refused(tmp_path):
    path = tmp_path / "getattr.pt"
    torch.save({"model": _Payload(getattr, collections.OrderedDict, "fromkeys")}, path)
    with pytest.raises(UnsafeCheckpointError, match="getattr") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("global_name", [
    b"models.common\n__builtins__", b"models.yolo\nDetect.__init__", b"models.tf\nTFDetect", b"os\nsystem",
    b"posix\nsystem", b"nt\nsystem", b"__builtin__\n__import__", b"builtins\nexec", b"torch\nload",
    b"pathlib\nPath",
])
def test_other_globals_are_refused(tmp_path, global_name):
    path = tmp_path / "global.pkl"
    path.write_bytes(b"\x80\x02c" + global_name + b"\n.")
    with pytest.raises(UnsafeCheckpointError, match=global_name.split(b"\n")[1].decode()):
        load_checkpoint(path)


def test_codecs_encode_is_limited_to_text_encodings(tmp_path):
    import codecs

    path = tmp_path / "codec.pt"
    torch.save({"model": _Payload(codecs.encode, "x", "zlib_codec")}, path)
    with pytest.raises(UnsafeCheckpointError, match="zlib_codec"):
        load_checkpoint(path)


# --------------------------------------------------------------------------------------------------------
# Plain state_dicts and unreadable files


def test_plain_state_dict_needs_cfg_but_loads_as_state_dict(tmp_path, release):
    sd = {k: v.clone() for k, v in list(release.state_dict.items())[:6]}
    for name, obj in (("plain", sd), ("wrapped", {"state_dict": sd}), ("model-wrapped", {"model": sd})):
        path = tmp_path / f"{name}.pt"
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match="plain state_dict.*--cfg"):
            load_checkpoint(path)
        loaded = load_state_dict_file(path)
        assert list(loaded) == list(sd)
        assert all(torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype for k in sd)


def test_full_checkpoint_is_not_a_plain_state_dict(fixture_weights):
    with pytest.raises(CheckpointError, match="not a plain state_dict.*without --cfg"):
        load_state_dict_file(fixture_weights)


def test_state_dict_file_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": _payloads(marker)["system"]}, path)
    with pytest.raises(CheckpointError, match="system"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    for loader in (load_checkpoint, load_state_dict_file):
        with pytest.raises(FileNotFoundError, match="nope.pt"):
            loader(missing)


@pytest.mark.parametrize("content", [b"this is not a checkpoint\n", b"", b"\x80\x02}q\x00."])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(path)


def test_zip_without_pickle_is_rejected(tmp_path):
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_loaded_model_reports_class_names_only_when_the_file_has_them(tmp_path, upstream, fixture_weights):
    from yolostream.server.model.loader import load_model

    names = load_model(fixture_weights).class_names
    assert len(names) == 80 and names[:2] == ["person", "bicycle"]
    assert load_model(cfg="yolov5n").class_names == []
    save, classes = upstream
    model = classes["DetectionModel"]().eval()
    del model.names
    loaded = load_checkpoint(save(model, tmp_path / "nameless.pt"))
    assert not loaded.names_given and loaded.names == ["0"]
