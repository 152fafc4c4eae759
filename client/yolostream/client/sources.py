"""Frame sources read through OpenCV: a camera index, a video file, a network stream URL, or images.

``open_source(spec)`` opens the source at once, so that a camera that cannot be opened or a missing file fails
before anything connects, and reports fps and frame count when they are known. Iterating yields
``(bgr_frame, capture_time_s)`` pairs and releases the capture at the end, on error or when closed early. A live
source (camera, or a URL without a frame count) that stops delivering frames raises :class:`SourceError`; a file
simply ends. Timestamps are wall-clock ``time.time()`` for live sources and images, the position in the video
(frame index / fps) for files.

Frames of image sources are :class:`ImageFile` arrays: read-only, and holding the JPEG or PNG file's bytes, which
``FeatureClient`` sends unchanged when the stream's encoding is the file's own (exact features, no re-encoding).
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from yolostream.v1.vocab import IMAGE_SUFFIXES

_GLOB_CHARS = frozenset("*?[")


#: The encodings a file can be sent as unchanged, by the magic bytes that start such a file.
_FILE_FORMATS = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"))


class ImageFile(np.ndarray):
    """A frame decoded from an image file that still holds the file's bytes, so that they can be sent unchanged.

    Re-encoding a JPEG changes its pixels (and the features, by several percent in the first layers), while the
    server decodes a file's own bytes exactly as ``yolostream extract`` reads the file. The array is read-only so
    that the bytes always match the pixels; a view or a copy of it is a plain image without them.
    """

    file_bytes: bytes | None = None
    file_format: str | None = None

    def __array_finalize__(self, obj: np.ndarray | None) -> None:
        self.file_bytes = None
        self.file_format = None

    @classmethod
    def read(cls, path: Path) -> "ImageFile":
        """Decode ``path`` as OpenCV's ``imread`` does, keeping its bytes when it is a JPEG or PNG file."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SourceError(f"cannot read image {path}: {err.strerror or err}") from err
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
        if decoded is None:
            raise SourceError(f"cannot decode image {path}")
        image = decoded.view(cls)
        image.flags.writeable = False
        image.file_format = next((name for magic, name in _FILE_FORMATS if data.startswith(magic)), None)
        image.file_bytes = data if image.file_format is not None else None
        return image


def file_bytes(image: np.ndarray, encoding: str) -> bytes | None:
    """The bytes of the file ``image`` was read from, when ``encoding`` is that file's own format; else None."""
    if isinstance(image, ImageFile) and image.file_format == encoding and not image.flags.writeable:
        return image.file_bytes
    return None


class SourceError(OSError):
    """A source that cannot be opened or read: missing file, busy camera, camera unplugged, broken image."""


@dataclass
class Source:
    """An opened frame source. ``frame_count`` is None when unknown (cameras, live streams)."""

    description: str
    kind: str  # "camera" | "video" | "stream" | "images"
    fps: float | None
    frame_count: int | None  # frames this source will give (capped by max_frames), None when unknown
    max_frames: int | None = None
    live: bool = False  # frames come from the world as they happen: a camera, or a stream of unknown length
    _capture: cv2.VideoCapture | None = field(default=None, repr=False)
    _paths: list[Path] = field(default_factory=list, repr=False)
    _reading: bool = field(default=False, repr=False)

    def label(self, index: int) -> str | None:
        """The file a frame came from (image sources only)."""
        return str(self._paths[index]) if self.kind == "images" and index < len(self._paths) else None

    def __iter__(self) -> Iterator[tuple[np.ndarray, float]]:
        if self.kind == "images":
            return self._iter_images()
        return self._iter_capture()

    def _iter_images(self) -> Iterator[tuple[np.ndarray, float]]:
        for index, path in enumerate(self._paths):
            if self.max_frames is not None and index >= self.max_frames:
                return
            yield ImageFile.read(path), time.time()

    def _iter_capture(self) -> Iterator[tuple[np.ndarray, float]]:
        cap = self._capture
        if cap is None:
            raise SourceError(f"{self.description} is closed")
        count = 0
        try:
            while self.max_frames is None or count < self.max_frames:
                self._reading = True
                try:
                    ok, frame = cap.read()
                finally:
                    self._reading = False
                if not ok or frame is None:
                    if self.live:
                        raise SourceError(f"{self.description} stopped delivering frames after {count} frame(s) "
                                          "(disconnected or in use by another program?)")
                    if count == 0:
                        raise SourceError(f"cannot read any frame from {self.description}")
                    return
                if self.live:
                    stamp = time.time()
                elif self.fps:
                    stamp = count / self.fps
                else:
                    stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                yield frame, stamp
                count += 1
        finally:
            self.close()

    def close(self) -> None:
        """Release the capture, unless a read is still inside it on another thread (a camera hanging in
        ``read()`` after the stream gave up on it): releasing under that read can crash OpenCV, so the capture
        is then left to be released when the reading thread returns (its loop closes the source) or at exit."""
        if self._capture is not None and not self._reading:
            self._capture.release()
            self._capture = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _images_in(paths: list[Path]) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _capped(count: int | None, max_frames: int | None) -> int | None:
    if max_frames is None:
        return count
    return min(count, max_frames) if count is not None else max_frames


def _open_capture(target: int | str, description: str, kind: str, max_frames: int | None) -> Source:
    cap = cv2.VideoCapture(target)
    if not cap.isOpened():
        cap.release()
        if kind == "camera":
            raise SourceError(f"cannot open {description}: no such device, no permission, or in use by another "
                              "program")
        raise SourceError(f"cannot open {description}: OpenCV cannot read it (not a video, or unsupported codec "
                          "or protocol)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frame_count = count if count > 0 and kind != "camera" else None
    return Source(description, kind, fps if fps and fps > 0 and np.isfinite(fps) else None,
                  _capped(frame_count, max_frames), max_frames, live=frame_count is None and kind != "video",
                  _capture=cap)


def open_source(spec: str | int, *, max_frames: int | None = None) -> Source:
    """Open a camera index (``0`` or ``"0"``), a video file, an RTSP/HTTP(S) URL, an image, a folder of images or
    a glob pattern (``"frames/*.png"``, sorted by name). ``max_frames`` stops after that many frames."""
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        return _open_capture(index, f"camera {index}", "camera", max_frames)
    spec = str(spec)
    if "://" in spec:
        return _open_capture(spec, f"stream {spec}", "stream", max_frames)
    path = Path(spec).expanduser()
    if path.is_dir():
        images = _images_in(list(path.iterdir()))
        if not images:
            raise SourceError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return Source(f"{len(images)} image(s) in {path}", "images", None, _capped(len(images), max_frames),
                      max_frames, _paths=images)
    if _GLOB_CHARS & set(spec) and not path.exists():
        images = _images_in([Path(p) for p in glob.glob(str(path), recursive=True)])
        if not images:
            raise SourceError(f"no images match {spec}")
        return Source(f"{len(images)} image(s) matching {spec}", "images", None, _capped(len(images), max_frames),
                      max_frames, _paths=images)
    if not path.exists():
        raise SourceError(f"no such file, folder or camera: {spec}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return Source(f"image {path}", "images", None, _capped(1, max_frames), max_frames, _paths=[path])
    return _open_capture(str(path), f"video {path}", "video", max_frames)
