"""``yolostream stream`` and ``yolostream info`` end to end over a loopback server, through the real command."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolostream.client import load_features
from yolostream.client.stats import StatusLine, StreamStats, progress_bar
from yolostream.server import cli

from conftest import cpu_runner, in_process_server

IMGSZ = 64


@pytest.fixture(scope="module")
def server():
    with in_process_server(cpu_runner(IMGSZ), max_batch=8) as running:
        yield running


def write_video(path: Path, n: int, w: int = 96, h: int = 72, fps: float = 12.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for i in range(n):
        frame = np.full((h, w, 3), 40, np.uint8)
        cv2.circle(frame, (10 + 7 * i, h // 2), 9, (0, 220, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    n, size = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        n, size = n + 1, frame.shape[:2]
    cap.release()
    return n, size


def test_stream_saves_features_and_writes_the_heatmap_video(server, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", n=10)
    save, viz = tmp_path / "features", tmp_path / "heat.mp4"
    code = cli.main(["stream", str(video), "--server", server.address, "--layers", "P3,backbone", "--save", str(save),
                     "--viz", str(viz), "--viz-layer", "P3", "--encoding", "png"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "10 answered" in out and "10 ok, 0 dropped, 0 error(s)" in out and "p95" in out and "mean batch" in out
    assert "streaming video" in err and "12 fps, 10 frames" in err and "RANDOM WEIGHTS" in err
    assert "[########################] 10/10" in err  # the progress bar's last state (not a TTY: plain lines)
    assert count_frames(viz) == (10, (72, 96))
    saved = load_features(save)
    assert saved["P3"].shape[0] == 10 and saved["backbone"].shape[0] == 10
    assert [f["frame_id"] for f in saved.frames] == list(range(10))
    assert saved.meta["options"]["layers"] == ["P3", "backbone"] and saved.meta["model"]["name"] == "yolov5n"
    assert saved.meta["layers"]["P3"]["layer_index"] == 17 and saved.meta["layers"]["P3"]["stride"] == 8


def _images_extracted_offline(tmp_path: Path, count: int, seed: int, layers: str,
                              suffix: str = ".png") -> tuple[Path, Path]:
    """A folder of random images (PNG, or JPEG at OpenCV's default quality) and the folder ``yolostream extract``
    (batch 1) wrote their features to."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        cv2.imwrite(str(folder / f"img{i}{suffix}"), rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    offline = tmp_path / "offline"
    assert cli.main(["extract", "--imgsz", str(IMGSZ), "--device", "cpu", "--backend", "torch", "--batch", "1",
                     "--layers", layers,
                     "--out", str(offline), str(folder)]) == 0
    return folder, offline


@pytest.mark.parametrize("suffix, encoding", [(".png", "png"), (".png", "raw"), (".jpg", "jpeg")])
def test_a_folder_of_images_gives_the_features_of_yolostream_extract(server, tmp_path, capsys, suffix, encoding):
    """Lossless encodings, and JPEG files sent as their own bytes (re-encoding them would change the pixels)."""
    folder, offline = _images_extracted_offline(tmp_path, 4, 7, "backbone,P3", suffix)
    save = tmp_path / "streamed"
    assert cli.main(["stream", str(folder), "--server", server.address, "--layers", "backbone,P3", "--encoding",
                     encoding, "--max-in-flight", "1", "--save", str(save), "-q"]) == 0
    capsys.readouterr()
    saved = load_features(save)
    assert len(saved.frames) == 4
    for meta in saved.frames:
        assert meta["batch_size"] == 1  # one frame per forward on both sides: bit-identical
        with np.load(offline / f"{Path(meta['file']).stem}.npz") as want:
            for name in ("backbone", "P3"):
                np.testing.assert_array_equal(saved[name][meta["row"]], want[name])
            assert [meta["letterbox"]["pad_left"], meta["letterbox"]["pad_top"], meta["letterbox"]["pad_right"],
                    meta["letterbox"]["pad_bottom"]] == want["meta_pad"].tolist()


def test_frames_batched_together_stay_within_float_rounding(server, tmp_path, capsys):
    folder, offline = _images_extracted_offline(tmp_path, 8, 8, "P3")
    save = tmp_path / "streamed"
    assert cli.main(["stream", str(folder / "*.png"), "--server", server.address, "--layers", "P3", "--encoding",
                     "raw", "--max-in-flight", "8", "--save", str(save), "-q"]) == 0
    capsys.readouterr()
    saved = load_features(save)
    assert max(meta["batch_size"] for meta in saved.frames) > 1
    for meta in saved.frames:
        with np.load(offline / f"{Path(meta['file']).stem}.npz") as want:
            tol = 1e-4 * np.abs(want["P3"]).max()
            np.testing.assert_allclose(saved["P3"][meta["row"]], want["P3"], rtol=0, atol=tol)


def test_load_features_is_a_mapping_of_layer_to_array(server, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", n=3)
    assert cli.main(["stream", str(video), "--server", server.address, "--layers", "P3,backbone", "--save",
                     str(tmp_path / "s"), "-q"]) == 0
    capsys.readouterr()
    saved = load_features(tmp_path / "s")
    assert isinstance(saved, Mapping)
    assert "P3" in saved and "P4" not in saved and len(saved) == 2 and list(saved) == ["P3", "backbone"]
    as_dict = dict(saved)
    assert list(as_dict) == ["P3", "backbone"] and all(a.shape[0] == 3 for a in as_dict.values())
    assert [name for name, _ in saved.items()] == ["P3", "backbone"] and saved.get("P9") is None
    assert all(array is saved[name] for name, array in saved.items())


def test_info_prints_the_model_and_its_layer_table(server, capsys):
    assert cli.main(["info", "--server", server.address]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "model   yolov5n" in out and "RANDOM WEIGHTS" in out and "device  cpu" in out
    header = next(i for i, line in enumerate(lines) if line.startswith("idx"))
    table = lines[header + 1:]
    assert len(table) == 25
    assert table[9].split()[:3] == ["9", "8", "SPPF"] and table[9].split()[-2:] == ["backbone", "C5"]
    assert table[17].split()[-1] == "P3" and table[24].split()[2] == "Detect"
    assert cli.main(["info", "--server", server.address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model_name"] == "yolov5n" and len(doc["layers"]) == 25


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--layers", "P9"], "INVALID_ARGUMENT: unknown layer 'P9'"),
        (["--viz", "out.mp4", "--pool", "avg"], "--pool none"),
        (["--show"], "--show needs"),
        (["--viz-layer", "P3"], "--viz-layer chooses"),
        (["--layers", "P4", "--viz", "x.mp4", "--viz-layer", "P3"], "not one of --layers"),
        (["--quality", "0"], "--quality must be"),
        (["--viz", "heat.gif"], "unsupported container"),
        (["--imgsz", "0"], "--imgsz must be at least 32"),
    ],
    ids=["unknown-layer", "viz-pooled", "show-headless", "viz-layer-alone", "viz-layer-missing", "quality", "gif",
         "imgsz"],
)
def test_expected_errors_are_one_line_and_exit_2(server, tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    video = write_video(tmp_path / "clip.avi", n=3)
    code = cli.main(["stream", str(video), "--server", server.address, "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("yolostream stream: error:")]
    assert len(error_lines) == 1 and needle in error_lines[0]


def test_unreachable_server_missing_source_and_used_save_dir(tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", n=2)
    assert cli.main(["stream", str(video), "--server", "127.0.0.1:1", "--timeout", "10"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main(["info", "--server", "127.0.0.1:1", "--timeout", "10"]) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert cli.main(["stream", str(tmp_path / "nope.mp4")]) == 2
    assert "no such file, folder or camera" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "a.npy").write_bytes(b"")
    assert cli.main(["stream", str(video), "--server", "127.0.0.1:1", "--save", str(tmp_path / "used")]) == 2


def test_realtime_and_max_frames_from_the_command_line(server, tmp_path, capsys):
    video = write_video(tmp_path / "clip.avi", n=10)
    assert cli.main(["stream", str(video), "--server", server.address, "--layers", "P3", "--realtime",
                     "--max-frames", "6", "--pool", "max", "--save", str(tmp_path / "s"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "6 answered" in out
    saved = load_features(tmp_path / "s")
    statuses = [f["status"] for f in saved.frames]
    assert len(statuses) == 6 and set(statuses) <= {"ok", "dropped"}
    assert saved["P3"].shape == (statuses.count("ok"), 64)


def test_status_line_and_progress_bar():
    assert progress_bar(6, 20, width=10) == "[###.......] 6/20"
    assert progress_bar(0, 0, width=4) == "[####] 0/0"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    status = StatusLine(stream, interval=0.0)
    status.update(lambda: "a long first line")
    status.update(lambda: "short")
    status.finish(lambda: "done")
    assert stream.getvalue() == "\ra long first line\rshort" + " " * 12 + "\rdone " + "\n"
    stats = StreamStats(total=None)
    assert "0 frames" in stats.status_line() and "batch -" in stats.status_line()
