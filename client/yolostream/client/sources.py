"""Frame sources read through OpenCV: a camera index, a video file, a network stream URL, or images.

``open_source(spec)`` opens the source at once, so that a camera that cannot be opened or a missing file fails
before anything connects, and reports fps and frame count when they are known. Iterating yields
``(bgr_frame, capture_time_s)`` pairs and releases the capture at the end, on error or when closed early. A file
simply ends. Timestamps are wall-clock ``time.time()`` for live sources and images, the position in the video
(frame index / fps) for files.

Live sources (a camera, or an RTSP/HTTP URL without a frame count) survive their camera: one that stops delivering
frames (unplugged, rebooted, network cut, server restarted) is reopened with backoff, as DeepStream's
``rtsp-reconnect-interval-sec`` does for RTSP, and iteration simply resumes when frames come again: frames never
captured are absent, and a stream fed by the source stays open throughout. ``Source.reconnects`` and
``Source.gap_s`` count the outages. Only after ``give_up_after`` seconds without a frame does iteration raise one
:class:`SourceError` naming the source. Network sources are opened and read with bounded waits (``timeout``: OpenCV's
FFmpeg open and read timeouts), so a dead or frozen server is noticed in seconds rather than blocking for OpenCV's
default 30 s per attempt. Descriptions and errors show a URL without its password (or password-like query values)
and cut to :data:`DESCRIPTION_LIMIT` characters.

Frames of image sources are :class:`ImageFile` arrays: read-only, and holding the JPEG or PNG file's bytes, which
``FeatureClient`` sends unchanged when the stream's encoding is the file's own (exact features, no re-encoding).
"""

from __future__ import annotations

import glob
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import cv2
import numpy as np

from yolostream.v1.vocab import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")

