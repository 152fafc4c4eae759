"""Letterbox preprocessing identical to upstream YOLOv5's detect.py path (numpy + OpenCV, no torch).

Features are only comparable with upstream's if the model sees the very same pixels, so the geometry
(scale, rounding, padding split) and the resampling (cv2.INTER_LINEAR, constant 114 border) follow
upstream's rule exactly. The tensor side (uint8 -> float, /255) is left to the engine, on device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from yolostream.v1.vocab import LETTERBOX_POLICIES, cell_to_frame, input_to_frame

#: Border colour upstream pads with (all three channels).
PAD_VALUE = 114

#: Letterbox policies a stream may ask for: "auto" pads only to the next stride multiple (the minimal
#: rectangle, as detect.py does); "square" pads to the full imgsz target (auto=False).
POLICIES = tuple(LETTERBOX_POLICIES)
#: Largest imgsz a request may ask for (the API's limit, and the largest input the CUDA path stages).
MAX_IMGSZ = 4096


@dataclass(frozen=True)
class Letterbox:
    """Geometry of one letterbox operation, enough to map model-input pixels back to the frame.

    Sizes are (height, width). ``ratio`` is upstream's scale factor ``r`` per axis (rw, rh); it is the
    same on both axes here. The padding is what was actually applied, so
    ``out_hw == (resized_h + pad_top + pad_bottom, resized_w + pad_left + pad_right)``.
    """

    ratio: tuple[float, float]
    pad_left: int
    pad_top: int
    pad_right: int
    pad_bottom: int
    orig_hw: tuple[int, int]
    out_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """The (sx, sy) scale cv2 actually applied: resized size / original size.

        It differs from ``ratio`` only by the rounding of the resized size to whole pixels; using it for
        back-mapping sends the edges of the resized content exactly onto the frame's edges.
        """
        return (
            self.resized_hw[1] / self.orig_hw[1],
            self.resized_hw[0] / self.orig_hw[0],
        )

    def to_original(self, points: Any) -> np.ndarray:
        """Map (..., 2) x/y points in model-input pixels to original-frame pixels (float64); nothing is clipped.

        The formula is the wire's (``yolostream.v1.vocab.input_to_frame``), which clients use too.
        """
        return input_to_frame(points, self.as_dict())

    def box_to_original(self, boxes: Any, clip: bool = True) -> np.ndarray:
        """Map (..., 4) x1/y1/x2/y2 boxes in model-input pixels to original-frame pixels (float64).

        With ``clip`` the result is limited to the frame, so a box lying partly in the padding keeps only
        the part that shows the image.
        """
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.ndim == 0 or arr.shape[-1] != 4:
            raise ValueError(f"boxes must have shape (..., 4), got {arr.shape}")
        out = self.to_original(arr.reshape(*arr.shape[:-1], 2, 2)).reshape(arr.shape)
        if clip:
            h, w = self.orig_hw
            np.clip(out[..., 0::2], 0.0, w, out=out[..., 0::2])
            np.clip(out[..., 1::2], 0.0, h, out=out[..., 1::2])
        return out

    def cell_to_original(self, row: int, col: int, stride: int, clip: bool = True) -> np.ndarray:
        """The frame region (x1, y1, x2, y2) under feature-map cell (row, col) of a stride-``stride`` layer
        (``yolostream.v1.vocab.cell_to_frame``)."""
        return cell_to_frame(row, col, stride, self.as_dict(), clip=clip)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict whose keys are the field names of the wire's ``LetterboxInfo`` message."""
        return {
            "original_height": self.orig_hw[0],
            "original_width": self.orig_hw[1],
            "input_height": self.out_hw[0],
            "input_width": self.out_hw[1],
            "resized_height": self.resized_hw[0],
            "resized_width": self.resized_hw[1],
            "ratio_w": self.ratio[0],
            "ratio_h": self.ratio[1],
            "pad_left": self.pad_left,
            "pad_top": self.pad_top,
            "pad_right": self.pad_right,
            "pad_bottom": self.pad_bottom,
        }


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _hw(shape: int | Sequence[int], what: str) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair, as upstream accepts both."""
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        n = _positive_int(shape, what)
        return n, n
    if isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) == 2:
        return _positive_int(shape[0], what), _positive_int(shape[1], what)
    raise ValueError(f"{what} must be an int or an (h, w) pair, got {shape!r}")


def input_shape(imgsz: int | tuple[int, int], stride: int) -> tuple[int, int]:
    """The (h, w) letterbox target: ``imgsz`` rounded **up** to a multiple of ``stride``.

    Upstream does the same before letterboxing, so e.g. imgsz 600 with stride 64 becomes 640, never 576.
    """
    s = _positive_int(stride, "stride")
    h, w = _hw(imgsz, "imgsz")
    return math.ceil(h / s) * s, math.ceil(w / s) * s


def _check_frame(frame: Any) -> np.ndarray:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy.ndarray, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must have dtype uint8, got {frame.dtype} with shape {frame.shape}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be an HxWx3 BGR image, got shape {frame.shape} (dtype {frame.dtype})")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame must not be empty, got shape {frame.shape}")
    return np.ascontiguousarray(frame)


def letterbox_geometry(
    frame_hw: tuple[int, int],
    new_shape: int | tuple[int, int],
    stride: int = 32,
    auto: bool = True,
    scaleup: bool = True,
) -> Letterbox:
    """Upstream's letterbox geometry for a frame of ``frame_hw`` (h, w), without touching pixels.

    r = min(new_h/h, new_w/w) (capped at 1 without ``scaleup``); the resized size is (round(w*r),
    round(h*r)); the remaining padding is reduced modulo ``stride`` when ``auto`` (minimal rectangle),
    split in halves with the odd pixel going bottom/right. Knowing the output size first lets a caller
    letterbox straight into memory it owns (a front-end's shared-memory slot).
    """
    s = _positive_int(stride, "stride")
    new_h, new_w = _hw(new_shape, "new_shape")
    h, w = frame_hw
    r = min(new_h / h, new_w / w)
    if not scaleup:
        r = min(r, 1.0)
    # At least one pixel: for a frame thinner than 1/r upstream would hand OpenCV an empty size and crash.
    unpad_w, unpad_h = max(1, int(round(w * r))), max(1, int(round(h * r)))
    dw, dh = new_w - unpad_w, new_h - unpad_h
    if auto:
        dw, dh = dw % s, dh % s
    dw, dh = dw / 2, dh / 2
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    return Letterbox(
        ratio=(r, r),
        pad_left=left,
        pad_top=top,
        pad_right=right,
        pad_bottom=bottom,
        orig_hw=(h, w),
        out_hw=(unpad_h + top + bottom, unpad_w + left + right),
        resized_hw=(unpad_h, unpad_w),
    )


def apply_letterbox(frame: np.ndarray, info: Letterbox, out: np.ndarray | None = None) -> np.ndarray:
    """Resize (INTER_LINEAR) and pad (114) an HxWx3 uint8 BGR frame as ``info`` says, into ``out`` when given."""
    img = _check_frame(frame)
    unpad_h, unpad_w = info.resized_hw
    if img.shape[:2] != (unpad_h, unpad_w):
        img = cv2.resize(img, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    border = (info.pad_top, info.pad_bottom, info.pad_left, info.pad_right)
    if out is None:
        return cv2.copyMakeBorder(img, *border, cv2.BORDER_CONSTANT, value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    if out.shape != (*info.out_hw, 3) or out.dtype != np.uint8:
        raise ValueError(f"letterbox output must be {(*info.out_hw, 3)} uint8, got {out.shape} {out.dtype}")
    written = cv2.copyMakeBorder(img, *border, cv2.BORDER_CONSTANT, dst=out,
                                 value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    if written is not out and not np.shares_memory(written, out):
        out[...] = written
    return out


def letterbox(
    frame: np.ndarray,
    new_shape: int | tuple[int, int],
    stride: int = 32,
    auto: bool = True,
    scaleup: bool = True,
) -> tuple[np.ndarray, Letterbox]:
    """Resize and pad an HxWx3 uint8 BGR frame into ``new_shape`` (int or (h, w)), upstream's way.

    See ``letterbox_geometry`` for the rule; the padding is filled with 114. Returns the padded HWC BGR
    image and its geometry.
    """
    img = _check_frame(frame)
    info = letterbox_geometry(img.shape[:2], new_shape, stride, auto, scaleup)
    return apply_letterbox(img, info), info


def prepare(
    frame: np.ndarray,
    imgsz: int | tuple[int, int],
    stride: int,
    policy: str = "auto",
) -> tuple[np.ndarray, Letterbox]:
    """Turn a BGR frame into the contiguous CHW RGB uint8 array the model is fed (before /255).

    ``imgsz`` is first rounded up to a multiple of ``stride`` (as detect.py does); ``policy`` is one of
    :data:`POLICIES`. Keeping uint8 until the device quarters the host-to-device bytes.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown letterbox policy {policy!r}; choose one of {', '.join(POLICIES)}")
    target = input_shape(imgsz, stride)
    img, info = letterbox(frame, target, stride=stride, auto=(policy == "auto"), scaleup=True)
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])
    return chw, info
