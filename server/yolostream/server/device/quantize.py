"""8-bit per-channel codes for DTYPE_UINT8_AFFINE, computed on the device for a whole batch at once.

Each frame's channel gets its own offset (the minimum) and scale ((max - min) / 255); the codes are a quarter of the
float32 bytes to copy to the host and to send. The arithmetic is exactly that of the numpy reference
``yolostream.v1.wire.quantize_reference``, one float32 operation at a time and in the same order, so the codes,
scales and offsets are equal bit for bit on CPU and CUDA:

- ``min``/``max`` are exact; ``-``, ``/`` and ``round`` (half to even) are single IEEE float32 operations on both
  sides. The divisors are tensors on the data's device: CUDA divides by a CPU scalar as a multiplication by its
  reciprocal, which can differ in the last bit.
- a NaN becomes 0 and the steps are clamped to [0, 255] (the reference's ``fmax``/``fmin``, which give the same
  values), so even codes of channels that cannot be coded are defined (they are not sent: see ``ok``).
  ``nan_to_num_`` and ``clamp_`` with Python scalars are vectorised; ``fmax``/``fmin`` against a 0-d tensor are
  not (on CPU they took 3.9 of the 5.8 ms that yolov5s's P3-P5 at 480x640 cost on one thread).

A frame whose tensor holds a NaN, an infinity or a magnitude above 2**126 has ``ok`` False: the server fails that
frame (the proto says so). ``affine_records`` packs a batch into the per-frame records the front-ends read
(``common/affine.py``), with NaN scales for such a frame; ``object_record`` packs one frame's object vectors the
same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from yolostream.v1.wire import AFFINE_LIMIT, AFFINE_MAX_CODE

from ..common import affine


@dataclass(frozen=True)
class Quantized:
    """A batch of 8-bit codes and their parameters, on the device they were computed on.

    ``codes`` uint8 in the input's shape; ``scales`` and ``offsets`` float32 with one entry per channel (their shape
    is said by the function that made them); ``ok`` bool: per frame for maps and pooled vectors, one value for
    object vectors: False where a channel held a NaN, an infinity or a magnitude above 2**126 (its scale and offset
    are 0 and its codes mean nothing).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor
    ok: torch.Tensor


