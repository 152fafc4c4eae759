"""Server memory under abuse, counted over the whole server: heap and shared-memory arena apart, per process.

``yolostream serve`` is several processes (supervisor, device, front-ends, multiprocessing's resource tracker), so
RSS summed over them counts every shared library once per process and every arena page once per process that
touched it. This bench reads ``/proc/PID/smaps`` instead and splits each process's proportional set size (PSS:
a page shared by k processes counts 1/k in each, so a sum over the server counts it once) into

- **arena**: the mappings of the front-ends' shared-memory arenas (``/dev/shm/yolostream-…``): frames and features
  in flight. Their PSS summed over the processes is every arena page touched, once;
- **heap**: everything else, anonymous and file-backed (Python objects, malloc arenas, gRPC buffers, libraries).

The server is measured started, warm (legitimate streams of every kind the abuse uses, JPEG and raw 720p, read to
the end), after each round of abuse, and at the end (after an idle pause). One round of abuse is:

- ``--abandoned`` streams abandoned mid-stream (config, six 640x480 JPEG frames; nine in ten read one answer,
  then cancel; every tenth gives up before any answer);
- ``--floods`` raw 720p floods (``--flood-concurrency`` at a time, each on its own connection): a client asks for
  ``--flood-in-flight`` frames in flight, sends raw BGR 1280x720 frames (2.7 MB each) as fast as HTTP/2 lets it,
  never reads a reply, and goes away (cancels, closes its channel) after ``--flood-seconds``.

Two rounds tell a plateau (the second adds little) from a leak (each round adds as much again). With
``--background N``, N legitimate JPEG streams at 10 fps run through the rounds, so the server is never quiet.
The arenas' reserved size (what ``--shm-mb`` took from shared memory at start-up) is reported beside what was
touched.

    python bench/abuse_memory.py [--rounds 2] [--abandoned 200] [--floods 24] [--background 0] [--imgsz 320]
                                 [--frontends 1] [--json FILE]
    python bench/abuse_memory.py --quick      # one short round, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import cv2
import grpc
import numpy as np
import psutil

from yolostream.v1 import feature_service_pb2 as pb

REPO = Path(__file__).resolve().parents[1]

SERVING = re.compile(r"^yolostream serving \S+ on (\S+) ")
ARENA = re.compile(r"/dev/shm/yolostream-")
STREAM_METHOD = "/yolostream.v1.FeatureService/StreamFeatures"
MB = 1e6
RAW_HW = (720, 1280)
LAYERS = ["P3", "P4", "P5"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / d) for d in ("protos", "server", "client")]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def smaps_split(pid: int) -> dict[str, Any]:
    """PSS bytes of one process, split: ``arena`` (the server's /dev/shm mappings), ``heap`` (all the rest),
    ``anon`` (anonymous memory alone) and ``arena_rss`` (arena pages this process has mapped); ``segments``:
    the size of each arena it maps, by inode (what ``--shm-mb`` reserved).

    Reads /proc/PID/smaps: psutil's ``memory_full_info`` gives the PSS total, not which mapping it is in.
    """
    pss = arena = arena_rss = anon = 0
    segments: dict[str, int] = {}
    inode = None
    with open(f"/proc/{pid}/smaps") as lines:
        for line in lines:
            fields = line.split()
            head = fields[0]
            if not head.endswith(":"):  # a mapping's header line: "start-end perms offset dev inode [path]"
                inode = fields[4] if ARENA.search(line) else None
                continue
            kb = int(fields[1]) * 1024 if len(fields) > 1 and fields[1].isdigit() else 0
            if head == "Size:" and inode is not None:
                segments[inode] = segments.get(inode, 0) + kb
            elif head == "Pss:":
                pss += kb
                arena += kb if inode is not None else 0
            elif head == "Rss:" and inode is not None:
                arena_rss += kb
            elif head == "Anonymous:":
                anon += kb
    return {"heap": pss - arena, "arena": arena, "anon": anon, "arena_rss": arena_rss, "segments": segments}


def server_memory(root: int) -> dict[str, dict[str, int]]:
    """``smaps_split`` of every process of the server whose supervisor is ``root``, by role.

    The device is the supervisor's first child after the resource tracker (it is started, and must be ready,
    before any front-end); the front-ends follow in the order they were started.
    """
    supervisor = psutil.Process(root)
    children = sorted(supervisor.children(recursive=True), key=lambda p: p.create_time())
    roles: dict[str, psutil.Process] = {"supervisor": supervisor}
    frontends = 0
    for child in children:
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "resource_tracker" in cmdline:
            roles["resource tracker"] = child
        elif "device" not in roles:
            roles["device"] = child
        else:
            roles[f"front-end {frontends}"] = child
            frontends += 1
    out = {}
    for role, proc in roles.items():
        try:
            out[role] = smaps_split(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def totals(snapshot: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Heap and arena touched over the whole server (PSS sums: every page once), and the arenas reserved."""
    out = {key: sum(p[key] for p in snapshot.values()) for key in ("heap", "arena", "anon")}
    segments: dict[str, int] = {}
    for proc in snapshot.values():
        segments.update(proc["segments"])
    out["arena_reserved"] = sum(segments.values())
    return out


