"""Heatmaps of a layer's mean activation drawn over the frames, with the frame's boxes, for ``--viz`` (a video
file) and ``--show``.

The feature map covers the *model input* (the letterboxed frame), not the frame itself. A feature cell's centre
sits at model-input pixel ``(i + 0.5) * input_w / W - 0.5``; a model-input pixel maps to the frame by removing the
padding and undoing the resize: ``x = (x_in - pad_left) * original_width / resized_width``. Both steps are affine,
so one ``cv2.warpAffine`` resamples the map straight onto the frame's pixel grid, and the hot spots line up with
the picture whatever the padding.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .results import Detections, FeatureResult

#: Video container → FourCC that this project's OpenCV (FFmpeg backend) can write.
FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}


def activation_map(feature: np.ndarray) -> np.ndarray:
    """Mean over channels of a (C, H, W) feature map, as float32 (H, W)."""
    if feature.ndim != 3:
        raise ValueError(f"a heatmap needs a (C, H, W) feature map, got shape {feature.shape} (pooled features "
                         "have no spatial extent: stream with pooling 'none')")
    return feature.astype(np.float32, copy=False).mean(axis=0)


def map_to_frame(fmap: np.ndarray, letterbox: dict[str, Any]) -> np.ndarray:
    """Resample an (H, W) map over the model input onto the original frame's (height, width) pixel grid."""
    h, w = fmap.shape
    sx = letterbox["input_width"] / w  # model-input pixels per feature cell
    sy = letterbox["input_height"] / h
    rx = letterbox["resized_width"] / letterbox["original_width"]  # model-input pixels per frame pixel
    ry = letterbox["resized_height"] / letterbox["original_height"]
    # frame pixel centre x -> model-input coordinate (x + 0.5) * rx - 0.5 + pad_left -> cell (x_in + 0.5) / sx - 0.5
    to_cells = np.array([[rx / sx, 0.0, (0.5 * rx + letterbox["pad_left"]) / sx - 0.5],
                         [0.0, ry / sy, (0.5 * ry + letterbox["pad_top"]) / sy - 0.5]])
    size = (int(letterbox["original_width"]), int(letterbox["original_height"]))
    return cv2.warpAffine(np.ascontiguousarray(fmap, dtype=np.float32), to_cells, size,
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` (BGR) with ``heat`` (same height and width, any range) drawn over it in the JET colour map."""
    lo, hi = float(heat.min()), float(heat.max())
    scaled = np.zeros(heat.shape, np.uint8) if hi <= lo else ((heat - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    colour = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)
    base = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(colour, alpha, base, 1.0 - alpha, 0.0)


def render(result: FeatureResult, layer: str, image: np.ndarray) -> np.ndarray:
    """The frame with the heatmap of ``layer`` over it; frames without features are drawn plain and labelled."""
    if result.ok and layer in result.features and result.letterbox is not None:
        out = overlay(image, map_to_frame(activation_map(result.features[layer]), result.letterbox))
        label = f"{layer}  frame {result.frame_id}"
    else:
        out = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        label = f"frame {result.frame_id}: {result.status}"
    if result.ok and result.detections is not None:
        draw_boxes(out, result.detections)
    cv2.putText(out, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def box_colour(key: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour for a class id (or box or track id)."""
    hue = (key * 47) % 180
    bgr = cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def draw_boxes(image: np.ndarray, detections: Detections) -> np.ndarray:
    """Draw ``detections`` on ``image`` in place: a rectangle per box, labelled with the class name (or id) and
    score for detections, the box id for client boxes; on a tracked stream the track id, in a colour per track (a
    box without a track in grey). Returns ``image``."""
    for k, box in enumerate(detections.boxes):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        if detections.track_ids is not None:
            key = int(detections.track_ids[k])
            label = f"#{key}" if key else ""
            colour = box_colour(key) if key else (160, 160, 160)
        elif detections.classes is not None:
            key = int(detections.classes[k])
            name = detections.names[k] if detections.names is not None else str(key)
            label = f"{name} {float(detections.scores[k]):.2f}"
            colour = box_colour(key)
        else:
            key = int(detections.box_ids[k]) if detections.box_ids is not None else k
            label = f"id {key}" if detections.box_ids is not None else ""
            colour = box_colour(key)
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, 2, cv2.LINE_AA)
        if label:
            cv2.putText(image, label, (x1 + 2, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                        cv2.LINE_AA)
    return image


class VideoSink:
    """Writes BGR frames to a video file, opened at the first frame (its size is not known before)."""

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in FOURCC:
            raise ValueError(f"--viz {self.path}: unsupported container {suffix or '(none)'}; "
                             f"use one of {', '.join(FOURCC)}")
        self.fps = fps
        self.frames = 0
        self.size: tuple[int, int] | None = None
        self._writer: cv2.VideoWriter | None = None
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--viz {self.path}: folder {self.path.parent} does not exist")

    def write(self, frame: np.ndarray) -> None:
        h, w = frame.shape[:2]
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*FOURCC[self.path.suffix.lower()]),
                                           self.fps, (w, h))
            if not self._writer.isOpened():
                raise OSError(f"cannot write video {self.path}: this OpenCV build has no encoder for "
                              f"{self.path.suffix}; try .avi (MJPG)")
            self.size = (w, h)
        elif (w, h) != self.size:
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(frame)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None


def display_problem() -> str | None:
    """Why ``--show`` cannot open a window here (None when it can)."""
    gui = next((line.split(":", 1)[1].strip() for line in cv2.getBuildInformation().splitlines()
                if line.strip().startswith("GUI:")), "")
    if gui.upper() == "NONE":
        return ("--show needs an OpenCV build with a GUI backend; this one is headless (install opencv-python "
                "instead of opencv-python-headless), use --viz OUT.mp4 to write the heatmaps to a file")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "--show needs a display, and neither DISPLAY nor WAYLAND_DISPLAY is set; use --viz OUT.mp4 instead"
    return None


class Window:
    """An OpenCV window showing frames as they come; ``show`` returns False once the user pressed q or Esc."""

    def __init__(self, title: str = "yolostream") -> None:
        problem = display_problem()
        if problem:
            raise RuntimeError(problem)
        self.title = title
        cv2.namedWindow(title, cv2.WINDOW_NORMAL)

    def show(self, frame: np.ndarray) -> bool:
        cv2.imshow(self.title, frame)
        return (cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self) -> None:
        cv2.destroyWindow(self.title)
