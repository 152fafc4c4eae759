"""Shared memory for clients on the same host, through a real ``yolostream serve`` (``--allow-client-shm``): the
features equal the gRPC path's, a client that never heard of it works as before, and every safety promise holds
(offsets, unsealed or shrinking regions, closed descriptors, tokens, unmapping however a stream ends)."""

from __future__ import annotations

import os
import queue
import secrets
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import psutil
import pytest

from yolostream.client import DetectOptions, FeatureClient, FeatureServerError, ObjectFeatureOptions, ResumePolicy
from yolostream.client.shm import SharedRegion, handshake, register
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import vocab

from conftest import REPO, ServeProcess, grpc_channel, raw_frame, serve_env

WAIT_S = 30.0


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServeProcess]:
    """One server that maps clients' regions, on TCP and a Unix socket; batches of one, so that every frame is
    computed alone and both paths give the same bits."""
    tmp = tmp_path_factory.mktemp("shm-serve")
    proc = ServeProcess(tmp, "--port", "0", "--imgsz", "64", "--device", "cpu", "--allow-client-shm",
                        "--max-batch", "1", "--uds", str(tmp / "ys.sock"))
    try:
        proc.wait_serving()
        proc.uds = f"unix://{tmp / 'ys.sock'}"
        yield proc
    finally:
        proc.close()


def _frames(count: int, h: int = 96, w: int = 128) -> list[np.ndarray]:
    return [np.random.default_rng(k).integers(0, 256, (h, w, 3), dtype=np.uint8) for k in range(count)]


def _mapped_by(pid: int, name: str) -> bool:
    try:
        return f"/memfd:{name}" in Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:
        return False


def _device_pid(server: ServeProcess) -> int:
    """The device process: the one server process that mapped libtorch (as test_processes tells them apart)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            try:
                if "libtorch" in Path(f"/proc/{child.pid}/maps").read_text():
                    return child.pid
            except FileNotFoundError:
                continue
        time.sleep(0.05)
    raise AssertionError("no server process maps libtorch")


def _frontend_mapping(server: ServeProcess, name: str) -> int:
    """The pid of the front-end that maps region ``name`` (the one serving its stream; the device maps it too)."""
    device = _device_pid(server)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            if child.pid != device and _mapped_by(child.pid, name):
                return child.pid
        time.sleep(0.05)
    raise AssertionError(f"no front-end maps {name}")


def _client_memfds(pid: int) -> list[str]:
    """The client regions (memfds named by ``SharedRegion``) process ``pid`` maps."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except FileNotFoundError:
        return []
    return sorted({line.split("/memfd:", 1)[1].split()[0] for line in maps.splitlines()
                   if "/memfd:yolostream-client-" in line})


def _device_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_unmapped(pid: int, name: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while _mapped_by(pid, name):
        assert time.monotonic() < deadline, f"process {pid} still maps {name}"
        time.sleep(0.05)


def _dev_shm_clients() -> list[str]:
    return sorted(p for p in os.listdir("/dev/shm") if "client" in p) if os.path.isdir("/dev/shm") else []


class HandStream:
    """A StreamFeatures call driven by hand over the raw stubs: the config, then frames one by one, answers read
    one by one; every wait bounded by the call's deadline."""

    def __init__(self, address: str, config: pb.StreamConfig) -> None:
        self.channel = grpc_channel(address)
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.StreamRequest(config=config))
        self.call = pb_grpc.FeatureServiceStub(self.channel).StreamFeatures(self._iterate(), timeout=120)

    def _iterate(self):
        while (request := self.requests.get()) is not None:
            yield request

    def handshake(self) -> tuple[str, str, int]:
        found = handshake(self.call.initial_metadata())
        assert found is not None, "no shared-memory handshake in the initial metadata"
        return found

    def send(self, frame: pb.Frame) -> None:
        self.requests.put(pb.StreamRequest(frame=frame))

    def recv(self) -> pb.FrameResult:
        return next(self.call).result

    def end(self) -> None:
        self.requests.put(None)

    def close(self) -> None:
        self.end()
        self.call.cancel()
        self.channel.close()


