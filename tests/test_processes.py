"""The process layout of ``yolostream serve``: front-end processes, one device process, shared memory.

Real servers on 127.0.0.1 (ephemeral ports) and a Unix socket in the test's temporary folder; every wait is
bounded, and every process a test starts is stopped (``ServeProcess.close`` kills what is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import feature_service_pb2_grpc as pb_grpc
from yolostream.v1 import wire

from conftest import ServeProcess, cpu_runner, grpc_channel, raw_frame, serve_cmd, serve_env

WAIT = 60.0
#: torch, as the in-process reference runs it: the streams must be bit-equal to it.
SERVE = ("--port", "0", "--imgsz", "64", "--device", "cpu", "--max-batch", "1", "--shm-mb", "16", "--backend", "torch")


def _config(max_in_flight: int = 4, layers: tuple[str, ...] = ("P3", "backbone")) -> pb.StreamRequest:
    return pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=list(layers)),
                                                   max_in_flight=max_in_flight))


def _children(server: ServeProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def _roles(server: ServeProcess, uds: Path | None = None) -> dict[str, list[int]]:
    """pids of the device process (the one that mapped libtorch) and of the front-ends (the others)."""
    roles: dict[str, list[int]] = {"device": [], "frontends": [], "uds": []}
    for child in _children(server):
        try:
            maps = Path(f"/proc/{child.pid}/maps").read_text()
            cmdline = " ".join(child.cmdline())
        except (OSError, psutil.NoSuchProcess):
            continue
        if "resource_tracker" in cmdline:
            continue
        roles["device" if "libtorch" in maps else "frontends"].append(child.pid)
        if uds is not None:
            try:
                if any(c.laddr == str(uds) for c in child.net_connections(kind="unix")):
                    roles["uds"].append(child.pid)
            except psutil.NoSuchProcess:
                pass
    return roles


def _wait_for(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _stream(address: str, frames: int, gate: threading.Event | None = None, hold_after: int | None = None,
            timeout: float = WAIT) -> list[pb.FrameResult]:
    """Stream ``frames`` raw frames; with ``gate``, frames after ``hold_after`` wait for it."""

    def requests() -> Iterator[pb.StreamRequest]:
        yield _config()
        for k in range(frames):
            if gate is not None and hold_after is not None and k == hold_after:
                assert gate.wait(WAIT)
            yield pb.StreamRequest(frame=raw_frame(k, 48, 64))

    with grpc_channel(address) as channel:
        call = pb_grpc.FeatureServiceStub(channel).StreamFeatures(requests(), timeout=timeout)
        return [response.result for response in call]


def _arrays(result: pb.FrameResult) -> dict[str, np.ndarray]:
    return {t.name: wire.tensor_from_proto(t) for t in result.tensors}


@pytest.fixture(scope="module")
def reference() -> list[dict[str, np.ndarray]]:
    """The features of the streamed frames from the in-process server (one front-end), at batch 1."""
    from yolostream.server.common.settings import ServerSettings
    from yolostream.server.serve.in_process import ServerThread

    runner = cpu_runner(64)
    with ServerThread(runner, ServerSettings(port=0, max_batch=1, shm_mb=16)) as server:
        return [_arrays(r) for r in _stream(server.address, 6)]


def test_two_frontends_serve_eight_streams_in_order_bit_equal_and_import_no_torch(tmp_path, reference):
    server = ServeProcess(tmp_path, *SERVE, "--frontends", "2")
    try:
        address = server.wait_serving()
        assert "2 front-ends" in server.details
        results: list[list[pb.FrameResult] | None] = [None] * 8

        def run(k: int) -> None:
            results[k] = _stream(address, 6)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        for stream in results:
            assert stream is not None and [r.frame_id for r in stream] == list(range(6))
            assert all(r.status == pb.FRAME_STATUS_OK for r in stream), [r.error_message for r in stream]
            for got, want in zip(stream, reference):
                arrays = _arrays(got)
                assert arrays.keys() == want.keys()
                for name in want:
                    np.testing.assert_array_equal(arrays[name], want[name])
        roles = _roles(server)
        assert len(roles["device"]) == 1 and len(roles["frontends"]) == 2, roles
    finally:
        server.close()


@contextlib.contextmanager
def _frontends_on_one_device(runner: object, batching: object, count: int) -> Iterator[tuple[object, list[int]]]:
    """``count`` front-ends (the classes ``serve`` runs, in this process, on one event loop thread) on one device
    host running ``runner``: yields the host and the front-ends' ports; stops everything however the test ends."""
    from yolostream.server.common.settings import ServerSettings
    from yolostream.server.device.process import DeviceHost
    from yolostream.server.frontend.link import DeviceLink
    from yolostream.server.frontend.server import FeatureServer
    from yolostream.server.ipc.shm import arena_name, segment_prefix

    host = DeviceHost(runner, batching).start()
    loop = asyncio.new_event_loop()
    settings = ServerSettings(port=0, shm_mb=16)
    card = runner.card()
    servers = [FeatureServer(settings, card, batching,
                             DeviceLink(host.address, host.authkey, arena_name(segment_prefix(), k, 0),
                                        settings.shm_bytes, batching.queue_capacity))
               for k in range(count)]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield host, [asyncio.run_coroutine_threadsafe(s.start(), loop).result(WAIT) for s in servers]
    finally:
        for s in servers:
            asyncio.run_coroutine_threadsafe(s.stop(1), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()
        host.stop(drain=False, timeout=5)


def test_frames_of_two_frontends_share_one_device_batch():
    """Two front-ends (the same classes as ``serve``, in one process) feed one device host: one batch holds both."""
    from yolostream.server.ipc.batching import BatcherConfig

    runner = cpu_runner(64)
    gate = threading.Event()
    batches: list[int] = []

    class Gated:
        """The runner, holding its first batch until both front-ends have queued a frame."""

        def __getattr__(self, name):
            return getattr(runner, name)

        def launch(self, images, keys):
            batches.append(len(images))
            if len(batches) == 1:
                assert gate.wait(WAIT)
            return runner.launch(images, keys)

    try:
        with _frontends_on_one_device(Gated(), BatcherConfig(max_batch=4, workers=1), 2) as (host, ports):
            channels = [grpc_channel(f"127.0.0.1:{port}") for port in ports]
            stubs = [pb_grpc.FeatureServiceStub(c) for c in channels]
            first = stubs[0].Extract.future(pb.ExtractRequest(frame=raw_frame(0)), timeout=WAIT)
            _wait_for(lambda: batches, "the first batch")
            pair = [stub.Extract.future(pb.ExtractRequest(frame=raw_frame(k + 1)), timeout=WAIT)
                    for k, stub in enumerate(stubs)]
            _wait_for(lambda: host.batcher.queued == 2, "a frame from each front-end in the device queue")
            gate.set()
            assert first.result().batch_size == 1
            assert [f.result().batch_size for f in pair] == [2, 2]
            assert batches == [1, 2]
            for c in channels:
                c.close()
    finally:
        gate.set()


def test_frames_the_stopping_device_drops_end_their_call_unavailable_not_as_frame_errors():
    """The device stops (its supervisor was killed, say) with a frame still queued: that frame is not the frame's
    fault, so its call ends UNAVAILABLE (a client resumes it on another replica) instead of answering it ERROR."""
    from yolostream.server.ipc.batching import BatcherConfig

    runner = cpu_runner(64)
    gate, started = threading.Event(), threading.Event()

    class Gated:
        """The runner, holding its first batch until the test lets it go."""

        def __getattr__(self, name):
            return getattr(runner, name)

        def launch(self, images, keys):
            started.set()
            assert gate.wait(WAIT)
            return runner.launch(images, keys)

    stopper = None
    try:
        with _frontends_on_one_device(Gated(), BatcherConfig(max_batch=1, workers=1), 1) as (host, (port,)), \
                grpc_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            first = stub.Extract.future(pb.ExtractRequest(frame=raw_frame(0)), timeout=WAIT)
            assert started.wait(WAIT)
            queued = stub.Extract.future(pb.ExtractRequest(frame=raw_frame(1)), timeout=WAIT)
            _wait_for(lambda: host.batcher.queued == 1, "the second frame in the device queue")
            # fails what is queued at once, then waits for the batch being computed
            stopper = threading.Thread(target=host.batcher.close, kwargs={"drain": False, "timeout": WAIT})
            stopper.start()
            with pytest.raises(grpc.RpcError) as raised:
                queued.result(WAIT)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value.details()
            assert "the device process is stopping" in raised.value.details()
            gate.set()
            assert first.result(WAIT).status == pb.FRAME_STATUS_OK
    finally:
        gate.set()
        if stopper is not None:
            stopper.join(WAIT)


def test_a_killed_frontend_is_replaced_and_streams_elsewhere_finish(tmp_path):
    uds = tmp_path / "serve.sock"
    server = ServeProcess(tmp_path, *SERVE, "--frontends", "2", "--uds", str(uds))
    try:
        address = server.wait_serving()
        _wait_for(lambda: _roles(server, uds)["uds"], "front-end 0 on the Unix socket")
        roles = _roles(server, uds)
        keeper, victim = roles["uds"][0], next(p for p in roles["frontends"] if p not in roles["uds"])
        gate = threading.Event()
        done: list[list[pb.FrameResult]] = []
        survivor = threading.Thread(target=lambda: done.append(_stream(f"unix:{uds}", 8, gate, hold_after=4)))
        survivor.start()
        psutil.Process(victim).send_signal(signal.SIGKILL)
        _wait_for(lambda: len(_roles(server)["frontends"]) == 2 and victim not in _roles(server)["frontends"],
                  "a replacement front-end")
        gate.set()
        survivor.join(WAIT)
        assert done and [r.frame_id for r in done[0]] == list(range(8))
        assert all(r.status == pb.FRAME_STATUS_OK for r in done[0])
        assert keeper in _roles(server)["frontends"]
        with grpc_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        for _ in range(4):  # new connections land on either front-end, the replacement included
            stream = _stream(address, 2)
            assert [r.status for r in stream] == [pb.FRAME_STATUS_OK] * 2
        assert "front-end 1 died (killed by SIGKILL); replacing it" in server.stderr()
    finally:
        server.close()


def test_sigterm_with_two_frontends_answers_every_accepted_frame_and_leaves_nothing(tmp_path):
    server = ServeProcess(tmp_path, *SERVE, "--frontends", "2", "--grace", "20")
    try:
        address = server.wait_serving()
        prefix = f"yolostream-{server.proc.pid}-"
        children = _children(server)
        release = threading.Event()
        outcome: dict[str, object] = {}

        def requests() -> Iterator[pb.StreamRequest]:
            yield _config(max_in_flight=6)
            for k in range(6):
                yield pb.StreamRequest(frame=raw_frame(k, 48, 64))
            release.wait(WAIT)

        def run() -> None:
            results = []
            with grpc_channel(address) as channel:
                call = pb_grpc.FeatureServiceStub(channel).StreamFeatures(requests(), timeout=WAIT)
                try:
                    for response in call:
                        results.append(response.result)
                        if len(results) == 1:
                            outcome["first"] = True
                except grpc.RpcError as err:
                    outcome["code"] = err.code()
            outcome["results"] = results

        client = threading.Thread(target=run)
        client.start()
        _wait_for(lambda: "first" in outcome, "the first answer")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=WAIT) == 0, server.stderr()
        release.set()
        client.join(WAIT)
        results = outcome["results"]
        assert [r.frame_id for r in results] == list(range(6))
        assert all(r.status == pb.FRAME_STATUS_OK for r in results)
        assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
        _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                  "every child process to exit")
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    finally:
        server.close()