#: Seconds a network source (RTSP, HTTP …) may take to open, and to deliver each frame, before the attempt fails
#: (OpenCV's ``CAP_PROP_OPEN_TIMEOUT_MSEC`` / ``CAP_PROP_READ_TIMEOUT_MSEC``; its own default is 30 s each).
SOURCE_TIMEOUT_S = 10.0
#: Seconds a live source may go without a frame, being reopened meanwhile, before iteration raises SourceError:
#: long enough for an IP camera to reboot or a network to come back.
GIVE_UP_AFTER_S = 60.0
#: The wait before the first reopening of a lost live source, doubled after each failed one up to RECONNECT_MAX_S.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0
#: Longest source description (and so the longest piece of a source spec that any message repeats).
DESCRIPTION_LIMIT = 160
#: Query parameters whose values are secrets in camera URLs (``?user=admin&pwd=…``, ``?token=…``).
_SECRET_QUERY = re.compile(r"pass|pwd|token|secret|key|auth|sig", re.IGNORECASE)


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
    """An opened frame source. ``frame_count`` is None when unknown (cameras, live streams).

    A live source that stops delivering frames is reopened (see the module doc) while ``reconnecting`` is True;
    ``reconnects`` counts the reopenings and ``gap_s`` the seconds spent without frames between the last frame before
    each outage and the first one after it (an outage still going on included), so that they can be reported.
    ``give_up_after`` is how long one outage may last (0: the first failed read raises; None: never give up).
    """

    description: str
    kind: str  # "camera" | "video" | "stream" | "images"
    fps: float | None
    frame_count: int | None  # frames this source will give (capped by max_frames), None when unknown
    max_frames: int | None = None
    live: bool = False  # frames come from the world as they happen: a camera, or a stream of unknown length
    _capture: cv2.VideoCapture | None = field(default=None, repr=False)
    _paths: list[Path] = field(default_factory=list, repr=False)
    _reading: bool = field(default=False, repr=False)
    give_up_after: float | None = 0.0
    reconnects: int = 0
    _open: Callable[[], cv2.VideoCapture | None] | None = field(default=None, repr=False)
    _lost_at: float | None = field(default=None, repr=False)  # monotonic time of the last frame before an outage
    _gaps_s: float = field(default=0.0, repr=False)  # seconds without frames in the outages that ended
    _backoff_s: float = field(default=RECONNECT_FIRST_S, repr=False)
    _closed: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def reconnecting(self) -> bool:
        """True while the source has lost its frames and is being reopened."""
        return self._lost_at is not None

    @property
    def gap_s(self) -> float:
        """Seconds without frames over every outage so far, the one going on included."""
        ongoing = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
        return self._gaps_s + ongoing

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
        if self._capture is None:
            raise SourceError(f"{self.description} is closed")
        count = 0
        last_frame = time.monotonic()  # a source that never delivers is timed from its opening
        try:
            while self.max_frames is None or count < self.max_frames:
                cap = self._capture
                if cap is None or self._closed.is_set():  # closed from another thread
                    return
                self._reading = True
                try:
                    ok, frame = cap.read()
                finally:
                    self._reading = False
                if not ok or frame is None:
                    if self.live:
                        if not self._reconnect(last_frame, count):
                            return
                        continue
                    if count == 0:
                        raise SourceError(f"cannot read any frame from {self.description}")
                    return
                last_frame = time.monotonic()
                if self._lost_at is not None:
                    self._recovered(last_frame)
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

    def _reconnect(self, last_frame: float, count: int) -> bool:
        """After a failed read of a live source: reopen it, waiting between attempts with backoff, until one opens
        (True) or the source is closed from another thread (False). Raises SourceError once ``give_up_after``
        seconds have passed since the last frame."""
        if self._lost_at is None:
            self._lost_at = last_frame
            if self.give_up_after != 0:
                log.warning("%s stopped delivering frames after %d frame(s); reopening it (giving up after %s)",
                            self.description, count, _seconds(self.give_up_after))
        self._release_capture()
        while True:
            without = time.monotonic() - self._lost_at
            if self.give_up_after == 0 or self._open is None:
                raise SourceError(f"{self.description} stopped delivering frames after {count} frame(s) "
                                  "(disconnected or in use by another program?)")
            if self.give_up_after is not None and without >= self.give_up_after:
                raise SourceError(f"{self.description} delivered no frame for {without:.1f} s after {count} "
                                  f"frame(s) and {self.reconnects} reconnect(s): gave up after "
                                  f"{_seconds(self.give_up_after)} (give_up_after, --give-up-after)")
            left = self.give_up_after - without if self.give_up_after is not None else self._backoff_s
            if self._closed.wait(max(0.0, min(self._backoff_s, left))):
                return False
            self._backoff_s = min(2 * self._backoff_s, RECONNECT_MAX_S)
            self._reading = True
            try:
                cap = self._open()
            finally:
                self._reading = False
            if cap is None:
                continue
            if self._closed.is_set():
                cap.release()
                return False
            self._capture = cap
            self.reconnects += 1
            return True

    def _recovered(self, now: float) -> None:
        """The first frame after an outage: add its length to ``gap_s`` and reset the backoff."""
        gap = now - self._lost_at
        self._gaps_s += gap
        self._lost_at = None
        self._backoff_s = RECONNECT_FIRST_S
        log.warning("%s delivers frames again after %.1f s without (reconnect %d)", self.description, gap,
                    self.reconnects)

    def _release_capture(self) -> None:
        """Release the lost capture from the reading thread (marked as reading, so ``close`` leaves it alone)."""
        self._reading = True
        try:
            if self._capture is not None:
                self._capture.release()
                self._capture = None
        finally:
            self._reading = False

    def close(self) -> None:
        """Release the capture, unless a read is still inside it on another thread (a camera hanging in
        ``read()`` after the stream gave up on it): releasing under that read can crash OpenCV, so the capture
        is then left to be released when the reading thread returns (its loop closes the source) or at exit.
        A source waiting to reopen stops waiting."""
        self._closed.set()
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


