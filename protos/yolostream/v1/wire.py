"""numpy <-> wire helpers shared by server and client (numpy and the generated messages only).

Tensors travel as raw little-endian C-order bytes. Encoding costs one ``tobytes`` copy when the array
already has the wire dtype; decoding float32/float16 is an ``np.frombuffer`` view of the field's bytes (the
protobuf runtime hands a bytes field out as one copy; numpy adds none).

bfloat16 has no numpy dtype. On the wire it is the upper 16 bits of the float32 bit pattern: encoding
rounds a float32 to nearest, ties to even (any NaN becomes the quiet NaN 0x7FC0); decoding
shifts the 16 bits back into the top of a float32, which is exact, so bfloat16 arrays decode to float32.

DTYPE_UINT8_AFFINE carries one byte per element and a float32 scale and offset per channel
(``quantize_reference`` is the numpy reference of the server's quantiser; ``dequantize_affine`` the wire
formula). Tensor.data may be compressed (COMPRESSION_SHUFFLE_ZSTD: byte shuffle, then zstd); the codec's
package is imported only when a compressed tensor arrives. ``tensor_from_proto`` and ``decode_tensor`` read
every form.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1.vocab import DTYPES

#: Wire dtypes that map one-to-one onto a numpy dtype (always little-endian).
_NUMPY_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
}

#: Bytes per element of each wire dtype.
ITEMSIZE: dict[int, int] = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_UINT8_AFFINE: 1}

#: Names used in configs, CLIs and ``ModelInfo.dtype`` (the shared vocabulary's table).
DTYPE_NAMES: dict[str, int] = DTYPES

_BF16_STORAGE = np.dtype("<u2")
_AFFINE_STORAGE = np.dtype("u1")
_BF16_QUIET_NAN = np.uint16(0x7FC0)

#: Field names of ``LetterboxInfo``; the dict form used by the helpers below has exactly these keys.
LETTERBOX_FIELDS: tuple[str, ...] = tuple(f.name for f in pb.LetterboxInfo.DESCRIPTOR.fields)


def _check_dtype(dtype: int) -> int:
    if dtype not in ITEMSIZE:
        name = pb.Dtype.Name(dtype) if dtype in pb.Dtype.values() else repr(dtype)
        raise ValueError(f"unsupported tensor dtype {name}")
    return dtype


def dtype_name(dtype: int) -> str:
    """The name of a wire dtype, e.g. ``"float16"``."""
    _check_dtype(dtype)
    return next(name for name, value in DTYPE_NAMES.items() if value == dtype)


def dtype_from_name(name: str) -> int:
    """The wire dtype for ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}") from None


def dtype_to_numpy(dtype: int) -> np.dtype:
    """The numpy dtype :func:`tensor_from_proto` returns for a wire dtype (float32 for bfloat16 and uint8 codes)."""
    _check_dtype(dtype)
    return _NUMPY_DTYPES.get(dtype, np.dtype("<f4"))


def storage_dtype(dtype: int) -> np.dtype:
    """The numpy dtype of a wire dtype's raw bytes: itself for float32/float16, uint16 bit patterns for bfloat16,
    uint8 for DTYPE_UINT8_AFFINE codes."""
    _check_dtype(dtype)
    if dtype == pb.DTYPE_UINT8_AFFINE:
        return _AFFINE_STORAGE
    return _NUMPY_DTYPES.get(dtype, _BF16_STORAGE)


def dtype_from_numpy(dtype: Any) -> int:
    """The wire dtype holding a numpy float32 or float16 array as is (byte order aside)."""
    dt = np.dtype(dtype)
    for wire, np_dtype in _NUMPY_DTYPES.items():
        if dt.kind == np_dtype.kind and dt.itemsize == np_dtype.itemsize:
            return wire
    raise ValueError(f"no wire dtype for numpy {dt}; pass float32 or float16, or an explicit dtype")


def float32_to_bfloat16_bits(array: Any) -> np.ndarray:
    """bfloat16 bit patterns (little-endian uint16) of ``array`` cast to float32, rounded to nearest even."""
    f32 = np.asarray(array, dtype=np.float32)
    bits = f32.reshape(-1).view(np.uint32)  # 1-d so the uint32 arithmetic wraps quietly, never as scalars
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to even; finite values too large
    # for bfloat16 correctly become infinity. NaNs are set apart so the carry cannot turn them into inf.
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(_BF16_STORAGE)
    rounded[np.isnan(f32.reshape(-1))] = _BF16_QUIET_NAN
    return rounded.reshape(f32.shape)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)


def storage_to_float32(array: Any, dtype: int) -> np.ndarray:
    """float32 values of ``array`` held in wire dtype ``dtype``'s storage (``storage_dtype``: bfloat16 as bits)."""
    if _check_dtype(dtype) == pb.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(array)
    return np.asarray(array, dtype=np.float32)


def tensor_to_proto(
    name: str,
    layer_index: int,
    stride: int,
    array: np.ndarray,
    dtype: int | None = None,
) -> pb.Tensor:
    """A new Tensor message holding ``array``; see :func:`fill_tensor`."""
    return fill_tensor(pb.Tensor(), name, layer_index, stride, array, dtype)