def test_sigkill_of_the_supervisor_leaves_no_child_and_no_shared_memory(tmp_path):
    server = ServeProcess(tmp_path, *SERVE, "--frontends", "2")
    try:
        address = server.wait_serving()
        assert [r.status for r in _stream(address, 2)] == [pb.FRAME_STATUS_OK] * 2
        prefix = f"yolostream-{server.proc.pid}-"
        children = _children(server)
        assert len(children) >= 3
        server.proc.kill()
        server.proc.wait(WAIT)

        def gone(p: psutil.Process) -> bool:
            try:
                return p.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        _wait_for(lambda: all(gone(c) for c in children), "every child to die with the supervisor")
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    finally:
        server.close()


def test_the_device_dying_ends_streams_unavailable_and_the_server_exits_non_zero(tmp_path):
    server = ServeProcess(tmp_path, *SERVE)
    try:
        address = server.wait_serving()
        device = _roles(server)["device"]
        assert len(device) == 1
        prefix, children = f"yolostream-{server.proc.pid}-", _children(server)
        with grpc_channel(address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            psutil.Process(device[0]).kill()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        assert server.proc.wait(timeout=WAIT) == 1
        lines = [line for line in server.stderr().splitlines() if "device process died" in line]
        assert lines == ["yolostream: the device process died (killed by SIGKILL); stopping"], server.stderr()
        _wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                  "every child process to exit")
        assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    finally:
        server.close()