def _stub(channel: grpc.Channel) -> Any:
    """StreamFeatures taking pre-serialised requests: a flood must not spend its CPU re-serialising 2.7 MB."""
    return channel.stream_stream(STREAM_METHOD, request_serializer=lambda b: b,
                                 response_deserializer=pb.StreamResponse.FromString)


def _config(in_flight: int) -> bytes:
    return pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=LAYERS),
                                                   max_in_flight=in_flight)).SerializeToString()


def _frames(count: int, jpeg: bytes | None = None, raw: bytes | None = None) -> list[bytes]:
    h, w = RAW_HW
    out = []
    for k in range(count):
        if jpeg is not None:
            frame = pb.Frame(frame_id=k, encoded=jpeg)
        else:
            frame = pb.Frame(frame_id=k, raw=pb.RawImage(data=raw, height=h, width=w, channels=3,
                                                         format=pb.PIXEL_FORMAT_BGR))
        out.append(pb.StreamRequest(frame=frame).SerializeToString())
    return out


def legitimate(address: str, jpeg_frames: list[bytes], raw_frames: list[bytes], streams: int) -> None:
    """``streams`` streams of each kind (JPEG, raw 720p), every answer read: the warm server's work."""
    with grpc.insecure_channel(address) as channel:
        call = _stub(channel)
        for _ in range(streams):
            for frames in (jpeg_frames, raw_frames):
                answers = list(call(iter([_config(0), *frames]), timeout=120))
                bad = [a.result.status for a in answers if a.result.status != pb.FRAME_STATUS_OK]
                if len(answers) != len(frames) or bad:
                    raise RuntimeError(f"a legitimate stream got {len(answers)} answers, not OK: {bad}")


class Background:
    """``count`` legitimate streams of JPEG frames at ``fps`` each, every answer read, from ``start`` to
    ``stop``: a server that serves cameras while it is abused is never quiet."""

    def __init__(self, address: str, frames: list[bytes], count: int, fps: float = 10.0) -> None:
        self.address, self.frames, self.count, self.fps = address, frames, count, fps
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        self.answered = 0

    def _requests(self) -> Iterator[bytes]:
        yield _config(0)
        k = 0
        while not self._stop.wait(1.0 / self.fps):
            yield self.frames[k % len(self.frames)]
            k += 1

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            for answer in _stub(channel)(self._requests(), timeout=3600):
                if answer.result.status != pb.FRAME_STATUS_OK:
                    raise RuntimeError(f"a background stream got {answer.result.status}")
                self.answered += 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def abandon_streams(address: str, count: int, frames: list[bytes]) -> None:
    """Open ``count`` streams one after another and give each up mid-stream."""
    with grpc.insecure_channel(address) as channel:
        call = _stub(channel)
        for k in range(count):
            responses = call(iter([_config(4), *frames]), timeout=60)
            if k % 10 != 9:
                next(responses)
            responses.cancel()


def flood(address: str, frames: list[bytes], in_flight: int, seconds: float) -> int:
    """One flood: send raw frames as fast as HTTP/2 lets us, never read a reply, go away after ``seconds``.
    Returns the frames handed to gRPC (the last few may still have been in the client's buffers)."""
    stop = threading.Event()
    sent = [0]

    def requests() -> Iterator[bytes]:
        yield _config(in_flight)
        while not stop.is_set():
            yield frames[sent[0] % len(frames)]
            sent[0] += 1

    channel = grpc.insecure_channel(address)
    try:
        responses = _stub(channel)(requests(), timeout=seconds + 60)
        time.sleep(seconds)
        stop.set()
        responses.cancel()
    finally:
        channel.close()
    return sent[0]


def floods(address: str, frames: list[bytes], count: int, concurrency: int, in_flight: int,
           seconds: float) -> int:
    """``count`` floods, ``concurrency`` at a time; frames sent over all of them."""
    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(lambda _: flood(address, frames, in_flight, seconds), range(count)))