def _shm_config(layers: tuple[str, ...] = ("backbone",)) -> pb.StreamConfig:
    config = pb.StreamConfig(options=pb.FeatureOptions(layers=list(layers)), max_in_flight=4)
    config.shared_memory.SetInParent()
    return config


def _registered(address: str, slots: int = 2, frame_bytes: int = 96 * 128 * 3) -> tuple[HandStream, SharedRegion]:
    stream = HandStream(address, _shm_config())
    socket_name, token, room = stream.handshake()
    region = SharedRegion(slots, frame_bytes, room)
    register(region.fd, socket_name, token)
    return stream, region


def _shm_frame(region: SharedRegion, slot: int, image: np.ndarray, frame_id: int) -> pb.Frame:
    return pb.Frame(frame_id=frame_id, shared_memory=region.frame_ref(slot, image))


# Acceptance: the same features, and clients that never heard of shared memory.

def test_shared_memory_gives_the_grpc_paths_features_boxes_and_vectors_bit_for_bit(server):
    frames = _frames(5)
    options = dict(layers="backbone,P3,P4", detect=DetectOptions(conf=0.001, max_det=20),
                   objects=ObjectFeatureOptions("roi", roi_size=2), max_in_flight=2)
    with FeatureClient(server.uds, shared_memory=True) as client:
        assert client.model_info().shared_memory == {"allowed": True, "max_region_bytes": 16 * 1024**3}
        stream = client.stream(frames, **options)
        shared = list(stream)
        region = stream.shared_memory
    with FeatureClient(server.address) as client:
        plain = list(client.stream(frames, encoding="raw", **options))
    assert region is not None and region.name.startswith("yolostream-client-")
    assert len(shared) == len(plain) == 5
    for a, b in zip(shared, plain):
        assert a.ok and b.ok, (a.error, b.error)
        assert a.letterbox == b.letterbox and list(a.features) == list(b.features) == ["backbone", "P3", "P4"]
        for name in a.features:
            assert region.holds(a.features[name]) and not region.holds(b.features[name])
            np.testing.assert_array_equal(a.features[name], b.features[name])
            assert a.features[name].dtype == b.features[name].dtype
        assert len(a.detections) == len(b.detections) > 0
        np.testing.assert_array_equal(a.detections.boxes, b.detections.boxes)
        np.testing.assert_array_equal(a.detections.scores, b.detections.scores)
        np.testing.assert_array_equal(a.detections.classes, b.detections.classes)
        np.testing.assert_array_equal(a.detections.anchor_cells, b.detections.anchor_cells)
        np.testing.assert_array_equal(a.object_features, b.object_features)


def test_tcp_loopback_and_float16_work_too_and_frames_larger_than_the_first_travel_in_the_message(server):
    small, large = _frames(2), _frames(2, 160, 200)
    sequence = [small[0], large[0], small[1], large[1]]
    with FeatureClient(server.address, shared_memory=True) as client:
        stream = client.stream(sequence, layers="P3", dtype="float16", encoding="png", max_in_flight=1)
        shared = list(stream)
        region = stream.shared_memory
    with FeatureClient(server.address) as client:
        plain = list(client.stream(sequence, layers="P3", dtype="float16", encoding="png", max_in_flight=1))
    assert region.frame_bytes == vocab.shm_aligned(small[0].nbytes)
    for a, b in zip(shared, plain):
        assert a.ok and region.holds(a.features["P3"]) and a.features["P3"].dtype == np.float16
        np.testing.assert_array_equal(a.features["P3"], b.features["P3"])


def _shared_and_plain(address: str, frames: list, **options) -> tuple[list, SharedRegion | None, list]:
    """The same frames streamed to ``address`` through shared memory and then as raw frames in the messages: the
    results of each, and the shared stream's region."""
    with FeatureClient(address, shared_memory=True) as client:
        stream = client.stream(frames, **options)
        shared = list(stream)
        region = stream.shared_memory
    with FeatureClient(address) as client:
        plain = list(client.stream(frames, encoding="raw", **options))
    return shared, region, plain


