"""Turn a ``--weights`` value into a local file, fetching official release names once into a cache.

A bare official name (``yolov5s.pt``) that is not a local file is downloaded from the YOLOv5 v7.0 release
assets, because that is what users type after reading upstream's docs. The download streams into a temporary
file beside its destination and is renamed only when complete, so an interrupted or failed fetch never
leaves a truncated file that a later run would trust.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ..common.errors import UserError

__all__ = [
    "DEFAULT_BASE_URL",
    "WeightsUnavailableError",
    "default_cache_dir",
    "is_official_name",
    "resolve_weights",
]

DEFAULT_BASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0"
BASE_URL_ENV = "YOLOSTREAM_WEIGHTS_URL"
CACHE_ENV = "YOLOSTREAM_CACHE"
TIMEOUT_S = 30.0
_CHUNK = 1 << 16

# yolov5n.pt, yolov5s6.pt, yolov5m-seg.pt, yolov5l-cls.pt ...; a plain file name, safe to put in a URL.
_OFFICIAL_NAME = re.compile(r"yolov5[A-Za-z0-9_-]*\.pt")

# A torch file starts as a zip (torch>=1.6) or a pickle (older); anything else is an error page or a proxy reply.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


class WeightsUnavailableError(UserError, RuntimeError):
    """An official weights file is neither cached nor downloadable; the message says where to put it by hand.

    A UserError (one line, exit 2); still a RuntimeError for callers written before that base existed.
    """


def default_cache_dir() -> Path:
    """``$YOLOSTREAM_CACHE`` or ``~/.cache/yolostream``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "yolostream").expanduser()


def is_official_name(spec: str) -> bool:
    """True for a bare release asset name such as ``yolov5s.pt`` (no directory part)."""
    return _OFFICIAL_NAME.fullmatch(spec) is not None


def resolve_weights(
    spec: str,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """A local path for ``spec``: the file itself if it exists, else the cached or freshly downloaded release asset."""
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    if not is_official_name(spec):
        raise FileNotFoundError(
            f"weights file not found: {spec} (give an existing path, or an official name such as yolov5s.pt)"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = cache / spec
    if dest.is_file():
        return dest
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    url = f"{base.rstrip('/')}/{spec}"
    try:
        _download(url, dest, progress)
    except _DownloadFailed as err:
        raise WeightsUnavailableError(
            f"could not download {spec} from {url}: {err}. Download it yourself and save it as {dest} "
            f"(or set {CACHE_ENV} to another cache folder), or pass a local path to the weights file."
        ) from err.__cause__
    return dest


class _DownloadFailed(Exception):
    """Internal: why a download failed, in words; the caller adds the URL and the manual-placement advice."""


def _download(url: str, dest: Path, progress: bool) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as err:
        raise _DownloadFailed(f"cannot write to the cache folder {dest.parent} ({err})") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(url, out, dest.name, progress)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, out, label: str, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "yolostream"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            written = 0
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                file=sys.stderr, disable=not progress, leave=False,
            ) as bar:
                while chunk := response.read(_CHUNK):
                    if written == 0 and not chunk.startswith(_TORCH_MAGIC):
                        raise _DownloadFailed("the server sent something that is not a PyTorch file")
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as err:
        raise _DownloadFailed(f"HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise _DownloadFailed(f"{err.reason}") from err
    except (OSError, http.client.HTTPException) as err:
        raise _DownloadFailed(f"{type(err).__name__}: {err}") from err
    if written == 0:
        raise _DownloadFailed("the server sent an empty file")
    if total is not None and written != total:
        raise _DownloadFailed(f"the transfer stopped after {written} of {total} bytes")