def settle(pid: int, seconds: float) -> dict[str, dict[str, int]]:
    """The server's memory after ``seconds`` of quiet (replies of cancelled streams drain, idle hooks run)."""
    time.sleep(seconds)
    return server_memory(pid)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Start a server, warm it, abuse it ``args.rounds`` times and snapshot its memory after each step."""
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    jpeg_frames = _frames(6, jpeg=cv2.imencode(".jpg", image)[1].tobytes())
    raw = np.random.default_rng(1).integers(0, 256, (*RAW_HW, 3), dtype=np.uint8).tobytes()
    raw_frames = _frames(4, raw=raw)
    command = [sys.executable, "-m", "yolostream.server.cli", "serve", "--port", "0", "--device", "cpu",
               "--imgsz", str(args.imgsz), "--frontends", str(args.frontends), "--grace", "5",
               *(["--shm-mb", str(args.shm_mb)] if args.shm_mb else [])]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    snapshots: list[tuple[str, dict[str, dict[str, int]]]] = []
    steps: list[dict[str, Any]] = []
    try:
        address = None
        for line in proc.stdout:
            match = SERVING.match(line)
            if match:
                address = match.group(1)
                break
        if address is None:
            raise RuntimeError(f"the server exited ({proc.wait()}) before serving")
        snapshots.append(("started", settle(proc.pid, args.settle)))
        legitimate(address, jpeg_frames, raw_frames, args.warm_streams)
        snapshots.append(("warm", settle(proc.pid, args.settle)))
        background = Background(address, jpeg_frames, args.background)
        background.start()
        for round_ in range(1, args.rounds + 1):
            start = time.perf_counter()
            abandon_streams(address, args.abandoned, jpeg_frames)
            sent = floods(address, raw_frames, args.floods, args.flood_concurrency, args.flood_in_flight,
                          args.flood_seconds)
            steps.append({"round": round_, "seconds": time.perf_counter() - start, "flood_frames_sent": sent})
            snapshots.append((f"after round {round_}", settle(proc.pid, args.settle)))
        background.stop()
        legitimate(address, jpeg_frames, raw_frames, 1)  # the abused server still serves
        snapshots.append(("end", settle(proc.pid, args.end_wait)))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "steps": steps,
            "snapshots": [{"when": when, "processes": snap, "total": totals(snap)} for when, snap in snapshots]}


def report(row: dict[str, Any]) -> str:
    """A table: heap (and anonymous) and arena per process at each snapshot, then the totals against warm."""
    snaps = row["snapshots"]
    roles = list(dict.fromkeys(role for s in snaps for role in s["processes"]))
    header = "| MB (PSS) | " + " | ".join(s["when"] for s in snaps) + " |"
    lines = [header, "|---" * (len(snaps) + 1) + "|"]
    for role in roles:
        for key, label in (("heap", "heap"), ("arena", "arena touched")):
            values = [s["processes"].get(role, {}).get(key) for s in snaps]
            if key == "arena" and not any(values):
                continue
            cells = " | ".join("" if v is None else f"{v / MB:.1f}" for v in values)
            lines.append(f"| {role} {label} | {cells} |")
    warm = next(s for s in snaps if s["when"] == "warm")["total"]
    lines.append("| all processes, arena reserved | " + " | ".join(f"{s['total']['arena_reserved'] / MB:.1f}"
                                                                 for s in snaps) + " |")
    cells = " | ".join(f"**{s['total']['heap'] / MB:.1f}** ({(s['total']['heap'] / warm['heap'] - 1) * 100:+.0f} %)"
                       for s in snaps)
    lines.append(f"| **all processes, heap** | {cells} |")
    lines.append("| **all processes, arena touched** | "
                 + " | ".join(f"**{s['total']['arena'] / MB:.1f}**" for s in snaps) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--abandoned", type=int, default=200, help="abandoned streams per round")
    parser.add_argument("--floods", type=int, default=24, help="raw 720p floods per round")
    parser.add_argument("--flood-concurrency", type=int, default=4)
    parser.add_argument("--flood-in-flight", type=int, default=64,
                        help="max_in_flight a flood asks for (the server's default limit is 64)")
    parser.add_argument("--flood-seconds", type=float, default=2.0)
    parser.add_argument("--warm-streams", type=int, default=2, help="legitimate streams of each kind to warm up")
    parser.add_argument("--background", type=int, default=0,
                        help="legitimate JPEG streams at 10 fps running through the abuse rounds")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--frontends", type=int, default=1)
    parser.add_argument("--shm-mb", type=int, default=0, help="--shm-mb for the server (default: the server's)")
    parser.add_argument("--settle", type=float, default=6.0,
                        help="seconds after each step before its snapshot (a child trims its heap within about 4 s "
                             "of going quiet)")
    parser.add_argument("--end-wait", type=float, default=10.0, help="seconds of quiet before the last one")
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the snapshots here")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.abandoned, args.floods, args.flood_concurrency = 1, 20, 2, 2
        args.flood_seconds, args.warm_streams, args.end_wait = 1.0, 1, args.settle
    row = measure(args)
    if args.json:
        args.json.write_text(json.dumps(row, indent=1))
    print(report(row))
    warm = next(s for s in row["snapshots"] if s["when"] == "warm")["total"]["heap"]
    worst = max(s["total"]["heap"] for s in row["snapshots"] if s["when"].startswith("after"))
    end = row["snapshots"][-1]["total"]["heap"]
    took = ", ".join(f"{step['seconds']:.0f} s ({step['flood_frames_sent']} flood frames sent)"
                     for step in row["steps"])
    print(f"heap over all processes: {warm / MB:.0f} MB warm, {worst / MB:.0f} MB after abuse at most "
          f"({(worst / warm - 1) * 100:+.1f} %), {end / MB:.0f} MB at the end ({(end / warm - 1) * 100:+.1f} %); "
          f"rounds took {took}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