def test_grey_and_bgra_frames_and_realtime_streams_go_through_shared_memory_too(server):
    colour = _frames(3)
    sequence = [np.dstack([colour[0], np.full(colour[0].shape[:2], 255, np.uint8)]), colour[1][:, :, 0], colour[2]]
    shared, region, plain = _shared_and_plain(server.address, sequence, layers="P3", max_in_flight=1)
    assert region.frame_bytes == vocab.shm_aligned(colour[0].nbytes)  # BGRA is sent as BGR
    for a, b in zip(shared, plain):
        assert a.ok and region.holds(a.features["P3"])
        np.testing.assert_array_equal(a.features["P3"], b.features["P3"])
    with FeatureClient(server.address, shared_memory=True) as client:
        stream = client.stream(_frames(12), layers="backbone", realtime=True, max_in_flight=1)
        results = [(r.frame_id, r.status, r.ok and stream.shared_memory.holds(r.features["backbone"]))
                   for r in stream]
    assert [frame_id for frame_id, _, _ in results] == list(range(12))
    assert all(status in ("ok", "dropped") for _, status, _ in results)
    assert all(held for _, status, held in results if status == "ok") and results[-1][1] == "ok"


def test_a_client_that_never_heard_of_shared_memory_works_exactly_as_before(server):
    frames = [raw_frame(k) for k in range(3)]
    with grpc_channel(server.address) as channel:
        call = pb_grpc.FeatureServiceStub(channel).StreamFeatures(
            iter([pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"]),
                                                         max_in_flight=1)),
                  *[pb.StreamRequest(frame=f) for f in frames]]), timeout=60)
        results = [response.result for response in call]
        metadata = dict(call.initial_metadata())
    assert not any(key.startswith("yolostream-shm") for key in metadata)
    assert [r.frame_id for r in results] == [0, 1, 2]
    for result in results:
        assert result.status == pb.FRAME_STATUS_OK and not result.tensors[0].HasField("shared_memory")
        assert len(result.tensors[0].data) == 4 * np.prod(result.tensors[0].shape)
    images = [np.frombuffer(f.raw.data, np.uint8).reshape(48, 64, 3) for f in frames]
    with FeatureClient(server.address, shared_memory=True) as client:
        shared = list(client.stream(images, layers="backbone", max_in_flight=1))
    for result, answer in zip(results, shared):
        np.testing.assert_array_equal(np.frombuffer(result.tensors[0].data, np.float32).reshape(answer.features[
            "backbone"].shape), answer.features["backbone"])


