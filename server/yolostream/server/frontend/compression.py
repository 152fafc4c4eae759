"""Server side of Tensor.data compression: compress a tensor's bytes when its stream asked, never send them grown.

A stream opts in with ``StreamConfig.compression``; a stream that did not gets plain bytes, always. Each tensor is
compressed on its own and sent plain whenever compressing would not make its Tensor message smaller, so
``Tensor.compression`` says per tensor what the client has to undo (``yolostream.v1.wire.decode_tensor`` does).

numpy and the codec only (no torch, no grpc): it runs in the front-end processes. The codec package (``zstandard``,
the ``compress`` extra) is imported the first time a stream asks for it. zstd releases the GIL while it works, so
front-ends may run ``compress_tensor`` on a thread pool.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import wire

#: zstd level for COMPRESSION_SHUFFLE_ZSTD. Chosen by bench/codec_bench.py on yolov5n replies: level 1 compresses
#: 8-bit codes at several hundred MB/s per core with a ratio within a few percent of level 3 (see its JSON).
DEFAULT_ZSTD_LEVEL = 1

#: Codecs this module can produce.
SUPPORTED = frozenset({pb.COMPRESSION_SHUFFLE_ZSTD})

_state = threading.local()


@dataclass(frozen=True)
class Payload:
    """What goes into one Tensor: ``data`` (the compressed bytes, or the payload itself when sent plain),
    ``compression`` (the Tensor.compression to set; COMPRESSION_UNSPECIFIED for plain) and ``uncompressed_size``
    (the Tensor field; 0 for plain)."""

    data: Any
    compression: int
    uncompressed_size: int


def wants_compression(codec: int) -> bool:
    """Whether a StreamConfig.compression value asks for compression (unspecified and none do not)."""
    return codec not in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE)


def check_codec(codec: int) -> None:
    """Raise ValueError for a codec this server does not know, CodecMissingError when its package is not
    installed (the message names the extra); return quietly for none/unspecified and for an available codec.
    Meant for validating a StreamConfig before its first frame."""
    if not wants_compression(codec):
        return
    if codec not in SUPPORTED:
        name = pb.Compression.Name(codec) if codec in pb.Compression.values() else repr(codec)
        raise ValueError(f"unsupported compression {name}")
    wire.zstd_module()


def codec_available(codec: int) -> bool:
    """Whether ``codec`` can be produced here (none/unspecified always can)."""
    try:
        check_codec(codec)
    except (ValueError, ImportError):
        return False
    return True


def _fields_overhead(size: int) -> int:
    """Bytes that Tensor.compression and Tensor.uncompressed_size add to a message: a one-byte tag and a varint each
    (the codec's varint is one byte; the size's takes 7 bits per byte)."""
    return 2 + 1 + max(1, (size.bit_length() + 6) // 7)


def _compressor(level: int) -> Any:
    """This thread's ZstdCompressor for ``level`` (contexts are not thread-safe; reusing one saves its set-up)."""
    cache = getattr(_state, "compressors", None)
    if cache is None:
        cache = _state.compressors = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = wire.zstd_module().ZstdCompressor(level=level, write_content_size=True)
    return cctx


def compress_payload(payload: Any, itemsize: int, codec: int, level: int = DEFAULT_ZSTD_LEVEL) -> Payload:
    """Compress one tensor's plain bytes with ``codec``, or keep them plain when that would not make the Tensor
    message smaller.

    Args:
        payload: the plain bytes (any C-contiguous buffer: bytes, a numpy array, a view of shared memory).
        itemsize: bytes per element (``wire.element_size(dtype)``), for the byte shuffle.
        codec: the stream's StreamConfig.compression; unspecified or none returns the payload plain, untouched.
        level: the zstd level.

    Raises ValueError for an unknown codec and CodecMissingError when its package is missing (``check_codec``
    at stream start avoids both here).
    """
    plain = memoryview(payload).cast("B")
    if not wants_compression(codec):
        return Payload(payload, pb.COMPRESSION_UNSPECIFIED, 0)
    check_codec(codec)
    size = plain.nbytes
    packed = _compressor(level).compress(wire.shuffle_bytes(plain, itemsize))
    if len(packed) + _fields_overhead(size) >= size:
        return Payload(payload, pb.COMPRESSION_UNSPECIFIED, 0)
    return Payload(packed, codec, size)


def compress_tensor(msg: pb.Tensor, payload: Any, codec: int, level: int = DEFAULT_ZSTD_LEVEL) -> Any:
    """Set ``msg.compression`` and ``msg.uncompressed_size`` for ``payload`` (the tensor's plain bytes; ``msg.dtype``
    must be set) and return the bytes to put in ``msg.data``, or to hand to ``wire.serialize_result``."""
    out = compress_payload(payload, wire.element_size(msg.dtype), codec, level)
    msg.compression = out.compression
    msg.uncompressed_size = out.uncompressed_size
    return out.data
