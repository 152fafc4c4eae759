"""The 8-bit record: how one frame's DTYPE_UINT8_AFFINE output lies in its shared-memory slot.

The device codes each frame's output on its own (``device/quantize.py``) and hands it over as ONE uint8 record::

    [scales: float32 x P][offsets: float32 x P][codes: uint8 x prod(shape)]

little-endian and packed (no padding), where ``shape`` is the frame's tensor as sent, (C, H, W), (C,) or (N, D), and
P its channel count by the wire's rule (``wire.affine_channel_axis``): C for a map, 1 for a pooled vector, D for
object vectors (one channel per column; N may be 0, and the record is then the D zero scales and offsets alone).
One record per frame keeps the device's copy back to the host a single block, whatever the dtype, and lets the
front-end send the codes as a view of shared memory (``unpack``), with the scales and offsets as
Tensor.affine_scales/affine_offsets. The codes are row-major, so the record of an (n, D) tensor is the first
``record_bytes((n, D))`` bytes of room reserved for ``record_bytes((rows, D))``: the object slot
(``common.object_request.ObjectLayout``) reserves room for the most boxes a frame may get and the device fills a
prefix of it.

A frame whose tensor cannot be coded (a NaN, an infinity or a magnitude above 2**126) has NaN scales: ``coded``
says so, and the front-end fails that frame.

numpy only (no torch, no grpc): the front-end sizes and reads records with it; the device writes them with torch
in exactly this layout (``device.quantize.affine_records`` and ``device.quantize.object_record``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from yolostream.v1 import wire

#: The element type of the scales and offsets in a record.
PARAM_DTYPE = np.dtype("<f4")


def params(shape: Sequence[int]) -> int:
    """P, the scales (and offsets) a record holds for one frame's tensor of ``shape``: C for (C, H, W), 1 for (C,), D
    for (N, D).

    Args:
        shape: the frame's tensor shape as sent.
    """
    axis = wire.affine_channel_axis(len(shape))
    return 1 if axis is None else int(shape[axis])


def record_bytes(shape: Sequence[int]) -> int:
    """Bytes of one frame's record for a tensor of ``shape``: the codes plus a float32 scale and offset per channel.

    Args:
        shape: the frame's tensor shape as sent.
    """
    return 2 * params(shape) * PARAM_DTYPE.itemsize + math.prod(shape)


def unpack(record: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scales, offsets and codes of one frame's record.

    Args:
        record: the record's bytes, a flat uint8 array of ``record_bytes(shape)`` (a view of shared memory).
        shape: the frame's tensor shape as sent.

    Returns float32 ``scales`` and ``offsets`` (P each, copies: they are tiny and go into repeated fields) and the
    uint8 ``codes`` of ``shape``, a view of ``record`` (no copy). ValueError when the record has another size.
    """
    p = params(shape)
    size = p * PARAM_DTYPE.itemsize
    flat = np.asarray(record).reshape(-1)
    if flat.dtype != np.uint8 or flat.size != record_bytes(shape):
        raise ValueError(f"a record for shape {tuple(shape)} is {record_bytes(shape)} uint8 bytes, got "
                         f"{flat.size} {flat.dtype}")
    scales = np.frombuffer(flat[:size].tobytes(), PARAM_DTYPE)
    offsets = np.frombuffer(flat[size:2 * size].tobytes(), PARAM_DTYPE)
    return scales, offsets, flat[2 * size:].reshape(tuple(shape))


def coded(scales: np.ndarray) -> bool:
    """Whether the device could code the frame the record belongs to (its scales are not NaN).

    Args:
        scales: the record's scales (``unpack``).
    """
    return not bool(np.isnan(scales).any())