def test_the_stream_command_saves_the_same_features_with_shm(server, tmp_path):
    import cv2

    for k, image in enumerate(_frames(3)):
        cv2.imwrite(str(tmp_path / f"f{k}.png"), image)
    outcomes, errs = {}, {}
    for name, extra in (("shm", ["--shm"]), ("grpc", ["--encoding", "png"])):
        proc = subprocess.run([sys.executable, "-m", "yolostream.server.cli", "stream", str(tmp_path / "*.png"),
                               "--server", server.uds, "--layers", "P3", "--max-in-flight", "1", "-q",
                               "--save", str(tmp_path / name), *extra], env=serve_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outcomes[name], errs[name] = np.load(tmp_path / name / "P3.npy"), proc.stderr
    assert "raw frames through shared memory" in errs["shm"] and "raw frames" not in errs["grpc"]
    assert outcomes["shm"].shape[0] == 3
    np.testing.assert_array_equal(outcomes["shm"], outcomes["grpc"])


# Safety.

def test_a_server_without_the_flag_refuses_shared_memory_naming_it(tmp_path):
    plain = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--device", "cpu")
    try:
        plain.wait_serving()
        with FeatureClient(plain.address, shared_memory=True) as client:
            assert client.model_info().shared_memory["allowed"] is False
            with pytest.raises(FeatureServerError) as caught:
                list(client.stream(_frames(2)))
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--allow-client-shm" in caught.value.details
        stream = HandStream(plain.address, _shm_config())
        with pytest.raises(grpc.RpcError) as raw:
            stream.recv()
        assert raw.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--allow-client-shm" in raw.value.details()
        stream.close()
        with FeatureClient(plain.address) as client:  # the server itself is unaffected
            assert all(r.ok for r in client.stream(_frames(2)))
    finally:
        plain.close()


def test_offsets_and_sizes_outside_the_region_fail_their_frame_and_the_stream_goes_on(server):
    stream, region = _registered(server.address)
    image = _frames(1)[0]
    region._map[:] = b"\xa5" * region.size  # a canary: nothing a refused frame names may be written
    good = _shm_frame(region, 0, image, 0)
    before = bytes(region._map)
    bad = []
    past = pb.Frame(); past.CopyFrom(good); past.shared_memory.image.offset = region.size - 10
    bad.append((past, "past the end"))
    huge = pb.Frame(); huge.CopyFrom(good); huge.shared_memory.image.offset = 2**64 - 1
    bad.append((huge, "past the end"))
    wrong = pb.Frame(); wrong.CopyFrom(good); wrong.shared_memory.image.length += 1
    bad.append((wrong, "needs"))
    room = pb.Frame(); room.CopyFrom(good); room.shared_memory.output_offset = region.size
    bad.append((room, "past the end"))
    overflow = pb.Frame(); overflow.CopyFrom(good)
    overflow.shared_memory.output_offset = overflow.shared_memory.output_length = 2**64 - 1
    bad.append((overflow, "past the end"))
    small = pb.Frame(); small.CopyFrom(good); small.shared_memory.output_length = 64
    bad.append((small, "bytes of output room"))
    try:
        for k, (frame, _) in enumerate(bad, start=1):
            frame.frame_id = k
            stream.send(frame)
        for k, (frame, words) in enumerate(bad, start=1):
            result = stream.recv()
            assert result.frame_id == k and result.status == pb.FRAME_STATUS_ERROR, result
            assert words in result.error_message and len(result.error_message) < 300
        assert bytes(region._map) == before
        stream.send(_shm_frame(region, 1, image, 99))
        result = stream.recv()
        assert result.status == pb.FRAME_STATUS_OK and result.tensors[0].HasField("shared_memory")
        assert not result.tensors[0].data
    finally:
        stream.close()


def test_a_client_that_cannot_reach_the_front_ends_socket_gets_one_clear_error(server, monkeypatch):
    """As a client on another host (or network namespace) would: the stream ends with FAILED_PRECONDITION."""
    import yolostream.client.shm as client_shm

    def unreachable(*args: object) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(client_shm, "register", unreachable)
    with FeatureClient(server.address, shared_memory=True) as client:
        with pytest.raises(FeatureServerError) as caught:
            list(client.stream(_frames(2)))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "needs the client on the server's host" in caught.value.details


def test_a_frame_naming_shared_memory_on_an_ordinary_stream_fails_alone(server):
    stream = HandStream(server.address, pb.StreamConfig(options=pb.FeatureOptions(layers=["backbone"])))
    try:
        stream.send(pb.Frame(frame_id=1, shared_memory=pb.SharedMemoryFrame(output_offset=0, output_length=64)))
        stream.send(raw_frame(2))
        first, second = stream.recv(), stream.recv()
        assert first.status == pb.FRAME_STATUS_ERROR and "has no region" in first.error_message
        assert second.status == pb.FRAME_STATUS_OK
    finally:
        stream.close()


def test_an_unsealed_region_is_refused_and_a_sealed_one_cannot_shrink_while_other_streams_finish(server, tmp_path):
    unsealed = HandStream(server.address, _shm_config())
    socket_name, token, _ = unsealed.handshake()
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 1 << 20)
        with pytest.raises(ValueError, match="not sealed against shrinking"):
            register(fd, socket_name, token)
    finally:
        os.close(fd)
    with pytest.raises(grpc.RpcError) as refused:
        unsealed.recv()
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not sealed against shrinking" in refused.value.details()
    unsealed.close()

    plain_file = HandStream(server.address, _shm_config())
    socket_name, token, _ = plain_file.handshake()
    (tmp_path / "region").write_bytes(b"\0" * 4096)
    fd = os.open(tmp_path / "region", os.O_RDWR)
    try:
        with pytest.raises(ValueError, match="not a sealable memfd|not sealed against shrinking"):
            register(fd, socket_name, token)
    finally:
        os.close(fd)
    plain_file.close()

    shrinker, region = _registered(server.address)
    others = FeatureClient(server.address)
    frames = _frames(6)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 4096)
        other = others.stream(frames, layers="backbone", encoding="raw")
        for k, image in enumerate(frames[:2]):
            shrinker.send(_shm_frame(region, k, image, k))
        with pytest.raises(PermissionError):
            os.ftruncate(region.fd, 0)
        assert [shrinker.recv().status for _ in range(2)] == [pb.FRAME_STATUS_OK] * 2
        assert [r.status for r in other] == ["ok"] * 6
    finally:
        shrinker.close()
        others.close()


