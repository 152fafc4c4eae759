"""Turning a wire Frame into a BGR image, within explicit limits.

Runs in a thread pool (OpenCV releases the GIL while decoding). Every problem is a FrameError naming what was
wrong, so it fails that frame and not the stream. Encoded images have their dimensions read from the header
before decoding, so a small file that claims a gigapixel image is refused without allocating it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

from yolostream.v1 import feature_service_pb2 as pb

from ..common.object_request import MAX_CLIENT_BOXES


class FrameError(ValueError):
    """This frame cannot be used; the stream goes on."""


@dataclass(frozen=True)
class FrameLimits:
    """Size limits on one frame; documented in the README and reported by GetModelInfo."""

    max_pixels: int = 4096 * 4096
    max_frame_bytes: int = 64 * 1024 * 1024
    max_side: int = 16384
    max_boxes: int = MAX_CLIENT_BOXES

    def check_bytes(self, size: int, what: str) -> None:
        """``max_frame_bytes`` holds for encoded and raw frames alike (the proto says "encoded or raw")."""
        if size > self.max_frame_bytes:
            raise FrameError(f"{what} is {size} bytes, over the server limit of {self.max_frame_bytes} bytes per frame")

    def check_size(self, height: int, width: int, what: str) -> None:
        if height <= 0 or width <= 0:
            raise FrameError(f"{what} has an empty size {width}x{height}")
        if height > self.max_side or width > self.max_side or height * width > self.max_pixels:
            raise FrameError(f"{what} is {width}x{height} = {width * height} pixels, over the server limit of "
                             f"{self.max_pixels} pixels and {self.max_side} per side")


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers carry the image size; C4 (huffman), C8 (reserved) and CC (arithmetic) do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encoded_size(data: bytes) -> tuple[str, int, int]:
    """(format, height, width) from a PNG or JPEG header, without decoding pixels."""
    if data[:8] == _PNG_MAGIC:
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise FrameError("truncated PNG header")
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", height, width
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                raise FrameError("corrupt JPEG: bad marker")
            marker = data[i + 1]
            if marker == 0xFF:
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack(">H", data[i + 2:i + 4])
            if marker in _JPEG_SOF:
                if i + 9 > len(data):
                    break
                height, width = struct.unpack(">HH", data[i + 5:i + 9])
                return "JPEG", height, width
            i += 2 + length
        raise FrameError("corrupt or truncated JPEG: no frame header found")
    raise FrameError(f"encoded data is not a JPEG or PNG image (starts with {data[:4].hex()})")


def decode_frame(frame: pb.Frame, limits: FrameLimits) -> np.ndarray:
    """The frame's pixels as an HxWx3 BGR uint8 array, or a FrameError saying what is wrong."""
    kind = frame.WhichOneof("data")
    if kind == "encoded":
        data = frame.encoded
        if not data:
            raise FrameError("encoded image is empty")
        limits.check_bytes(len(data), "encoded image")
        fmt, height, width = encoded_size(data)
        limits.check_size(height, width, f"{fmt} image")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise FrameError(f"could not decode the {fmt} image ({len(data)} bytes): corrupt data?")
        return image
    if kind == "raw":
        return _raw_to_bgr(frame.raw, limits)
    raise FrameError("frame carries no image: set 'encoded' (JPEG/PNG bytes) or 'raw'")


_CHANNELS = {pb.PIXEL_FORMAT_BGR: 3, pb.PIXEL_FORMAT_RGB: 3, pb.PIXEL_FORMAT_GRAY: 1}


def raw_channels(fmt: int, channels: int, height: int, width: int, limits: FrameLimits, what: str) -> int:
    """Check the header of uncompressed pixels (in a message or in a client's shared memory) against the limits;
    the number of bytes they take, height * width * channels. FrameError names what is wrong.

    Args:
        fmt: the PixelFormat.
        channels: the channels the frame claims (0: the format's own).
        height, width: the frame's size.
        limits: the server's frame limits.
        what: how errors name the frame, e.g. "raw image".
    """
    if fmt not in _CHANNELS:
        raise FrameError(f"{what} needs a pixel format: PIXEL_FORMAT_BGR, PIXEL_FORMAT_RGB or PIXEL_FORMAT_GRAY")
    own = _CHANNELS[fmt]
    if channels and channels != own:
        raise FrameError(f"{what} {pb.PixelFormat.Name(fmt)} has {own} channel(s), but the frame says {channels}")
    limits.check_size(height, width, what)
    expected = height * width * own
    limits.check_bytes(expected, f"a {what} of {width}x{height}x{own}")
    return expected


def pixels_to_bgr(pixels: np.ndarray, fmt: int) -> np.ndarray:
    """HxWxC pixels of ``fmt`` as the HxWx3 BGR image the letterbox takes (BGR pixels as they are, no copy)."""
    if fmt == pb.PIXEL_FORMAT_GRAY:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if fmt == pb.PIXEL_FORMAT_RGB:
        return np.ascontiguousarray(pixels[:, :, ::-1])
    return pixels


def _raw_to_bgr(raw: pb.RawImage, limits: FrameLimits) -> np.ndarray:
    # Read the bytes once: each access to a bytes field of a protobuf (upb) message returns a new copy.
    data = raw.data
    limits.check_bytes(len(data), "raw image data")
    expected = raw_channels(raw.format, raw.channels, raw.height, raw.width, limits, "raw image")
    if len(data) != expected:
        raise FrameError(f"raw image data is {len(data)} bytes, but {raw.width}x{raw.height}x"
                         f"{expected // (raw.width * raw.height)} needs {expected}")
    pixels = np.frombuffer(data, np.uint8).reshape(raw.height, raw.width, -1)
    return pixels_to_bgr(pixels, raw.format)
