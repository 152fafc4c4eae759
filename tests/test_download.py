"""Weights resolution: local paths, cached release names, and downloads from a loopback HTTP server."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from yolostream.server.model.download import WeightsUnavailableError, is_official_name, resolve_weights

PAYLOAD = b"PK\x03\x04" + bytes(range(256)) * 300  # looks like a torch zip; ~77 kB, several read chunks
HTML = b"<html>rate limited</html>"


class _Handler(BaseHTTPRequestHandler):
    """Serves /w/yolov5n.pt; /w/yolov5short.pt promises more bytes than it sends; /w/yolov5html.pt is a page."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        if self.path == "/w/yolov5n.pt":
            self._reply(PAYLOAD, len(PAYLOAD))
        elif self.path == "/w/yolov5short.pt":
            self._reply(PAYLOAD[:1000], len(PAYLOAD))
            self.close_connection = True
        elif self.path == "/w/yolov5html.pt":
            self._reply(HTML, len(HTML))
        else:
            self.send_error(404, "Not Found")

    def _reply(self, body: bytes, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}/w"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_then_cache_hit(tmp_path, server):
    httpd, base = server
    cache = tmp_path / "cache"
    first = resolve_weights("yolov5n.pt", cache_dir=cache, base_url=base, progress=True)
    assert first == cache / "yolov5n.pt"
    assert first.read_bytes() == PAYLOAD
    assert httpd.requests == ["/w/yolov5n.pt"]
    second = resolve_weights("yolov5n.pt", cache_dir=cache, base_url=base, progress=False)
    assert second == first
    assert httpd.requests == ["/w/yolov5n.pt"]
    assert _cache_files(cache) == ["yolov5n.pt"]


def test_env_vars_give_base_url_and_cache(tmp_path, server, monkeypatch):
    httpd, base = server
    monkeypatch.setenv("YOLOSTREAM_WEIGHTS_URL", base)
    monkeypatch.setenv("YOLOSTREAM_CACHE", str(tmp_path / "envcache"))
    path = resolve_weights("yolov5n.pt", progress=False)
    assert path == tmp_path / "envcache" / "yolov5n.pt"
    assert path.read_bytes() == PAYLOAD


def test_http_404_names_url_and_cache_path(tmp_path, server):
    httpd, base = server
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("yolov5x6.pt", cache_dir=cache, base_url=base, progress=False)
    message = str(info.value)
    assert f"{base}/yolov5x6.pt" in message and "404" in message
    assert str(cache / "yolov5x6.pt") in message
    assert _cache_files(cache) == []


@pytest.mark.parametrize("name", ["yolov5short.pt", "yolov5html.pt"])
def test_truncated_or_non_torch_reply_leaves_nothing(tmp_path, server, name):
    httpd, base = server
    cache = tmp_path / "cache"
    with pytest.raises(WeightsUnavailableError, match=name):
        resolve_weights(name, cache_dir=cache, base_url=base, progress=False)
    assert httpd.requests == [f"/w/{name}"]
    assert _cache_files(cache) == []


def test_closed_port_is_unavailable(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cache = tmp_path / "cache"
    url = f"http://127.0.0.1:{port}/w"
    with pytest.raises(WeightsUnavailableError) as info:
        resolve_weights("yolov5s.pt", cache_dir=cache, base_url=url, progress=False)
    assert f"{url}/yolov5s.pt" in str(info.value) and str(cache / "yolov5s.pt") in str(info.value)
    assert _cache_files(cache) == []


def test_existing_local_file_is_returned_untouched(tmp_path, server):
    httpd, base = server
    local = tmp_path / "yolov5n.pt"
    local.write_bytes(b"mine")
    assert resolve_weights(str(local), cache_dir=tmp_path / "cache", base_url=base) == local
    assert local.read_bytes() == b"mine"
    assert httpd.requests == []


def test_unknown_missing_name_is_file_not_found(tmp_path, server):
    httpd, base = server
    for spec in ("best.pt", str(tmp_path / "yolov5s.pt"), "weights/yolov5s.pt"):
        with pytest.raises(FileNotFoundError, match="best.pt|yolov5s.pt"):
            resolve_weights(spec, cache_dir=tmp_path / "cache", base_url=base)
    assert httpd.requests == []


@pytest.mark.parametrize("spec, official", [
    ("yolov5s.pt", True), ("yolov5n6.pt", True), ("yolov5m-seg.pt", True), ("yolov5l-cls.pt", True),
    ("yolov5s", False), ("yolov8n.pt", False), ("dir/yolov5s.pt", False), ("yolov5s.pt?x=1", False),
    ("yolov5/../x.pt", False),
])
def test_official_names(spec, official):
    assert is_official_name(spec) is official