def test_a_client_that_closes_and_unmaps_its_region_mid_stream_changes_nothing_for_the_server(server):
    stream, region = _registered(server.address, slots=3)
    images = _frames(3)
    refs = [_shm_frame(region, k, images[k], k) for k in range(3)]
    try:
        stream.send(refs[0])
        first = stream.recv()
        assert first.status == pb.FRAME_STATUS_OK and first.tensors[0].HasField("shared_memory")
        pid, device = _frontend_mapping(server, region.name), _device_pid(server)
        assert _mapped_by(device, region.name)  # the device writes the tensors into the region itself
        region.close()  # the descriptor
        region._map.close()  # and the client's mapping: the pixels of frames 1 and 2 were written before
        assert f"/memfd:{region.name}" not in Path("/proc/self/maps").read_text()
        stream.send(refs[1])
        stream.send(refs[2])
        assert [stream.recv().status for _ in range(2)] == [pb.FRAME_STATUS_OK] * 2
        assert _mapped_by(pid, region.name) and _mapped_by(device, region.name)  # the server's mappings carry on
        stream.end()
        assert list(stream.call) == []
        _wait_unmapped(pid, region.name)
        _wait_unmapped(device, region.name)
        assert _device_alive(device) and _device_pid(server) == device
    finally:
        stream.close()


def test_a_token_gives_a_region_to_its_own_stream_once_and_never_to_another(server):
    first = HandStream(server.address, _shm_config())
    second = HandStream(server.address, _shm_config())
    try:
        socket_a, token_a, room = first.handshake()
        socket_b, token_b, _ = second.handshake()
        assert token_a != token_b
        region_a = SharedRegion(1, 96 * 128 * 3, room)
        region_b = SharedRegion(1, 96 * 128 * 3, room)
        with pytest.raises(ValueError, match="unknown or already used token"):
            register(region_b.fd, socket_a, secrets.token_hex(16))  # forged
        register(region_a.fd, socket_a, token_a)
        with pytest.raises(ValueError, match="unknown or already used token"):
            register(region_b.fd, socket_b, token_a)  # reused, and by the other stream's client
        register(region_b.fd, socket_b, token_b)
        image = _frames(1)[0]
        first.send(_shm_frame(region_a, 0, image, 0))
        second.send(_shm_frame(region_b, 0, image, 0))
        a, b = first.recv(), second.recv()
        assert a.status == b.status == pb.FRAME_STATUS_OK
        # each stream's offsets index its own region only: the same offsets, each answer in its own memory
        features_a = region_a.features(a, 0)["backbone"]
        features_b = region_b.features(b, 0)["backbone"]
        assert region_a.holds(features_a) and region_b.holds(features_b)
        np.testing.assert_array_equal(features_a, features_b)
    finally:
        first.close()
        second.close()


def test_a_stream_whose_region_never_comes_ends_and_its_token_dies_with_it(server):
    """The server waits SHM_REGISTER_TIMEOUT_S (10 s) for the region, then ends the stream; its token is void."""
    unregistered = HandStream(server.address, _shm_config())
    try:
        socket_name, token, room = unregistered.handshake()
        with pytest.raises(grpc.RpcError) as caught:
            unregistered.recv()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no shared-memory region was registered" in caught.value.details()
        late = SharedRegion(1, 64, room)
        with pytest.raises(ValueError, match="unknown or already used token"):
            register(late.fd, socket_name, token)
    finally:
        unregistered.close()


@pytest.mark.parametrize("ending", ["end", "cancel", "error"])
def test_the_region_is_unmapped_when_the_stream_ends_however_it_ends(server, ending):
    before = _dev_shm_clients()
    stream, region = _registered(server.address)
    try:
        stream.send(_shm_frame(region, 0, _frames(1)[0], 0))
        assert stream.recv().status == pb.FRAME_STATUS_OK
        pid, device = _frontend_mapping(server, region.name), _device_pid(server)
        assert _mapped_by(device, region.name)
        if ending == "end":
            stream.end()
            assert list(stream.call) == []
        elif ending == "cancel":
            stream.call.cancel()
        else:
            stream.requests.put(pb.StreamRequest(config=_shm_config()))  # a second config: INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as caught:
                stream.recv()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _wait_unmapped(pid, region.name)
        _wait_unmapped(device, region.name)
    finally:
        stream.close()
    assert _dev_shm_clients() == before


