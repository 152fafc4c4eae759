"""Client details a user hits: image files sent as their own bytes, and a hint when TLS is on one side only.

No model is needed: the first part checks the Frame messages the client builds, the second connects the real
``yolostream info`` command to bare gRPC servers (health service only) that are TLS or plaintext.
"""

from __future__ import annotations

from concurrent import futures
from pathlib import Path
from typing import Iterator

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2_grpc

from yolostream.client import ImageFile, open_source
from yolostream.client.options import fill_frame
from yolostream.server import cli
from yolostream.v1 import feature_service_pb2 as pb

from conftest import self_signed_cert


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    image = np.random.default_rng(3).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    paths = {"jpeg": tmp_path / "a.jpg", "png": tmp_path / "b.png", "bmp": tmp_path / "c.bmp"}
    for path in paths.values():
        cv2.imwrite(str(path), image)
    (tmp_path / "d.jpg").write_bytes(paths["png"].read_bytes())  # a PNG file under a JPEG name
    paths["png-named-jpg"] = tmp_path / "d.jpg"
    return paths


def _sent(image: np.ndarray, encoding: str) -> pb.Frame:
    frame = pb.Frame()
    fill_frame(frame, image, encoding)
    return frame


def test_an_image_file_goes_as_its_own_bytes_only_in_its_own_encoding(files):
    jpeg, png = ImageFile.read(files["jpeg"]), ImageFile.read(files["png"])
    assert _sent(jpeg, "jpeg").encoded == files["jpeg"].read_bytes()
    assert _sent(png, "png").encoded == files["png"].read_bytes()
    assert _sent(ImageFile.read(files["png-named-jpg"]), "png").encoded == files["png"].read_bytes()  # by content
    assert ImageFile.read(files["bmp"]).file_bytes is None  # BMP is no wire encoding: always re-encoded
    # Other combinations keep today's behaviour: the decoded pixels, encoded as asked.
    again = _sent(jpeg, "png").encoded
    assert again != files["jpeg"].read_bytes() and again.startswith(b"\x89PNG")
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(again, np.uint8), cv2.IMREAD_COLOR), np.asarray(jpeg))
    assert _sent(png, "jpeg").encoded.startswith(b"\xff\xd8")
    raw = _sent(png, "raw").raw
    np.testing.assert_array_equal(np.frombuffer(raw.data, np.uint8).reshape(30, 40, 3), np.asarray(png))


def test_the_bytes_never_outlive_the_pixels_they_encode(files):
    image = ImageFile.read(files["jpeg"])
    np.testing.assert_array_equal(np.asarray(image), cv2.imread(str(files["jpeg"]), cv2.IMREAD_COLOR))
    with pytest.raises(ValueError, match="read-only"):
        image[0, 0] = 0
    for derived in (image[:10], image.copy(), image[:, :, ::-1]):
        assert _sent(derived, "jpeg").encoded != files["jpeg"].read_bytes()
    frames = [frame for frame, _ in open_source(str(files["jpeg"].parent))]
    assert [type(frame) for frame in frames] == [ImageFile] * 4
    assert _sent(frames[0], "jpeg").encoded == files["jpeg"].read_bytes()


@pytest.fixture(scope="module")
def bare_servers(tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """(plaintext address, TLS address, the TLS server's certificate): servers with only a health service."""
    cert, key = self_signed_cert(tmp_path_factory.mktemp("hint-tls"), "server", "DNS:localhost,IP:127.0.0.1")
    started = []
    for tls in (False, True):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        if tls:
            creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
            port = server.add_secure_port("127.0.0.1:0", creds)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append((server, f"127.0.0.1:{port}"))
    try:
        yield started[0][1], started[1][1], cert
    finally:
        for server, _ in started:
            server.stop(0)


@pytest.mark.parametrize("case, hint", [
    ("plaintext client, TLS server", "the server may expect TLS: try --tls"),
    ("TLS client, plaintext server", "the server may be plaintext: try without --tls"),
    ("TLS client, untrusted certificate", "the server's certificate is not trusted: pass its CA with --tls-ca"),
    ("trusted TLS, no such service", None),
    ("nothing listening", None),
])
def test_a_tls_mismatch_at_connect_gets_a_hint(bare_servers, capsys, case, hint):
    plain, secure, cert = bare_servers
    args = {
        "plaintext client, TLS server": ["--server", secure],
        "TLS client, plaintext server": ["--server", plain, "--tls-ca", str(cert)],
        "TLS client, untrusted certificate": ["--server", secure, "--tls"],
        "trusted TLS, no such service": ["--server", secure, "--tls-ca", str(cert)],
        "nothing listening": ["--server", "127.0.0.1:1"],
    }[case]
    assert cli.main(["info", *args, "--timeout", "10"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("yolostream info: error:")]
    assert len(lines) == 1, lines
    if hint is None:
        assert "hint" not in lines[0], lines[0]
    else:
        assert f"(hint: {hint}" in lines[0], lines[0]
