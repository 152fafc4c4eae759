"""The client's shared-memory region alone (no server): sealing, slots, views and their release, the handshake keys,
and the server-side checks of a descriptor and of offsets, run on regions made here."""

from __future__ import annotations

import fcntl
import gc
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from yolostream.client.shm import SEALS, SharedRegion, StreamMemory, handshake, sealed_memfd
from yolostream.server.frontend.client_shm import ClientRegion, RegionRefused, check_region_fd, frame_pixels
from yolostream.server.frontend.frames import FrameError, FrameLimits
from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import vocab


def _placed(region: SharedRegion, slot: int, arrays: dict[str, np.ndarray]) -> pb.FrameResult:
    """A FrameResult whose tensors are written into ``slot``'s output room, as the server lays them out."""
    result = pb.FrameResult(status=pb.FRAME_STATUS_OK)
    cursor = slot * region.slot_bytes + region.frame_bytes
    for name, array in arrays.items():
        start = vocab.shm_aligned(cursor)
        region._map[start:start + array.nbytes] = array.tobytes()
        tensor = result.tensors.add(name=name, dtype=pb.DTYPE_FLOAT32, shape=array.shape)
        tensor.shared_memory.offset, tensor.shared_memory.length = start, array.nbytes
        cursor = start + array.nbytes
    return result


def _maps() -> str:
    return Path("/proc/self/maps").read_text()