_KILLED_CLIENT = textwrap.dedent("""
    import itertools, sys
    import numpy as np
    from yolostream.client import FeatureClient

    frames = (np.full((96, 128, 3), k % 256, np.uint8) for k in itertools.count())
    with FeatureClient(sys.argv[1], shared_memory=True) as client:
        stream = client.stream(frames, layers="backbone")
        for result in stream:
            print(stream.shared_memory.name, flush=True)
""")


def test_the_region_is_unmapped_when_the_client_is_killed(server, tmp_path):
    before = _dev_shm_clients()
    (tmp_path / "client.py").write_text(_KILLED_CLIENT)
    client = subprocess.Popen([sys.executable, str(tmp_path / "client.py"), server.address], env=serve_env(),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(client.stdout, selectors.EVENT_READ)
            assert selector.select(WAIT_S * 4), "the client printed no result"
        name = client.stdout.readline().strip()
        assert name.startswith("yolostream-client-"), client.stderr.read() if client.poll() is not None else name
        pid, device = _frontend_mapping(server, name), _device_pid(server)
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=WAIT_S)
        _wait_unmapped(pid, name)
        _wait_unmapped(device, name)
        assert _device_alive(device)
    finally:
        if client.poll() is None:
            client.kill()
        client.wait(timeout=WAIT_S)
        client.stdout.close()
        client.stderr.close()
    assert _dev_shm_clients() == before


def test_a_stream_survives_its_front_end_and_registers_its_region_with_the_replacement(tmp_path):
    """A killed front-end is replaced by the supervisor on the same port; the stream resumes there, passes the same
    region to the new front-end, and every frame is answered once, in order, from shared memory."""
    proc = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--device", "cpu", "--allow-client-shm")
    try:
        address = proc.wait_serving()
        frames = _frames(12)
        killed, mapped_after = None, None
        with FeatureClient(address, shared_memory=True, resume=ResumePolicy(timeout_s=120.0)) as client:
            stream = client.stream(frames, layers="backbone", max_in_flight=2)
            answered = []
            for result in stream:
                assert result.ok, result.error
                assert stream.shared_memory.holds(result.features["backbone"])
                answered.append(result.frame_id)
                if len(answered) == 3:
                    killed = _frontend_mapping(proc, stream.shared_memory.name)
                    os.kill(killed, signal.SIGKILL)
                if stream.resumes and mapped_after is None:
                    mapped_after = _frontend_mapping(proc, stream.shared_memory.name)
            assert stream.resumes >= 1
        assert answered == list(range(12))
        assert mapped_after is not None and mapped_after != killed
        _wait_unmapped(mapped_after, stream.shared_memory.name)
        _wait_unmapped(_device_pid(proc), stream.shared_memory.name)  # shared by both front-ends, released by both
    finally:
        proc.close()


# The device writes the tensors into the client's region itself: what it maps, and what a client cannot do to it.


def test_8bit_codes_take_the_copying_path_and_bfloat16_the_direct_one_both_as_grpc(server):
    """8-bit codes carry their scales and offsets in the message, so the front-end copies the codes into the region
    (the device never maps it); other dtypes are written there by the device. Both give the gRPC path's bits."""
    frames, device = _frames(3), _device_pid(server)
    for dtype, direct in (("uint8", False), ("bfloat16", True)):
        with FeatureClient(server.address, shared_memory=True) as client:
            stream = client.stream(frames, layers="backbone,P3", dtype=dtype, max_in_flight=1)
            shared = []
            for result in stream:
                if not shared:  # the stream runs (its last answer may come once it has ended)
                    assert _mapped_by(device, stream.shared_memory.name) == direct, dtype
                shared.append(result)
            region = stream.shared_memory
        with FeatureClient(server.address) as client:
            plain = list(client.stream(frames, layers="backbone,P3", dtype=dtype, encoding="raw", max_in_flight=1))
        for a, b in zip(shared, plain, strict=True):
            assert a.ok and b.ok, (a.error, b.error)
            for name in ("backbone", "P3"):  # both decode to float32 copies: the bits must match
                np.testing.assert_array_equal(a.features[name], b.features[name])
        _wait_unmapped(device, region.name)