def fill_tensor(
    msg: pb.Tensor,
    name: str,
    layer_index: int,
    stride: int,
    array: np.ndarray,
    dtype: int | None = None,
) -> pb.Tensor:
    """Fill ``msg`` (e.g. ``result.tensors.add()``) with ``array`` in wire dtype ``dtype`` (inferred when None).

    Filling a message in place matters for large replies: passing finished Tensor messages to a parent's
    constructor makes protobuf copy (serialise and parse) every one of them again.

    An array already in the wire dtype (any byte order, any strides) costs a single ``tobytes`` copy;
    anything else is converted first. For DTYPE_BFLOAT16, a uint16/int16 array is taken as ready bit
    patterns (e.g. a torch bfloat16 tensor viewed as int16), and floats are rounded to nearest even.
    DTYPE_UINT8_AFFINE quantises a float array on the CPU (:func:`quantize_affine`); an array the codes cannot
    carry (NaN, infinity, magnitude above 2**126) is filled as DTYPE_FLOAT32 instead (Tensor.dtype says which; the
    server itself never sends such a feature tensor: it fails that frame, as the proto says).
    """
    arr = np.asarray(array)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"cannot send an array of dtype {arr.dtype} as a tensor")
    if dtype is None or dtype == pb.DTYPE_UNSPECIFIED:
        dtype = dtype_from_numpy(arr.dtype)
    _check_dtype(dtype)
    if dtype == pb.DTYPE_UINT8_AFFINE:
        return _fill_codes_or_float32(msg, name, layer_index, stride, arr)
    if dtype == pb.DTYPE_BFLOAT16:
        if arr.dtype.kind in "iu" and arr.dtype.itemsize == 2:
            wire = arr.astype(_BF16_STORAGE, copy=False)
        else:
            wire = float32_to_bfloat16_bits(arr)
    else:
        wire = arr.astype(_NUMPY_DTYPES[dtype], copy=False)
    msg.name = name
    msg.layer_index = layer_index
    msg.stride = stride
    msg.dtype = dtype
    msg.shape[:] = arr.shape
    msg.data = wire.tobytes(order="C")
    return msg


def tensor_from_proto(tensor: pb.Tensor, data: Any = None) -> np.ndarray:
    """The array held by a Tensor message, or described by it when ``data`` is given.

    float32/float16 come back as a read-only ``np.frombuffer`` view of the field's bytes (no copy beyond the
    one protobuf makes when the field is read;
    call ``.copy()`` to write to it); bfloat16 comes back as a new float32 array. DTYPE_UINT8_AFFINE and
    compressed tensors go through :func:`decode_tensor`: codes decode to a new float32 array, compressed
    float32/float16 to a read-only view of the decompressed bytes.

    ``data``: the tensor's bytes when they are not in the message (any buffer, e.g. a view of the shared-memory
    range ``Tensor.shared_memory`` names); float32/float16 then view it (writable if it is).
    """
    if tensor.dtype == pb.DTYPE_UINT8_AFFINE or is_compressed(tensor):
        return decode_tensor(tensor, data)
    dtype = _check_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {tensor.name!r} has a negative dimension in shape {shape}")
    data = tensor.data if data is None else data
    expected = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
    if memoryview(data).nbytes != expected:
        raise ValueError(
            f"tensor {tensor.name!r}: {memoryview(data).nbytes} data bytes, but shape {shape} of "
            f"{dtype_name(dtype)} needs {expected}"
        )
    if dtype == pb.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(np.frombuffer(data, dtype=_BF16_STORAGE)).reshape(shape)
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)


def letterbox_to_proto(info: Mapping[str, Any]) -> pb.LetterboxInfo:
    """A LetterboxInfo from a dict with exactly the message's field names (see LETTERBOX_FIELDS)."""
    missing = set(LETTERBOX_FIELDS) - set(info)
    unknown = set(info) - set(LETTERBOX_FIELDS)
    if missing or unknown:
        raise ValueError(f"letterbox dict: missing {sorted(missing)}, unknown {sorted(unknown)}")
    return pb.LetterboxInfo(**{k: info[k] for k in LETTERBOX_FIELDS})


def letterbox_from_proto(msg: pb.LetterboxInfo) -> dict[str, Any]:
    """The dict form of a LetterboxInfo (ints for sizes and pads, floats for the ratios)."""
    return {k: getattr(msg, k) for k in LETTERBOX_FIELDS}


#: Name and layer index of FrameResult.object_features.
OBJECT_FEATURES_NAME = "object_features"
#: The FrameResult fields that say which anchor made each detection, in the column order of ``Objects.anchors``.
ANCHOR_FIELDS = ("anchor_levels", "anchor_rows", "anchor_cols", "anchor_indices")


