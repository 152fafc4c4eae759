"""``make demo``: a server on the built-in default and a client streaming a generated clip to it, no downloads.

Starts a feature server in this process (built-in yolov5n with random weights, imgsz 320, CUDA when present),
writes a short clip of moving shapes, streams it through the client exactly as ``yolostream stream`` does (same
code path: ``cli.main(["stream", ...])``), saving the features and a heatmap video, prints a per-frame summary of
the saved features, then streams it again with the shapes' own boxes as client boxes and ``--track`` (the demo
model has random weights, so it detects nothing real), prints each frame's track ids and writes a video of the
tracks, and stops the server cleanly.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from yolostream.v1.vocab import input_to_frame

from . import cli

OUT = Path("demo-out")
IMGSZ = 320
FRAMES, FPS, WIDTH, HEIGHT = 36, 12.0, 320, 240
LAYERS = ("backbone", "P3", "P4", "P5")


def video_suffix() -> tuple[str, str]:
    """The container and FourCC this OpenCV build can write: MP4 (mp4v) when it has the encoder, else AVI."""
    probe = OUT / ".probe.mp4"
    writer = cv2.VideoWriter(str(probe), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (32, 32))
    ok = writer.isOpened()
    writer.release()
    probe.unlink(missing_ok=True)
    return (".mp4", "mp4v") if ok else (".avi", "MJPG")


def shapes_at(i: int) -> tuple[tuple[int, int, int], tuple[int, int, int, int]]:
    """Frame ``i``'s disc (cx, cy, radius) and square (x1, y1, x2, y2): they cross each other's paths."""
    t = i / FRAMES
    return (int(40 + 240 * t), int(120 + 60 * np.sin(2 * np.pi * t)), 32), (int(250 - 180 * t), 30,
                                                                          int(300 - 180 * t), 80)


def make_clip(path: Path, fourcc: str) -> Path:
    """A deterministic clip: a disc and a square crossing a gradient, so the demo needs no files."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    background = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write {path}")
    for i in range(FRAMES):
        frame = background.copy()
        (cx, cy, r), (x1, y1, x2, y2) = shapes_at(i)
        cv2.circle(frame, (cx, cy), r, (40, 200, 240), -1)
        cv2.rectangle(frame, (x1, y1), (x2, y2), (220, 60, 60), -1)
        cv2.line(frame, (0, 215), (WIDTH, 200), (255, 255, 255), 5)
        writer.write(frame)
    writer.release()
    return path


def write_boxes(path: Path) -> Path:
    """The shapes' own boxes, one CSV line per shape and frame (``stream --boxes``'s format)."""
    lines = []
    for i in range(FRAMES):
        (cx, cy, r), square = shapes_at(i)
        lines += [f"{i},{cx - r},{cy - r},{cx + r},{cy + r}", f"{i},{','.join(map(str, square))}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def print_tracks(save: Path) -> None:
    """Each frame's boxes with their track ids, read back from the save's objects.track_id column."""
    from yolostream.client import load_features

    saved = load_features(save)
    ids, frames = saved.objects["track_id"], saved.objects["frame"]
    print(f"\n== {save}: track ids per frame (0: not confirmed yet), epoch {saved.frames[0].get('track_epoch')}\n")
    for k, meta in enumerate(saved.frames):
        print(f"  frame {meta['frame_id']:>3}: " + " ".join(f"#{int(t)}" for t in ids[frames == k]))


def print_features(save: Path) -> None:
    """Per-frame and per-layer summary of what the stream saved, read back lazily with load_features."""
    from yolostream.client import load_features

    saved = load_features(save)
    print(f"\n== {save}: read back with yolostream.client.load_features\n")
    for name, array in saved.features.items():
        print(f"  {name:<9} {str(array.shape):<20} {array.dtype}  {saved.meta['layers'][name]['file']}")
    names = list(saved.features)
    print("\n  frame  time s  batch  latency ms  " + "  ".join(f"{n + ' mean':>13}" for n in names)
          + "  P3 peak (x, y) in the frame")
    for meta in saved.frames:
        if meta["row"] is None:
            print(f"  {meta['frame_id']:>5}  {meta['status']}: {meta['error']}")
            continue
        means = "  ".join(f"{float(saved[n][meta['row']].mean()):>+13.4f}" for n in names)
        peak = ""
        if "P3" in saved.features:
            fmap = np.asarray(saved["P3"][meta["row"]]).mean(axis=0)
            cy, cx = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
            lb, stride = meta["letterbox"], saved.meta["layers"]["P3"]["stride"]
            px, py = input_to_frame([(cx + 0.5) * stride, (cy + 0.5) * stride], lb)
            peak = f"  ({px:5.0f}, {py:5.0f})"
        print(f"  {meta['frame_id']:>5}  {meta['timestamp']:6.2f}  {meta['batch_size']:>5}  "
              f"{meta['latency_s'] * 1000:>10.1f}  {means}{peak}")


def main() -> int:
    from .device.engine import DeviceRunner
    from .common.settings import ServerSettings
    from .serve.in_process import ServerThread
    from .model.loader import load_model

    OUT.mkdir(parents=True, exist_ok=True)
    suffix, fourcc = video_suffix()
    clip = make_clip(OUT / f"shapes{suffix}", fourcc)
    save, heatmap = OUT / "features", OUT / f"heatmap{suffix}"
    shutil.rmtree(save, ignore_errors=True)
    engine = DeviceRunner(load_model(), device="auto", imgsz=IMGSZ)
    with ServerThread(engine, ServerSettings(port=0)) as server:
        print(f"== server: built-in {engine.name} (random weights) on {engine.device}, imgsz {IMGSZ}, "
              f"listening on {server.address}\n", flush=True)
        print(f"== yolostream info --server {server.address}\n", flush=True)
        if cli.main(["info", "--server", server.address]):
            return 1
        args = ["stream", str(clip), "--server", server.address, "--layers", ",".join(LAYERS), "--save", str(save),
                "--viz", str(heatmap), "--viz-layer", "P3"]
        print(f"\n== yolostream {' '.join(args)}\n", flush=True)
        code = cli.main(args)
        if code:
            return code
        print_features(save)
        tracks, tracked = OUT / "tracks", OUT / f"tracks{suffix}"
        shutil.rmtree(tracks, ignore_errors=True)
        args = ["stream", str(clip), "--server", server.address, "--layers", "P3",
                "--boxes", str(write_boxes(OUT / "boxes.csv")), "--track", "--save", str(tracks), "--viz", str(tracked)]
        print(f"\n== yolostream {' '.join(args)}\n", flush=True)
        code = cli.main(args)
        if code:
            return code
        print_tracks(tracks)
    print(f"\n== server stopped; clip {clip}, heatmap video {heatmap}, features {save}/, tracks {tracked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