def test_misbehaving_clients_never_touch_another_stream_and_the_device_process_never_dies(server):
    """While a well-behaved shared-memory stream runs: a region too small for the output room, an output room past
    the region's end, a stream cancelled with frames at the device whose client unmapped its region at once. Each
    fails only its own frames; the other stream gets the gRPC path's bits; the device is the same process
    throughout, and once the streams end it maps no client region."""
    device = _device_pid(server)
    frames = _frames(8)
    with FeatureClient(server.address) as client:
        expected = [r.features["backbone"] for r in client.stream(frames, layers="backbone", encoding="raw")]
    good_client = FeatureClient(server.address, shared_memory=True)
    try:
        good = good_client.stream(frames, layers="backbone", max_in_flight=2)
        answers = iter(good)

        def take(result) -> np.ndarray:
            assert result.ok and good.shared_memory.holds(result.features["backbone"]), result.error
            return np.array(result.features["backbone"])  # a copy: the slot goes back

        received = [take(next(answers))]
        image = frames[0]

        tiny = HandStream(server.address, _shm_config())  # a region whose slots have 64 bytes of output room
        socket_name, token, _ = tiny.handshake()
        small = SharedRegion(2, image.nbytes, 64)
        register(small.fd, socket_name, token)
        past = _shm_frame(small, 1, image, 2)
        past.shared_memory.output_length = small.size - past.shared_memory.output_offset + 4096
        tiny.send(_shm_frame(small, 0, image, 1))
        tiny.send(past)
        first, second = tiny.recv(), tiny.recv()
        assert first.status == second.status == pb.FRAME_STATUS_ERROR
        assert "bytes of output room" in first.error_message and "past the end" in second.error_message
        tiny.close()

        abrupt, region = _registered(server.address, slots=2)
        for k in range(2):
            abrupt.send(_shm_frame(region, k, image, k))
        region.close()
        region._map.close()
        abrupt.call.cancel()  # mid-frame: both frames are at the front-end or the device
        abrupt.close()

        received += [take(result) for result in answers]
    finally:
        good_client.close()
    assert len(received) == len(expected)
    for got, want in zip(received, expected):
        np.testing.assert_array_equal(got, want)
    assert _device_alive(device) and _device_pid(server) == device
    deadline = time.monotonic() + WAIT_S
    while _client_memfds(device):
        assert time.monotonic() < deadline, f"the device still maps {_client_memfds(device)}"
        time.sleep(0.05)


REFUSING_DEVICE = """
from yolostream.server.device import regions

regions.ClientRegions.share = lambda self, region, fd, size: self.refuse(region, "refused by the test")
"""


def test_a_region_the_device_cannot_map_sends_its_features_the_copying_way_and_loses_no_frame(tmp_path):
    """Every process imports a sitecustomize with which the device refuses every region (as when its mmap fails): the
    device answers so before the stream's first frame, and the front-end copies the features into the region
    instead; every frame is answered with the gRPC path's bits, and the device never maps the client's memory."""
    (tmp_path / "sitecustomize.py").write_text(REFUSING_DEVICE)
    env = serve_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = ServeProcess(tmp_path, "--port", "0", "--imgsz", "64", "--device", "cpu", "--allow-client-shm",
                        "--max-batch", "1", env=env)
    try:
        proc.wait_serving()
        device = _device_pid(proc)
        shared, region, plain = _shared_and_plain(proc.address, _frames(4), layers="backbone,P3", max_in_flight=2)
        assert region is not None and not _mapped_by(device, region.name)
        for a, b in zip(shared, plain, strict=True):
            assert a.ok and b.ok, (a.error, b.error)
            for name in ("backbone", "P3"):
                assert region.holds(a.features[name])
                np.testing.assert_array_equal(a.features[name], b.features[name])
        assert "the device did not map a client's region (refused by the test)" in proc.stderr_path.read_text()
    finally:
        proc.close()