def set_frame_boxes(frame: pb.Frame, boxes: Any, ids: Any = None, scores: Any = None) -> pb.Frame:
    """Attach a client's (N, 4) x1, y1, x2, y2 boxes (original-frame pixels), optional N ids and optional N scores
    (for tracking) to ``frame``.

    Raises ValueError for a shape other than (N, 4), or an id or score count other than N. Returns ``frame``.
    """
    arr = _as_boxes(boxes)
    id_arr = _ids(ids, len(arr))
    score_arr = None if scores is None else np.asarray(scores, dtype=np.float32).reshape(-1)
    if score_arr is not None and len(score_arr) != len(arr):
        raise ValueError(f"{len(score_arr)} box scores for {len(arr)} boxes: send none, or one per box")
    frame.boxes[:] = arr.reshape(-1).tolist()
    frame.box_ids[:] = id_arr.tolist() if id_arr is not None else []
    frame.box_scores[:] = score_arr.tolist() if score_arr is not None else []
    return frame


def frame_boxes(frame: pb.Frame) -> tuple[np.ndarray, np.ndarray | None]:
    """The client boxes of a Frame: (N, 4) float32 and the (N,) uint64 ids, or None when it sent none.

    Raises ValueError when the values are not a multiple of 4 or the ids are neither absent nor one per box.
    """
    values = np.asarray(frame.boxes, dtype=np.float32)
    if values.size % 4:
        raise ValueError(f"Frame.boxes holds {values.size} values, not 4 per box (x1, y1, x2, y2)")
    boxes = values.reshape(-1, 4)
    return boxes, _ids(np.asarray(frame.box_ids, dtype=np.uint64) if len(frame.box_ids) else None, len(boxes))


def frame_box_scores(frame: pb.Frame, n: int) -> np.ndarray | None:
    """The (n,) float32 scores of a Frame's ``n`` client boxes, or None when it sent none.

    Raises ValueError when there is not one per box, or one is not finite.
    """
    if not len(frame.box_scores):
        return None
    scores = np.asarray(frame.box_scores, dtype=np.float32)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} box scores for {n} boxes: send none, or one per box")
    if not np.isfinite(scores).all():
        raise ValueError("box scores must be finite numbers")
    return scores


def _as_boxes(boxes: Any) -> np.ndarray:
    """``boxes`` as an (N, 4) float32 array (an empty input gives (0, 4)); ValueError for any other shape."""
    arr = np.asarray(boxes, dtype=np.float32)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be an (N, 4) array of x1, y1, x2, y2, got shape {arr.shape}")
    return arr


def _ids(ids: Any, n: int) -> np.ndarray | None:
    """Box ids as (n,) uint64; ValueError for another count, or values that are not integers in [0, 2**64)."""
    if ids is None:
        return None
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "u":
        arr = ids.reshape(-1).astype(np.uint64, copy=False)
    else:
        values = np.asarray(ids, dtype=object).reshape(-1).tolist()
        if len(values) == n and not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                        and 0 <= v < 2**64 for v in values):
            raise ValueError("box ids must be integers in [0, 2**64)")
        arr = np.array(values, dtype=np.uint64) if len(values) == n else np.zeros(len(values), np.uint64)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} box ids for {n} boxes: send none, or one per box")
    return arr


def fill_objects(
    result: pb.FrameResult,
    boxes: Any,
    *,
    source: int = pb.BOX_SOURCE_DETECTOR,
    scores: Any = None,
    classes: Any = None,
    box_ids: Any = None,
    features: Any = None,
    slices: Sequence[tuple[str, int, int, int, int]] = (),
    dtype: int | None = None,
    anchors: Any = None,
) -> pb.FrameResult:
    """Fill a FrameResult's box fields: (N, 4) ``boxes`` from ``source``, optional (N,) ``scores``,
    ``classes`` and ``box_ids``, optional (N, D) ``features`` in wire ``dtype`` (see :func:`fill_tensor`), or as
    :class:`AffineCodes` already made (the server's device quantiser; ``dtype`` is then DTYPE_UINT8_AFFINE), with
    ``slices`` of (name, layer_index, stride, start, stop) per layer, and for detections optional (N, 4)
    ``anchors``, the columns of :data:`ANCHOR_FIELDS` (level, grid row, grid column, anchor index). Raises
    ValueError when the lengths disagree or an anchor value is negative. Returns ``result``.
    """
    arr = _as_boxes(boxes)
    n = len(arr)
    result.box_source = source
    result.boxes[:] = arr.reshape(-1).tolist()
    for name, values, np_dtype in (("scores", scores, np.float32), ("classes", classes, np.int32)):
        vec = np.zeros(0, np_dtype) if values is None else np.asarray(values, dtype=np_dtype).reshape(-1)
        if values is not None and len(vec) != n:
            raise ValueError(f"{len(vec)} {name} for {n} boxes")
        getattr(result, name)[:] = vec.tolist()
    cells = np.zeros((0, len(ANCHOR_FIELDS)), np.int64) if anchors is None else np.asarray(anchors, np.int64)
    if cells.size == 0:
        cells = cells.reshape(0, len(ANCHOR_FIELDS))
    if anchors is not None and cells.shape != (n, len(ANCHOR_FIELDS)):
        raise ValueError(f"anchors of shape {cells.shape} for {n} boxes; want ({n}, {len(ANCHOR_FIELDS)})")
    if (cells < 0).any():
        raise ValueError("anchor levels, grid cells and anchor indices are never negative")
    for column, name in enumerate(ANCHOR_FIELDS):
        getattr(result, name)[:] = cells[:, column].tolist()
    ids = _ids(box_ids, n)
    result.box_ids[:] = ids.tolist() if ids is not None else []
    if features is not None:
        coded = features if isinstance(features, AffineCodes) else None
        feats = np.asarray(features.codes if coded is not None else features)
        if feats.ndim != 2 or len(feats) != n:
            raise ValueError(f"object features must be (N, D) with N = {n} boxes, got shape {feats.shape}")
        if coded is not None:
            fill_tensor_affine(result.object_features, OBJECT_FEATURES_NAME, -1, 0, coded.codes, coded.scales,
                               coded.offsets)
        else:
            fill_tensor(result.object_features, OBJECT_FEATURES_NAME, -1, 0, feats, dtype)
        del result.object_feature_slices[:]
        for name, index, stride, start, stop in slices:
            if not 0 <= start <= stop <= feats.shape[1]:
                raise ValueError(f"slice {name!r} [{start}, {stop}) is outside the {feats.shape[1]} feature columns")
            result.object_feature_slices.add(name=name, layer_index=index, stride=stride, start=start, stop=stop)
    return result