def _capture_opener(target: int | str, kind: str, timeout: float) -> Callable[[], cv2.VideoCapture | None]:
    """A function that opens ``target`` afresh and returns the capture, or None when it does not open.

    Network streams get OpenCV's open and read timeouts (``timeout`` seconds each; the FFmpeg and GStreamer
    backends honour them), so neither opening a dead server nor reading a frozen one blocks longer. Cameras are
    opened plainly: their backends refuse those parameters, and V4L2 bounds a read itself (10 s,
    ``OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT``). Files need no bound.
    """
    if kind == "stream":
        ms = max(1, int(round(timeout * 1000)))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]

        def make() -> cv2.VideoCapture:
            return cv2.VideoCapture(target, cv2.CAP_ANY, params)
    else:
        def make() -> cv2.VideoCapture:
            return cv2.VideoCapture(target)

    def opener() -> cv2.VideoCapture | None:
        cap = make()
        if cap.isOpened():
            return cap
        cap.release()
        return None

    return opener


def _open_capture(target: int | str, description: str, kind: str, max_frames: int | None,
                  give_up_after: float | None, timeout: float) -> Source:
    opener = _capture_opener(target, kind, timeout)
    cap = opener()
    if cap is None:
        if kind == "camera":
            raise SourceError(f"cannot open {description}: no such device, no permission, or in use by another "
                              "program")
        raise SourceError(f"cannot open {description}: OpenCV cannot read it (not a video, unsupported codec "
                          f"or protocol, or no answer within {_seconds(timeout)})" if kind == "stream" else
                          f"cannot open {description}: OpenCV cannot read it (not a video, or unsupported codec "
                          "or protocol)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frame_count = count if count > 0 and kind != "camera" else None
    live = frame_count is None and kind != "video"
    return Source(description, kind, fps if fps and fps > 0 and np.isfinite(fps) else None,
                  _capped(frame_count, max_frames), max_frames, live=live, _capture=cap,
                  give_up_after=give_up_after if live else 0.0, _open=opener if live else None)


def open_source(spec: str | int, *, max_frames: int | None = None, give_up_after: float | None = GIVE_UP_AFTER_S,
                timeout: float = SOURCE_TIMEOUT_S) -> Source:
    """Open a camera index (``0`` or ``"0"``), a video file, an RTSP/HTTP(S) URL, an image, a folder of images or
    a glob pattern (``"frames/*.png"``, sorted by name).

    Args:
        spec: what to read (see above).
        max_frames: stop after that many frames.
        give_up_after: seconds a live source (camera, or a URL of unknown length) may go without a frame, being
            reopened with backoff meanwhile, before iteration raises SourceError; it then gives up within about
            ``give_up_after + timeout``. 0 raises at the first failed read (no reconnection); None (or ``inf``)
            never gives up. Files and images ignore it.
        timeout: seconds a network source may take to open and to deliver each frame before that attempt fails
            (and a live one is reopened).
    """
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0, got {max_frames}")
    if give_up_after is not None and (give_up_after != give_up_after or give_up_after < 0):
        raise ValueError(f"give_up_after must be >= 0 seconds (or None: never), got {give_up_after}")
    if give_up_after == float("inf"):
        give_up_after = None
    if not timeout > 0 or timeout == float("inf"):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        return _open_capture(index, f"camera {index}", "camera", max_frames, give_up_after, timeout)
    spec = str(spec)
    if "://" in spec:
        return _open_capture(spec, f"stream {redact_url(spec)}", "stream", max_frames, give_up_after, timeout)
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
    return _open_capture(str(path), f"video {path}", "video", max_frames, give_up_after, timeout)


def redact_url(url: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``url`` fit to print: its password and password-like query values (``pwd``, ``token`` …) replaced by
    ``***``, and cut to ``limit`` characters, because descriptions reach logs, errors and ``--save``'s meta.json."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_SECRET_QUERY.search(key) for key, _ in pairs):
                query = urlencode([(key, "***" if _SECRET_QUERY.search(key) else value) for key, value in pairs],
                                  safe="*")
        shown = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not parseable (a bad port, say): keep only the scheme, which cannot hold a secret
        shown = url.partition("://")[0] + "://…"
    return shown if len(shown) <= limit else shown[:limit - 1] + "…"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:g} s"