def _quantize(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``x`` with one channel over ``dims``; scales, offsets and per-channel ok keep ``dims`` as size 1."""
    x = x.to(torch.float32)
    kept = tuple(1 if d in dims else n for d, n in enumerate(x.shape))
    if x.numel() == 0:
        zeros = x.new_zeros(kept)
        oks = torch.ones(kept, dtype=torch.bool, device=x.device)
        return torch.empty(x.shape, dtype=torch.uint8, device=x.device), zeros, zeros, oks
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    ok = (lo >= -AFFINE_LIMIT) & (hi <= AFFINE_LIMIT)
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    top = torch.full((), float(AFFINE_MAX_CODE), dtype=torch.float32, device=x.device)
    scale = torch.div(hi - lo, top)
    divisor = torch.where(scale > zero, scale, one)
    steps = torch.sub(x, lo)
    steps.div_(divisor)
    steps.round_()
    steps.nan_to_num_(nan=0.0).clamp_(0.0, float(AFFINE_MAX_CODE))
    codes = steps.to(torch.uint8)
    return codes, torch.where(ok, scale, zero), torch.where(ok, lo, zero), ok


def quantize_maps(maps: torch.Tensor) -> Quantized:
    """Codes of a batch of feature maps, one channel per (frame, C) plane.

    Args:
        maps: (N, C, H, W), float32 or float16 (or bfloat16), any memory layout (channels_last included).

    Returns codes (N, C, H, W) in ``maps``' memory layout, scales and offsets (N, C), ok (N,). Frame n's Tensor
    carries ``codes[n]`` (C, H, W) with ``scales[n]`` and ``offsets[n]`` (C entries each).
    """
    if maps.dim() != 4:
        raise ValueError(f"maps must be (N, C, H, W), got shape {tuple(maps.shape)}")
    codes, scales, offsets, ok = _quantize(maps, (2, 3))
    return Quantized(codes, scales.flatten(1), offsets.flatten(1), ok.flatten(1).all(dim=1))


def quantize_pooled(vectors: torch.Tensor) -> Quantized:
    """Codes of a batch of pooled vectors, one channel per frame (the proto's rule for a (C,) tensor).

    Args:
        vectors: (N, C), one pooled vector per frame.

    Returns codes (N, C), scales and offsets (N,), ok (N,). Frame n's Tensor carries ``codes[n]`` with the single
    scale ``scales[n]`` and offset ``offsets[n]``.
    """
    if vectors.dim() != 2:
        raise ValueError(f"pooled vectors must be (N, C), got shape {tuple(vectors.shape)}")
    codes, scales, offsets, ok = _quantize(vectors, (1,))
    return Quantized(codes, scales.flatten(), offsets.flatten(), ok.flatten())


def quantize_objects(features: torch.Tensor) -> Quantized:
    """Codes of one frame's object vectors, one channel per column (the proto's rule for an (N, D) tensor).

    Args:
        features: (K, D), one row per box; K may be 0 (every column then has scale 0 and offset 0).

    Returns codes (K, D), scales and offsets (D,), ok a 0-d bool.
    """
    if features.dim() != 2:
        raise ValueError(f"object features must be (K, D), got shape {tuple(features.shape)}")
    codes, scales, offsets, ok = _quantize(features, (0,))
    return Quantized(codes, scales.flatten(), offsets.flatten(), ok.all())


def affine_records(values: torch.Tensor) -> torch.Tensor:
    """One ``common.affine`` record per frame: ``[scales float32 x P][offsets float32 x P][codes]``, as uint8 rows.

    Maps are coded per channel (P = C), pooled vectors as one channel per frame (P = 1), as the proto says. A frame
    that cannot be coded (``ok`` False) gets NaN scales, which the front-end reads as "fail this frame". The rows are
    contiguous, so the batch goes to the host in one copy (direct path) or as one part of the staged download.

    Args:
        values: (N, C, H, W) maps or (N, C) pooled vectors, on the device, any float dtype and memory layout.

    Returns (N, ``affine.record_bytes(values.shape[1:])``) uint8 on ``values``' device.
    """
    quantized = quantize_maps(values) if values.dim() == 4 else quantize_pooled(values)
    return _records(quantized, values.shape[0], tuple(values.shape[1:]))


def object_record(features: torch.Tensor) -> torch.Tensor:
    """One frame's object vectors as its ``common.affine`` record, coded per column (``quantize_objects``).

    The record is what the frame's object slot holds in place of the vectors (``ObjectLayout``), so the front-end
    reads it as it reads a coded map; vectors that cannot be coded get NaN scales, and the front-end fails the frame.

    Args:
        features: (K, D) float vectors of one frame, K >= 0.

    Returns a flat uint8 tensor of ``affine.record_bytes((K, D))`` bytes on ``features``' device.
    """
    return _records(quantize_objects(features), 1, tuple(features.shape))[0]


def _records(quantized: Quantized, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``n`` frames' codes and parameters packed as ``common.affine`` records of a tensor of ``shape`` each, NaN
    scales for a frame whose ``ok`` is False; (n, ``affine.record_bytes(shape)``) uint8."""
    device = quantized.codes.device
    uncoded = torch.full((), float("nan"), dtype=torch.float32, device=device)
    scales = torch.where(quantized.ok.reshape(n, 1), quantized.scales.reshape(n, -1), uncoded)
    offsets = quantized.offsets.reshape(n, -1).contiguous()
    # float32 viewed as its bytes: little-endian on every platform torch runs on, as the record layout says
    records = torch.cat([scales.view(torch.uint8), offsets.view(torch.uint8), quantized.codes.reshape(n, -1)], dim=1)
    expected = affine.record_bytes(shape)
    if records.shape[1] != expected:
        raise ValueError(f"records of {records.shape[1]} bytes for frames of shape {shape}, the layout says {expected}")
    return records