@dataclass(frozen=True)
class Objects:
    """The box fields of one FrameResult as numpy arrays.

    ``boxes`` (N, 4) float32 original-frame pixels; ``scores`` (N,) float32 and ``classes`` (N,) int32 for
    detections, else None; ``box_ids`` (N,) uint64 when the client sent ids, else None; ``features`` (N, D) or
    None; ``slices`` maps each layer name to its (start, stop) columns; ``source`` a ``BoxSource`` value;
    ``anchors`` (N, 4) int32 for detections, each one's Detect level, grid row, grid column and anchor index
    (:data:`ANCHOR_FIELDS`), None for client boxes and from servers that do not send them. ``codes``: when the
    features came as DTYPE_UINT8_AFFINE, their raw :class:`AffineCodes` (one scale and offset per column), of which
    ``features`` is the float32 decoding; else None.
    """

    source: int
    boxes: np.ndarray
    scores: np.ndarray | None
    classes: np.ndarray | None
    box_ids: np.ndarray | None
    features: np.ndarray | None
    slices: dict[str, tuple[int, int]]
    anchors: np.ndarray | None = None
    codes: AffineCodes | None = None

    def layer(self, name: str) -> np.ndarray:
        """The (N, width) columns of ``features`` read from layer ``name``."""
        if self.features is None:
            raise KeyError("this result carries no object features")
        start, stop = self.slices[name]
        return self.features[:, start:stop]


def objects_from_proto(result: pb.FrameResult) -> Objects:
    """Read the box fields of a FrameResult (see :class:`Objects`); ValueError when their lengths disagree."""
    values = np.asarray(result.boxes, dtype=np.float32)
    if values.size % 4:
        raise ValueError(f"FrameResult.boxes holds {values.size} values, not 4 per box")
    boxes = values.reshape(-1, 4)
    n = len(boxes)
    arrays = {}
    for name, np_dtype in (("scores", np.float32), ("classes", np.int32)):
        vec = np.asarray(getattr(result, name), dtype=np_dtype)
        if len(vec) not in (0, n) or (len(vec) == 0 and n and result.box_source == pb.BOX_SOURCE_DETECTOR):
            raise ValueError(f"FrameResult has {len(vec)} {name} for {n} detections")
        arrays[name] = vec if len(vec) == n and result.box_source != pb.BOX_SOURCE_CLIENT else None
    features = codes = None
    if result.HasField("object_features"):
        if result.object_features.dtype == pb.DTYPE_UINT8_AFFINE:  # read once, for both forms
            codes = affine_from_proto(result.object_features)
            features = codes.dequantize()
        else:
            features = tensor_from_proto(result.object_features)
        if features.ndim != 2 or len(features) != n:
            raise ValueError(f"object features of shape {features.shape} for {n} boxes")
    columns = [np.asarray(getattr(result, name), dtype=np.int64) for name in ANCHOR_FIELDS]
    counts = {len(c) for c in columns}
    if counts - {0, n} or len(counts) > 1:
        shown = ", ".join(f"{len(c)} {name}" for c, name in zip(columns, ANCHOR_FIELDS))
        raise ValueError(f"FrameResult has {shown} for {n} boxes")
    # Absent (a client box, or a server older than these fields) is None; an empty frame's detections are (0, 4).
    anchors = None
    if result.box_source == pb.BOX_SOURCE_DETECTOR and (n == 0 or counts == {n}):
        anchors = np.stack(columns, 1).astype(np.int32) if n else np.zeros((0, len(ANCHOR_FIELDS)), np.int32)
    return Objects(
        source=result.box_source,
        boxes=boxes,
        scores=arrays["scores"],
        classes=arrays["classes"],
        box_ids=_ids(np.asarray(result.box_ids, dtype=np.uint64) if len(result.box_ids) else None, n),
        features=features,
        slices={s.name: (s.start, s.stop) for s in result.object_feature_slices},
        anchors=anchors,
        codes=codes,
    )