def test_a_region_is_a_sealed_memfd_that_can_neither_shrink_nor_grow_and_leaves_nothing_in_dev_shm():
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    region = SharedRegion(3, 100, 200)
    assert region.frame_bytes == 128 and region.output_bytes == 256 and region.size == 3 * 384
    assert fcntl.fcntl(region.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    with pytest.raises(PermissionError):
        os.ftruncate(region.fd, region.size // 2)
    with pytest.raises(PermissionError):
        os.ftruncate(region.fd, region.size * 2)
    assert os.fstat(region.fd).st_size == region.size
    assert f"/memfd:{region.name}" in _maps()
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert after == before
    region.close()
    assert region.fd is None


def test_result_arrays_are_read_only_views_that_hold_their_slot_until_the_last_one_goes():
    region = SharedRegion(2, 64, 4096)
    stop = threading.Event()
    slot = region.acquire(stop)
    assert slot == 0 and region.free_slots == 1
    p3 = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    p4 = np.full((5,), 7.5, dtype=np.float32)
    features = region.features(_placed(region, slot, {"P3": p3, "P4": p4}), slot)
    np.testing.assert_array_equal(features["P3"], p3)
    np.testing.assert_array_equal(features["P4"], p4)
    assert all(region.holds(a) and not a.flags.writeable for a in features.values())
    kept = features["P4"][1:3]  # a view of a view keeps the slot too
    del features
    gc.collect()
    assert region.free_slots == 1
    del kept
    gc.collect()
    assert region.free_slots == 2


def test_a_result_without_tensors_in_the_region_gives_its_slot_back_at_once():
    region = SharedRegion(1, 64, 64)
    slot = region.acquire(threading.Event())
    assert region.features(pb.FrameResult(status=pb.FRAME_STATUS_DROPPED), slot) is None
    assert region.free_slots == 1


def test_a_server_pointing_outside_the_slot_is_an_error_and_the_slot_comes_back():
    region = SharedRegion(2, 64, 256)
    slot = region.acquire(threading.Event())
    result = _placed(region, slot, {"P3": np.zeros(4, np.float32)})
    result.tensors[0].shared_memory.offset = region.slot_bytes * 2  # the other slot's room: not this frame's
    with pytest.raises(ValueError, match="outside the frame's output room"):
        region.features(result, slot)
    gc.collect()
    assert region.free_slots == 2


def test_when_every_slot_is_held_acquire_waits_and_never_hands_out_a_held_slot():
    region = SharedRegion(1, 64, 256)
    stop = threading.Event()
    slot = region.acquire(stop)
    features = region.features(_placed(region, slot, {"P3": np.ones(8, np.float32)}), slot)
    assert region.acquire(stop, timeout=0) is None  # held: not handed out again
    got: list[int | None] = []
    waiter = threading.Thread(target=lambda: got.append(region.acquire(stop)))
    waiter.start()
    del features  # the last view goes: the slot is released and the waiting sender gets it
    gc.collect()
    waiter.join(timeout=30)
    assert got == [0]
    region.interrupt()
    assert region.acquire(stop) is None


def test_frames_go_into_their_slot_and_larger_ones_stay_in_the_message():
    region = SharedRegion(2, 48 * 64 * 3, 256)
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    ref = region.frame_ref(1, image)
    assert ref.HasField("image") and ref.image.offset == region.slot_bytes and ref.image.length == image.nbytes
    assert (ref.image.height, ref.image.width, ref.image.channels) == (48, 64, 3)
    assert ref.image.format == pb.PIXEL_FORMAT_BGR
    assert ref.output_offset == region.slot_bytes + region.frame_bytes and ref.output_length == region.output_bytes
    stored = np.frombuffer(region._map, np.uint8, image.nbytes, ref.image.offset).reshape(image.shape)
    np.testing.assert_array_equal(stored, image)
    grey = region.frame_ref(0, image[:, :, 0])
    assert grey.image.channels == 1 and grey.image.format == pb.PIXEL_FORMAT_GRAY
    big = region.frame_ref(0, np.zeros((96, 64, 3), np.uint8))
    assert not big.HasField("image") and big.output_length == region.output_bytes


def test_the_stream_memory_is_made_from_the_first_frame_and_the_servers_room():
    memory = StreamMemory(slots=3)
    memory.offer(np.zeros((10, 20, 3), np.uint8))
    memory.offer(np.zeros((99, 99, 3), np.uint8))  # only the first frame sizes it
    assert memory.wait_first()
    assert handshake([("other", "x")]) is None
    with pytest.raises(ValueError, match="not a yolostream front-end"):
        handshake([(vocab.SHM_SOCKET_KEY, "@dbus-session"), (vocab.SHM_TOKEN_KEY, "ab")])
    found = handshake([(vocab.SHM_SOCKET_KEY, "@yolostream-1-ab"), (vocab.SHM_TOKEN_KEY, "cd"),
                       (vocab.SHM_OUTPUT_BYTES_KEY, "1000")])
    assert found == ("@yolostream-1-ab", "cd", 1000)


def test_an_empty_source_never_waits_for_a_first_frame():
    memory = StreamMemory(slots=1)
    memory.source_ended()
    assert memory.wait_first() is False


# The server's checks of a descriptor and of the offsets a frame names, on regions made here.

def test_the_server_refuses_unsealed_memfds_and_descriptors_that_are_not_memfds(tmp_path):
    # Without MFD_ALLOW_SEALING a memfd is sealed with F_SEAL_SEAL only: never against shrinking either.
    for name, flags in (("unsealed", os.MFD_ALLOW_SEALING), ("never-sealable", 0)):
        fd = os.memfd_create(name, flags)
        try:
            os.ftruncate(fd, 4096)
            with pytest.raises(RegionRefused, match="not sealed against shrinking"):
                check_region_fd(fd)
        finally:
            os.close(fd)
    path = tmp_path / "plain"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(RegionRefused, match="not a sealable memfd|not sealed against shrinking"):
            check_region_fd(fd)
    finally:
        os.close(fd)
    fd = sealed_memfd(4096, "sealed")
    try:
        assert check_region_fd(fd) == 4096
        with pytest.raises(RegionRefused, match="it must be 1 to 1024 bytes"):
            check_region_fd(fd, max_bytes=1024)
    finally:
        os.close(fd)


def test_a_sealed_hugetlbfs_memfd_is_refused():
    """Its pages come from a fixed pool: a server write finding the pool empty would raise SIGBUS."""
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    except OSError as err:
        pytest.skip(f"this kernel makes no hugetlbfs memfds ({err.strerror})")
    try:
        os.ftruncate(fd, 2 * 1024 * 1024)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        with pytest.raises(RegionRefused, match="hugetlbfs memfds are refused"):
            check_region_fd(fd)
    finally:
        os.close(fd)


def test_a_read_only_descriptor_of_a_sealed_memfd_is_refused():
    fd = sealed_memfd(4096, "read-only")
    try:
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            with pytest.raises(RegionRefused, match="cannot be mapped for reading and writing"):
                ClientRegion.map(ro)
        finally:
            os.close(ro)
    finally:
        os.close(fd)


@pytest.mark.parametrize("image, output, words", [
    (dict(offset=4096 - 100, length=48 * 64 * 3, height=48, width=64, channels=3), None, "past the end"),
    (dict(offset=2**64 - 1, length=12, height=2, width=2, channels=3), None, "past the end"),
    (dict(offset=0, length=12, height=2, width=2, channels=3, format=0), None, "pixel format"),
    (dict(offset=0, length=13, height=2, width=2, channels=3), None, "needs 12"),
    (dict(offset=0, length=0, height=0, width=2, channels=3), None, "empty size"),
    (dict(offset=0, length=12 * 2**40, height=2**21, width=2**21, channels=3), None, "over the server limit"),
    (None, (4000, 200), "past the end"),
    (None, (2**64 - 1, 2**64 - 1), "past the end"),
    (None, (0, 2**64 - 1), "past the end"),
])
def test_offsets_and_sizes_outside_the_region_fail_the_frame(image, output, words):
    fd = sealed_memfd(4096, "bounds")
    region = ClientRegion.map(fd)
    os.close(fd)
    try:
        ref = pb.SharedMemoryFrame()
        if image is not None:
            ref.image.CopyFrom(pb.SharedMemoryImage(**{"format": pb.PIXEL_FORMAT_BGR, **image}))
        if output is not None:
            ref.output_offset, ref.output_length = output
        with pytest.raises(FrameError, match=words):
            frame_pixels(pb.Frame(shared_memory=ref), region, FrameLimits())
    finally:
        region.close()


def test_a_frame_naming_shared_memory_on_a_stream_without_a_region_or_its_pixels_twice_fails():
    with pytest.raises(FrameError, match="its stream has no region"):
        frame_pixels(pb.Frame(shared_memory=pb.SharedMemoryFrame(output_length=8)), None, FrameLimits())
    fd = sealed_memfd(4096, "twice")
    region = ClientRegion.map(fd)
    os.close(fd)
    try:
        frame = pb.Frame(encoded=b"\xff\xd8", shared_memory=pb.SharedMemoryFrame(
            image=pb.SharedMemoryImage(offset=0, length=12, height=2, width=2, channels=3,
                                       format=pb.PIXEL_FORMAT_BGR)))
        with pytest.raises(FrameError, match="pixels twice"):
            frame_pixels(frame, region, FrameLimits())
        assert frame_pixels(pb.Frame(encoded=b"x"), region, FrameLimits()) is None
    finally:
        region.close()
        assert "/memfd:twice" not in _maps()


# The device's side of a region it writes into itself (device/regions.py) and how its descriptor reaches it.


def _target(region: int, offset: int, arrays: list[np.ndarray]) -> "OutputTarget":
    from yolostream.server.common.memfd import packed_spans, spans_end
    from yolostream.server.ipc.messages import OutputTarget

    spans = packed_spans(offset, [a.nbytes for a in arrays])
    return OutputTarget(region, offset, spans_end(offset, spans) - offset)


def test_the_device_writes_tensors_where_the_front_end_points_and_refuses_any_write_outside_the_mapping():
    from yolostream.server.device.regions import ClientRegions

    regions = ClientRegions(limit=2)
    fd = sealed_memfd(8192, "device-writes")
    unsealed = os.memfd_create("device-unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(unsealed, 8192)
        regions.share(0, fd, 8192)
        regions.share(1, unsealed, 8192)
        regions.share(2, fd, 8192)  # over the limit: refused, nothing mapped
        assert len(regions) == 2 and _maps().count("/memfd:device-writes") == 1
        arrays = [np.arange(10, dtype=np.float32), np.full((3, 5), 7, np.float16)]
        assert regions.write(_target(0, 100, arrays), arrays) is None
        view = np.frombuffer(os.pread(fd, 8192, 0), np.uint8)
        np.testing.assert_array_equal(view[128:168].view(np.float32), arrays[0])  # each 64-byte aligned
        np.testing.assert_array_equal(view[192:222].view(np.float16).reshape(3, 5), arrays[1])
        before = os.pread(fd, 8192, 0)
        assert "past the end" in regions.write(_target(0, 8192 - 64, arrays), arrays)
        assert "past the end" in regions.write(_target(0, 2**63, arrays), arrays)
        assert "internal error" in regions.write(_target(0, 0, arrays)._replace(length=4), arrays)
        assert "not sealed against shrinking" in regions.write(_target(1, 0, arrays), arrays)
        assert "not shared with the device" in regions.write(_target(2, 0, arrays), arrays)
        assert os.pread(fd, 8192, 0) == before
        regions.release(0)
        assert "/memfd:device-writes" not in _maps()
        assert "not shared with the device" in regions.write(_target(0, 0, arrays), arrays)
        regions.share(0, fd, 8192)
        regions.release(1)
        regions.share(3, fd, 16384)  # more than the memfd holds: refused (a mapping past its end could fault)
        assert "the front-end mapped 16384" in regions.write(_target(3, 0, arrays), arrays)
        regions.close()
        assert "/memfd:device-writes" not in _maps() and len(regions) == 0
    finally:
        os.close(fd)
        os.close(unsealed)


def test_a_region_descriptor_follows_its_message_on_the_link_and_the_messages_after_it_stay_whole():
    from multiprocessing import Pipe

    from yolostream.server.ipc.messages import Cancel, ShareRegion, descriptor_socket, receive_descriptor, \
        send_descriptor

    front, device = Pipe()
    front_sock, device_sock = descriptor_socket(front), descriptor_socket(device)
    fd = sealed_memfd(4096, "passed")
    try:
        front.send([ShareRegion(7, 4096)])
        send_descriptor(front_sock, fd)
        front.send([Cancel(1)])
        assert device.recv() == [ShareRegion(7, 4096)]
        passed = receive_descriptor(device_sock)
        try:
            assert passed != fd and os.fstat(passed).st_ino == os.fstat(fd).st_ino
        finally:
            os.close(passed)
        assert device.recv() == [Cancel(1)]
        front.close()
        front_sock.close()
        with pytest.raises(EOFError):
            receive_descriptor(device_sock)
    finally:
        os.close(fd)
        device_sock.close()
        device.close()


def test_a_descriptor_that_never_arrives_refuses_its_region_alone_and_the_link_stays_in_step():
    """The kernel drops passed descriptors a receiver has no room for (EMFILE) and delivers the byte alone: the
    device reads it, refuses that region (its frames fail saying why) and reads the next message whole."""
    from multiprocessing import Pipe

    from yolostream.server.device.regions import ClientRegions
    from yolostream.server.ipc.messages import Cancel, ShareRegion, descriptor_socket, receive_descriptor

    front, device = Pipe()
    front_sock, device_sock = descriptor_socket(front), descriptor_socket(device)
    try:
        front.send([ShareRegion(3, 4096)])
        front_sock.sendall(b"\x01")  # the byte, as a receiver out of descriptors gets it
        front.send([Cancel(2)])
        assert device.recv() == [ShareRegion(3, 4096)]
        assert receive_descriptor(device_sock) is None
        assert device.recv() == [Cancel(2)]
        regions = ClientRegions()
        regions.refuse(3, "out of file descriptors")
        arrays = [np.zeros(4, np.float32)]
        assert regions.write(_target(3, 0, arrays), arrays) == "out of file descriptors"
    finally:
        for closing in (front_sock, device_sock, front, device):
            closing.close()