@pytest.mark.parametrize("flags, needle", [(("--frontends", "0"), "--frontends must be at least 1"),
                                           (("--frontends", "65"), "--frontends 65 is over 64"),
                                           (("--shm-mb", "4"), "--shm-mb must be at least 8")])
def test_process_settings_out_of_range_are_one_line_errors(tmp_path, flags, needle):
    proc = subprocess.run(serve_cmd("--port", "0", *flags), capture_output=True, text=True, env=serve_env(),
                          timeout=WAIT, cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr


def test_a_frame_larger_than_the_shared_memory_fails_alone():
    """A frame whose input plus features cannot fit the front-end's arena (--shm-mb) gets a per-frame ERROR
    naming the limit; frames that fit are answered as usual."""
    from yolostream.server.common.settings import ServerSettings
    from yolostream.server.serve.in_process import ServerThread

    with ServerThread(cpu_runner(), ServerSettings(port=0, shm_mb=8)) as server:
        with grpc_channel(server.address) as channel:
            stub = pb_grpc.FeatureServiceStub(channel)
            big = stub.Extract(pb.ExtractRequest(frame=raw_frame(0), options=pb.FeatureOptions(imgsz=2048)),
                               timeout=WAIT)
            assert big.status == pb.FRAME_STATUS_ERROR and "--shm-mb" in big.error_message, big.error_message
            assert "shared memory" in big.error_message and len(big.error_message) < 400
            small = stub.Extract(pb.ExtractRequest(frame=raw_frame(1)), timeout=WAIT)
            assert small.status == pb.FRAME_STATUS_OK