#: Wire tags (field number << 3 | length-delimited) that pre-serialised replies are assembled from.
_TAG_RESPONSE_RESULT = b"\x0a"  # StreamResponse.result = 1
_TAG_RESULT_TENSORS = b"\x32"  # FrameResult.tensors = 6
_TAG_TENSOR_DATA = b"\x32"  # Tensor.data = 6


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def serialize_result(result: pb.FrameResult, payloads: Sequence[Any], in_stream_response: bool = False) -> bytes:
    """The serialised FrameResult (or StreamResponse around it) whose tensors carry ``payloads`` as their data.

    ``result`` holds everything else, its tensors included but with empty ``data``; ``payloads`` are the
    tensors' bytes in order (any C-contiguous buffer, e.g. a numpy view of shared memory). Each payload is copied
    once, into the returned bytes, where filling ``Tensor.data`` and serialising would copy it three times. The
    bytes are a standard encoding of the same message (fields may come in another order, which every parser
    accepts), so any client decodes them.
    """
    tensors = list(result.tensors)
    if len(tensors) != len(payloads):
        raise ValueError(f"{len(tensors)} tensors but {len(payloads)} payloads")
    head = pb.FrameResult()
    head.CopyFrom(result)
    del head.tensors[:]
    pieces: list[Any] = [head.SerializeToString()]
    for tensor, payload in zip(tensors, payloads):
        data = memoryview(payload).cast("B")
        header = tensor.SerializeToString()
        inner = len(header) + 1 + len(_varint(data.nbytes)) + data.nbytes
        pieces += [_TAG_RESULT_TENSORS, _varint(inner), header, _TAG_TENSOR_DATA, _varint(data.nbytes), data]
    if in_stream_response:
        total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces)
        pieces[:0] = [_TAG_RESPONSE_RESULT, _varint(total)]
    return b"".join(pieces)


# DTYPE_UINT8_AFFINE: 8-bit codes with an affine map per channel (the Dtype comment in the proto is the contract).

#: Largest magnitude the 8-bit codes cover. Up to it every float32 step of the quantiser stays finite
#: (max - min <= 2**127); a tensor holding a larger value, a NaN or an infinity is never coded.
AFFINE_LIMIT = 2.0**126
#: The largest code: scale = (max - min) / AFFINE_MAX_CODE.
AFFINE_MAX_CODE = 255


class NotQuantizableError(ValueError):
    """The array holds a NaN, an infinity or a magnitude above AFFINE_LIMIT, which 8-bit codes cannot carry."""


def affine_channel_axis(ndim: int) -> int | None:
    """The channel axis of a DTYPE_UINT8_AFFINE tensor of rank ``ndim`` (one frame's tensor, as sent).

    (C, H, W) feature maps (and any rank of 3 or more): axis 0; (N, D) object features: axis 1, one channel per
    column; (C,) pooled vectors and scalars: None, the whole tensor is one channel.
    """
    if ndim >= 3:
        return 0
    if ndim == 2:
        return 1
    return None


