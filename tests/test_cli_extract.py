"""The ``layers`` and ``extract`` commands, through their public entry point."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from yolostream.server import cli
from yolostream.server.device.engine import DeviceRunner
from yolostream.server.model.loader import WeightsMismatchError, load_model

from conftest import cpu_runner, engine_extract


def _image(path, h=120, w=160, seed=0):
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.imwrite(str(path), frame)
    return frame


def test_layers_json_describes_the_default_model(capsys):
    assert cli.main(["layers", "--imgsz", "320", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "yolov5n" and doc["random_weights"] is True and doc["input_hw"] == [320, 320]
    rows = {r["index"]: r for r in doc["layers"]}
    assert rows[9]["aliases"] == ["backbone", "C5"] and rows[9]["shape"] == [256, 10, 10]
    assert rows[24]["role"] == "detect"


def test_layers_table_of_a_checkpoint(fixture_weights, capsys):
    assert cli.main(["layers", "--weights", str(fixture_weights), "--imgsz", "256"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" not in out and "SPPF" in out and "backbone C5" in out and "P3" in out


def test_extract_images_and_video(tmp_path, capsys):
    frame = _image(tmp_path / "a.png")
    _image(tmp_path / "b.jpg", 90, 200, seed=1)
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    for k in range(5):
        writer.write(np.full((64, 96, 3), 40 * k, np.uint8))
    writer.release()
    out = tmp_path / "out"
    rc = cli.main(["extract", "--imgsz", "128", "--device", "cpu", "--backend", "torch", "--layers", "backbone,P3,4",
                   "--batch", "2", "--max-frames", "3", "--out", str(out), str(tmp_path / "a.png"),
                   str(tmp_path / "b.jpg"), str(video)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.npz", "b.npz", "clip_000000.npz", "clip_000001.npz",
                                                     "clip_000002.npz"]
    assert "RANDOM WEIGHTS" in capsys.readouterr().err
    with np.load(out / "a.npz") as data:
        assert data["backbone"].dtype == np.float32 and data["backbone"].shape == (256, 3, 4)
        assert data["P3"].shape == (64, 12, 16) and data["4"].shape == (64, 12, 16)
        assert data["meta_orig_hw"].tolist() == [120, 160] and data["meta_input_hw"].tolist() == [96, 128]
        assert data["meta_pad"].tolist() == [0, 0, 0, 0] and bool(data["meta_random_weights"])
        saved = data["backbone"]
    engine = cpu_runner(128)
    direct = engine_extract(engine, [frame], ["backbone"])[0]
    np.testing.assert_array_equal(direct.features["backbone"], saved)
    with np.load(out / "clip_000002.npz") as data:
        assert int(data["meta_frame"]) == 2


def test_extract_batches_a_folder_of_images_and_keeps_their_order(tmp_path):
    from yolostream.server.offline.extract import run_extract
    from yolostream.server.offline.extractor import feature_extractor

    folder = tmp_path / "imgs"
    folder.mkdir()
    frames = [_image(folder / f"{k}.png", 64, 96 if k % 2 else 64, seed=k) for k in range(5)]
    extractor = feature_extractor(layers=["P4"], imgsz=128)
    batches: list[int] = []
    hook = extractor.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        written = run_extract(extractor, [folder], tmp_path / "o", batch=4)
    finally:
        hook.remove()
    assert [p.name for p in written] == [f"{k}.npz" for k in range(5)]
    assert sorted(batches) == [1, 2, 2], "4 images per chunk, each chunk split by letterboxed shape"
    for path, frame in zip(written, frames):
        with np.load(path) as data:
            alone = extractor.extract([frame])[0].features["P4"]  # batch 1: summation order differs from batch 2
            np.testing.assert_allclose(data["P4"], alone, rtol=0, atol=1e-5 * float(np.abs(alone).max()))
            assert data["meta_orig_hw"].tolist() == list(frame.shape[:2])


def test_extract_all_keys_every_feature_layer_by_index(tmp_path):
    _image(tmp_path / "x.png", 64, 64)
    assert cli.main(["extract", "--imgsz", "64", "--layers", "all", "--out", str(tmp_path / "o"),
                     str(tmp_path / "x.png")]) == 0
    with np.load(tmp_path / "o" / "x.npz") as data:
        assert sorted(k for k in data.files if not k.startswith("meta_")) == sorted(str(i) for i in range(24))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["layers", "--weights", "/nonexistent/w.pt"], "/nonexistent/w.pt"),
        (["layers", "--cfg", "yolov9z"], "yolov5n"),
        (["extract", "--layers", "P9", "--out", "{tmp}/o", "{tmp}/x.png"], "unknown layer 'P9'"),
        (["extract", "--out", "{tmp}/o", "{tmp}/missing.png"], "missing.png"),
        (["extract", "--half", "--device", "cpu", "--out", "{tmp}/o", "{tmp}/x.png"], "CUDA"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    _image(tmp_path / "x.png", 32, 32)
    rc = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("yolostream ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_random_weights_are_seeded_and_flagged():
    a, b = load_model(seed=3), load_model(seed=3)
    assert a.random_weights and "random" in a.source
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = load_model(seed=4)
    assert not torch.equal(a.model.model[0].conv.weight, c.model.model[0].conv.weight)


def test_random_weights_do_not_depend_on_the_thread_count():
    """A server and an offline extract load the same seeded model under different thread counts."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_model(seed=5).model.state_dict()
        torch.set_num_threads(2)
        two = load_model(seed=5).model.state_dict()
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_state_dict_plus_cfg_and_mismatch(tmp_path, fixture_weights):
    official = load_model(fixture_weights)
    sd_path = tmp_path / "sd.pt"
    torch.save(official.model.state_dict(), sd_path)
    again = load_model(sd_path, cfg="yolov5n")
    assert not again.random_weights
    x = torch.rand(1, 3, 64, 64)
    e1 = DeviceRunner(official, device="cpu", fuse=False)
    e2 = DeviceRunner(again, device="cpu", fuse=False)
    assert torch.equal(e1.forward(x, [9])[9], e2.forward(x, [9])[9])
    broken = dict(official.model.state_dict())
    del broken["model.0.conv.weight"]
    broken["model.99.extra"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pt")
    pattern = r"(?s)missing keys \(1\): model\.0\.conv\.weight.*unexpected keys \(1\): model\.99\.extra.*shape"
    with pytest.raises(WeightsMismatchError, match=pattern):
        load_model(tmp_path / "broken.pt", cfg="yolov5s")
