"""The words server and client share, and the one formula from model-input pixels back to the frame.

Torch-free and grpc-free (numpy only): the enum ↔ name tables of the contract, the image file suffixes both
sides read, and the letterbox back-mapping. Everything that names an option or maps a feature cell to the frame
uses these, so the two sides (and the proto comment on ``LetterboxInfo``) cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from . import feature_service_pb2 as pb

#: Output dtypes by name; uint8 is DTYPE_UINT8_AFFINE (8-bit codes with a scale and offset per channel).
DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16,
          "uint8": pb.DTYPE_UINT8_AFFINE}
#: Poolings by name: none keeps (C, H, W); avg and max give one (C,) vector per layer.
POOLINGS = {"none": pb.POOLING_NONE, "avg": pb.POOLING_GLOBAL_AVG, "max": pb.POOLING_GLOBAL_MAX}
#: Letterbox policies by name: auto pads to the next stride multiple, square to the full imgsz.
LETTERBOX_POLICIES = {"auto": pb.LETTERBOX_POLICY_AUTO, "square": pb.LETTERBOX_POLICY_SQUARE}
#: Layer roles by name.
ROLES = {"backbone": pb.LAYER_ROLE_BACKBONE, "neck": pb.LAYER_ROLE_NECK, "detect": pb.LAYER_ROLE_DETECT}
#: What runs the model's forwards (``--backend``): torch, onnxruntime, or the faster of the two, timed at start-up.
BACKENDS = ("torch", "onnxruntime", "auto")
#: Frame statuses by name.
STATUSES = {"ok": pb.FRAME_STATUS_OK, "error": pb.FRAME_STATUS_ERROR, "dropped": pb.FRAME_STATUS_DROPPED}
#: Tensor data compressions by name (StreamConfig.compression): none, or zstd (byte shuffle, then Zstandard).
COMPRESSIONS = {"none": pb.COMPRESSION_NONE, "zstd": pb.COMPRESSION_SHUFFLE_ZSTD}

#: Shared memory for clients on the server's host (the handshake is the proto comment on SharedMemoryOptions): the
#: initial-metadata keys the server answers a StreamConfig.shared_memory with, the byte alignment of every tensor it
#: writes into a region, the registration answers, and how long the server waits for the region.
SHM_SOCKET_KEY = "yolostream-shm-socket"
SHM_TOKEN_KEY = "yolostream-shm-token"
SHM_OUTPUT_BYTES_KEY = "yolostream-shm-output-bytes"
SHM_ALIGN = 64
SHM_OK = b"ok"
SHM_ERROR = b"error: "
SHM_REGISTER_TIMEOUT_S = 10.0


def shm_aligned(offset: int) -> int:
    """The first multiple of ``SHM_ALIGN`` at or after ``offset``: where the next tensor goes in a region."""
    return -(-offset // SHM_ALIGN) * SHM_ALIGN


#: Files that are read as images (by suffix, any case); everything else is tried as a video.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def names_of(table: Mapping[str, int]) -> dict[int, str]:
    """The reverse of a name → enum table."""
    return {value: name for name, value in table.items()}


def input_to_frame(points: Any, letterbox: Mapping[str, Any]) -> np.ndarray:
    """Map (..., 2) x/y points in model-input pixels to original-frame pixels (float64, nothing clipped).

    ``x_frame = (x - pad_left) * original_width / resized_width``, and likewise for y: undo the padding, then
    the resize cv2 really applied (the resized size is whole pixels, so this puts the content's edges exactly on
    the frame's). Coordinates are continuous (pixel edges). ``letterbox`` has ``LetterboxInfo``'s field names.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 0 or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {pts.shape}")
    out = np.empty_like(pts)
    out[..., 0] = (pts[..., 0] - letterbox["pad_left"]) * letterbox["original_width"] / letterbox["resized_width"]
    out[..., 1] = (pts[..., 1] - letterbox["pad_top"]) * letterbox["original_height"] / letterbox["resized_height"]
    return out


def cell_to_frame(row: int, col: int, stride: int, letterbox: Mapping[str, Any], clip: bool = True) -> np.ndarray:
    """The frame region (x1, y1, x2, y2) under feature-map cell (row, col) of a stride-``stride`` layer.

    The cell covers model-input pixels ``[col*stride, (col+1)*stride)`` by ``[row*stride, (row+1)*stride)``
    (its receptive field is larger: this is its footprint). With ``clip`` the region is limited to the frame.
    """
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    corners = input_to_frame([[col * stride, row * stride], [(col + 1) * stride, (row + 1) * stride]], letterbox)
    box = corners.reshape(4)
    if clip:
        np.clip(box[0::2], 0.0, letterbox["original_width"], out=box[0::2])
        np.clip(box[1::2], 0.0, letterbox["original_height"], out=box[1::2])
    return box