def quantize_reference(
    array: Any, reduce_axes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The numpy reference of the per-channel 8-bit quantiser: the device quantiser equals it bit for bit.

    Every step is one float32 operation, in this order, with no fused or reordered arithmetic:
    ``offset = min``, ``scale = (max - min) / 255``, ``q = rint((x - offset) / d)`` where ``d`` is ``scale``, or 1
    for a constant channel (scale 0), then ``fmin(fmax(q, 0), 255)`` (``fmax``/``fmin`` turn a NaN into 0, so the
    codes are defined even for channels that cannot be coded) and the cast to uint8. ``rint`` rounds half to even,
    as ``torch.round`` does. A channel with no elements gets offset 0 and scale 0.

    Args:
        array: the values; cast to float32 first (exact for float16 and bfloat16 inputs).
        reduce_axes: the axes one channel spans, e.g. (2, 3) for an (N, C, H, W) batch of maps, (1,) for an
            (N, C) batch of pooled vectors (one channel per frame), (0,) for (K, D) object vectors (one per column).

    Returns:
        ``(codes, scales, offsets, ok)``: uint8 codes of ``array``'s shape; float32 scales and offsets and the
        bool ``ok`` shaped like the remaining axes. ``ok`` is False for a channel holding a NaN, an infinity or a
        magnitude above AFFINE_LIMIT; its scale and offset are then 0 and its codes mean nothing.
    """
    x = np.asarray(array, dtype=np.float32)
    axes = tuple(sorted(a % x.ndim for a in reduce_axes)) if x.ndim else ()
    if len(set(axes)) != len(axes):
        raise ValueError(f"reduce_axes {tuple(reduce_axes)} name an axis twice")
    kept_shape = tuple(1 if a in axes else n for a, n in enumerate(x.shape))
    if any(x.shape[a] == 0 for a in axes):
        lo = np.zeros(kept_shape, np.float32)
        hi = np.zeros(kept_shape, np.float32)
    else:
        lo = x.min(axis=axes, keepdims=True)
        hi = x.max(axis=axes, keepdims=True)
    ok = (lo >= -AFFINE_LIMIT) & (hi <= AFFINE_LIMIT)
    with np.errstate(all="ignore"):
        scale = (hi - lo) / np.float32(AFFINE_MAX_CODE)
        divisor = np.where(scale > 0, scale, np.float32(1))
        steps = np.rint((x - lo) / divisor)
        codes = np.fmin(np.fmax(steps, np.float32(0)), np.float32(AFFINE_MAX_CODE)).astype(np.uint8)
    zero = np.float32(0)
    scales = np.where(ok, scale, zero).astype(np.float32)
    offsets = np.where(ok, lo, zero).astype(np.float32)
    squeeze = tuple(axes)
    return codes, scales.squeeze(squeeze), offsets.squeeze(squeeze), ok.squeeze(squeeze)


@dataclass(frozen=True)
class AffineCodes:
    """One DTYPE_UINT8_AFFINE tensor: uint8 ``codes``, float32 ``scales`` and ``offsets`` (one per channel) and the
    channel ``axis`` of ``codes`` (None: one channel for the whole tensor); see :func:`affine_channel_axis`."""

    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray
    axis: int | None

    def dequantize(self) -> np.ndarray:
        """The float32 values the codes stand for (:func:`dequantize_affine`)."""
        return dequantize_affine(self.codes, self.scales, self.offsets, self.axis)


def quantize_affine(array: Any) -> AffineCodes:
    """8-bit codes of one frame's tensor, per channel along :func:`affine_channel_axis` (the CPU path).

    Args:
        array: a (C, H, W) map, (C,) pooled vector or (N, D) object features, float32 or float16.

    Raises NotQuantizableError when a channel holds a NaN, an infinity or a magnitude above AFFINE_LIMIT: send the
    tensor as float32 instead.
    """
    x = np.asarray(array)
    axis = affine_channel_axis(x.ndim)
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
    codes, scales, offsets, ok = quantize_reference(x, reduce_axes)
    if not ok.all():
        raise NotQuantizableError(
            f"{int(ok.size - ok.sum())} channel(s) hold a NaN, an infinity or a magnitude above 2**126"
        )
    return AffineCodes(codes, scales.reshape(-1), offsets.reshape(-1), axis)


def _channel_shape(ndim: int, axis: int | None) -> tuple[int, ...]:
    """How the per-channel parameters broadcast against codes of rank ``ndim``."""
    if axis is None:
        return ()
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _channel_count(shape: Sequence[int], axis: int | None) -> int:
    return 1 if axis is None else int(shape[axis])


def dequantize_affine(codes: Any, scales: Any, offsets: Any, axis: int | None) -> np.ndarray:
    """float32 values of 8-bit codes: ``offset + scale * q`` in float64, rounded once to float32 (the wire formula).

    Each channel's 256 possible values are computed once by that formula and the codes look them up, which gives
    the same bits several times faster than evaluating it per element.

    Args:
        codes: uint8 codes.
        scales: float32 scales, one per channel (one in all when ``axis`` is None).
        offsets: float32 offsets, as many as ``scales``.
        axis: the channel axis of ``codes``, or None for one channel.
    """
    q = np.asarray(codes, dtype=np.uint8)
    n = _channel_count(q.shape, axis)
    s = np.asarray(scales, dtype=np.float32).reshape(-1)
    o = np.asarray(offsets, dtype=np.float32).reshape(-1)
    if len(s) != n or len(o) != n:
        raise ValueError(f"codes of shape {q.shape} have {n} channel(s), but {len(s)} scales and {len(o)} offsets")
    steps = np.arange(AFFINE_MAX_CODE + 1, dtype=np.float64)
    table = (o.astype(np.float64)[:, None] + s.astype(np.float64)[:, None] * steps).astype(np.float32)
    if axis is None:
        return np.asarray(np.take(table[0], q), dtype=np.float32)
    if axis == q.ndim - 1:
        return table[np.arange(n), q]
    moved = np.moveaxis(q, axis, 0)
    out = np.empty(moved.shape, dtype=np.float32)
    for c in range(n):
        np.take(table[c], moved[c], out=out[c])
    return np.ascontiguousarray(np.moveaxis(out, 0, axis))


def affine_header(
    msg: pb.Tensor,
    name: str,
    layer_index: int,
    stride: int,
    shape: Sequence[int],
    scales: Any,
    offsets: Any,
) -> pb.Tensor:
    """Fill every field of a DTYPE_UINT8_AFFINE Tensor except ``data`` (for :func:`serialize_result`, whose payloads
    are then the uint8 codes). ``scales`` and ``offsets`` hold one float32 per channel of ``shape``."""
    shape = tuple(int(d) for d in shape)
    n = _channel_count(shape, affine_channel_axis(len(shape)))
    s = np.asarray(scales, dtype=np.float32).reshape(-1)
    o = np.asarray(offsets, dtype=np.float32).reshape(-1)
    if len(s) != n or len(o) != n:
        raise ValueError(f"a tensor of shape {shape} has {n} channel(s), but got {len(s)} scales and {len(o)} offsets")
    msg.name = name
    msg.layer_index = layer_index
    msg.stride = stride
    msg.dtype = pb.DTYPE_UINT8_AFFINE
    msg.shape[:] = shape
    msg.affine_scales[:] = s.tolist()
    msg.affine_offsets[:] = o.tolist()
    return msg


def fill_tensor_affine(
    msg: pb.Tensor,
    name: str,
    layer_index: int,
    stride: int,
    codes: Any,
    scales: Any,
    offsets: Any,
) -> pb.Tensor:
    """Fill ``msg`` with one frame's uint8 ``codes`` and their per-channel ``scales`` and ``offsets`` (from the device
    quantiser, or :func:`quantize_affine`). Returns ``msg``."""
    q = np.asarray(codes)
    if q.dtype != np.uint8:
        raise ValueError(f"affine codes must be uint8, got {q.dtype}")
    affine_header(msg, name, layer_index, stride, q.shape, scales, offsets)
    msg.data = q.tobytes(order="C")
    return msg


def _fill_codes_or_float32(msg: pb.Tensor, name: str, layer_index: int, stride: int, array: np.ndarray) -> pb.Tensor:
    """:func:`fill_tensor` for DTYPE_UINT8_AFFINE: codes of a float array, or the array as float32 when it holds
    values the codes cannot carry."""
    if array.dtype.kind != "f":
        raise ValueError(f"DTYPE_UINT8_AFFINE quantises float arrays; got {array.dtype} (pass the device quantiser's "
                         "codes to fill_tensor_affine)")
    try:
        codes = quantize_affine(array)
    except NotQuantizableError:
        return fill_tensor(msg, name, layer_index, stride, array, pb.DTYPE_FLOAT32)
    return fill_tensor_affine(msg, name, layer_index, stride, codes.codes, codes.scales, codes.offsets)


def _tensor_shape(tensor: pb.Tensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor {tensor.name!r} has a negative dimension in shape {shape}")
    return shape


def affine_from_proto(tensor: pb.Tensor, data: Any = None) -> AffineCodes:
    """The raw codes and per-channel parameters of a DTYPE_UINT8_AFFINE Tensor (its data decompressed if need be;
    ``data`` as for :func:`tensor_payload`).

    Raises ValueError for another dtype, a data size other than one byte per element, parameter counts other than
    one per channel, or a scale or offset that is not finite (or a negative scale).
    """
    if tensor.dtype != pb.DTYPE_UINT8_AFFINE:
        raise ValueError(f"tensor {tensor.name!r} is {pb.Dtype.Name(tensor.dtype)}, not DTYPE_UINT8_AFFINE")
    shape = _tensor_shape(tensor)
    axis = affine_channel_axis(len(shape))
    n = _channel_count(shape, axis)
    scales = np.asarray(tensor.affine_scales, dtype=np.float32)
    offsets = np.asarray(tensor.affine_offsets, dtype=np.float32)
    if len(scales) != n or len(offsets) != n:
        raise ValueError(f"tensor {tensor.name!r} of shape {shape} has {n} channel(s), but {len(scales)} "
                         f"affine_scales and {len(offsets)} affine_offsets")
    if not (np.isfinite(scales).all() and np.isfinite(offsets).all() and (scales >= 0).all()):
        raise ValueError(f"tensor {tensor.name!r} has a non-finite or negative affine scale or offset")
    codes = np.frombuffer(tensor_payload(tensor, data), dtype=np.uint8).reshape(shape)
    return AffineCodes(codes, scales, offsets, axis)


# Lossless compression of Tensor.data (Tensor.compression; StreamConfig.compression asks for it).

#: The optional extra that installs the codec packages.
COMPRESS_EXTRA = "compress"


class CodecMissingError(ImportError):
    """The codec a tensor is compressed with needs a package that is not installed."""


def zstd_module() -> Any:
    """The ``zstandard`` module, imported on first use; CodecMissingError (naming the extra) when it is absent."""
    try:
        import zstandard
    except ImportError as exc:
        raise CodecMissingError(
            "zstd-compressed tensors need the zstandard package: pip install 'yolostream[compress]'"
        ) from exc
    return zstandard


def is_compressed(tensor: pb.Tensor) -> bool:
    """Whether a Tensor's data is compressed (anything but COMPRESSION_UNSPECIFIED and COMPRESSION_NONE)."""
    return tensor.compression not in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE)


def element_size(dtype: int) -> int:
    """Bytes per element of a wire dtype (ValueError for an unknown one): the unit the byte shuffle groups by."""
    return ITEMSIZE[_check_dtype(dtype)]


def shuffle_bytes(data: Any, itemsize: int) -> Any:
    """Group the bytes of ``itemsize``-byte elements by significance: byte j of element i goes to j * n + i.

    Floats of one tensor share their sign and exponent bytes far more than their low mantissa bytes, so grouped
    they compress better. ``itemsize`` 1 returns ``data`` unchanged (no copy).
    """
    if itemsize == 1:
        return data
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size % itemsize:
        raise ValueError(f"{raw.size} bytes are not whole {itemsize}-byte elements")
    return raw.reshape(-1, itemsize).T.tobytes()


def unshuffle_bytes(data: Any, itemsize: int) -> Any:
    """Undo :func:`shuffle_bytes`: plain byte i * itemsize + j is shuffled byte j * n + i.

    Returns a read-only byte buffer (a memoryview). The copy goes plane by plane: a strided write per byte
    position is several times faster than letting numpy gather a transposed view.
    """
    if itemsize == 1:
        return data
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size % itemsize:
        raise ValueError(f"{raw.size} bytes are not whole {itemsize}-byte elements")
    planes = raw.reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
    for j in range(itemsize):
        out[:, j] = planes[j]
    out.flags.writeable = False
    return memoryview(out.reshape(-1))


def decompress_payload(data: Any, compression: int, uncompressed_size: int, itemsize: int) -> Any:
    """The plain bytes of a compressed Tensor.data.

    Args:
        data: the compressed bytes.
        compression: the Tensor's ``compression``.
        uncompressed_size: the size the plain bytes must have (the caller checks it against shape and dtype, so a
            frame header announcing anything else is refused before any memory is set aside for it).
        itemsize: bytes per element (:func:`element_size`), for the byte shuffle.

    Raises ValueError for an unknown codec or a payload that does not decode to ``uncompressed_size`` bytes, and
    CodecMissingError when the codec's package is not installed.
    """
    if compression in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE):
        return data
    if compression != pb.COMPRESSION_SHUFFLE_ZSTD:
        name = pb.Compression.Name(compression) if compression in pb.Compression.values() else repr(compression)
        raise ValueError(f"unsupported tensor compression {name}")
    zstd = zstd_module()
    try:
        announced = zstd.frame_content_size(data)
        if announced not in (-1, uncompressed_size):
            raise ValueError(f"the zstd frame announces {announced} bytes, uncompressed_size says {uncompressed_size}")
        plain = _decompressor(zstd).decompress(data, max_output_size=uncompressed_size)
    except zstd.ZstdError as exc:
        raise ValueError(f"corrupt zstd payload: {exc}") from None
    if len(plain) != uncompressed_size:
        raise ValueError(f"the zstd payload holds {len(plain)} bytes, uncompressed_size says {uncompressed_size}")
    return unshuffle_bytes(plain, itemsize)


_codec_state = threading.local()


def _decompressor(zstd: Any) -> Any:
    """This thread's ZstdDecompressor (a context is not safe to share between threads; reusing one is cheaper)."""
    dctx = getattr(_codec_state, "zstd_decompressor", None)
    if dctx is None:
        dctx = _codec_state.zstd_decompressor = zstd.ZstdDecompressor()
    return dctx


def tensor_payload(tensor: pb.Tensor, data: Any = None) -> Any:
    """The plain bytes of a Tensor's data, decompressed when ``compression`` says so, checked against shape × size.

    ``data``: the tensor's bytes when they are not in the message (a view of the range ``Tensor.shared_memory``
    names). Raises ValueError when the size does not match (before decompressing anything).
    """
    shape = _tensor_shape(tensor)
    itemsize = element_size(tensor.dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * itemsize
    data = tensor.data if data is None else data
    if is_compressed(tensor):
        if tensor.uncompressed_size != expected:
            raise ValueError(f"tensor {tensor.name!r}: uncompressed_size {tensor.uncompressed_size}, but shape "
                             f"{shape} of {pb.Dtype.Name(tensor.dtype)} needs {expected} bytes")
        return decompress_payload(data, tensor.compression, expected, itemsize)
    if memoryview(data).nbytes != expected:
        raise ValueError(f"tensor {tensor.name!r}: {memoryview(data).nbytes} data bytes, but shape {shape} of "
                         f"{pb.Dtype.Name(tensor.dtype)} needs {expected}")
    return data


def decode_tensor(tensor: pb.Tensor, data: Any = None) -> np.ndarray:
    """The values of any Tensor: its data decompressed when compressed, DTYPE_UINT8_AFFINE codes decoded to float32.

    Plain float32/float16 give a read-only view (as :func:`tensor_from_proto`), bfloat16 and affine codes a new
    float32 array. :func:`affine_from_proto` gives the raw codes and parameters instead. ``data`` as for
    :func:`tensor_payload`.
    """
    if tensor.dtype == pb.DTYPE_UINT8_AFFINE:
        return affine_from_proto(tensor, data).dequantize()
    dtype = _check_dtype(tensor.dtype)
    shape = _tensor_shape(tensor)
    data = tensor_payload(tensor, data)
    if dtype == pb.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(np.frombuffer(data, dtype=_BF16_STORAGE)).reshape(shape)
    return np.frombuffer(data, dtype=_NUMPY_DTYPES[dtype]).reshape(shape)
