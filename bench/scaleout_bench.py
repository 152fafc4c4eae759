"""Scale-out on loopback: aggregate frames/s over 1, 2, 3 ``yolostream serve`` replicas, how streams spread over
them, and the failover gap (a replica SIGKILLed → the first answer resumed on another).

    PYTHONPATH=protos:server:client python bench/scaleout_bench.py [--replicas 1,2,3] [--streams 6]
                                   [--duration 5] [--min-frames 1] [--imgsz 128] [--json FILE]

Every replica is the real command (``yolostream serve --device cpu --metrics-port 0``) with the same flags; the
client is ``FeatureClient`` over the replica list, with ``streams`` concurrent streams in threads of this process,
each sending one raw frame over and over with ``max_in_flight`` frames in the server. Throughput counts the answers
inside a window after a warm-up that lasts ``duration`` and, on a machine too slow for that, until every stream has
had ``min-frames`` answers in it (``e2e_bench.close_window``); the spread is each replica's
``yolostream_streams_active`` gauge in the middle of that window. The failover gap is measured on one stream at
max_in_flight 1: the replica carrying it (the one whose gauge says 1) is SIGKILLed between two answers, and the gap
runs from the kill to the next answer, which comes from another replica after the resume; with N replicas it is
measured N-1 times.

On a machine with few cores the replicas share them with each other and with the client, so aggregate frames/s
cannot grow with the replicas here: the point of those rows is that it does not collapse and that streams spread.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_proc import REPO, ensure_importable  # noqa: E402

ensure_importable()
# The one ``yolostream serve`` launcher (start-up line, stderr kept) lives with the tests that share it.
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from conftest import ServeProcess  # noqa: E402
from e2e_bench import close_window  # noqa: E402

from yolostream.client import FeatureClient  # noqa: E402
from yolostream.client.client import DEFAULT_SETTLE_S  # noqa: E402


#: Replicas start together and share the cores: on a busy 2-core machine that took over a minute.
START_S = 300.0


def _streams_active(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(float(re.search(r"^yolostream_streams_active (\S+)$", text, re.M).group(1)))


class Group:
    """``count`` replicas started together; ``metrics[i]`` is replica i's metrics port."""

    def __init__(self, count: int, imgsz: int, folder: Path) -> None:
        self.procs = [ServeProcess(folder, "--port", "0", "--imgsz", str(imgsz), "--device", "cpu",
                                   "--metrics-port", "0", "--grace", "5") for _ in range(count)]
        try:
            self.addresses = [p.wait_serving(START_S) for p in self.procs]
        except BaseException:
            self.close()
            raise
        self.metrics = [int(re.search(r"metrics on :(\d+)/metrics", p.details).group(1)) for p in self.procs]

    def spread(self) -> list[int]:
        """Open streams per replica (-1 for one that is down)."""
        return [_streams_active(m) if p.proc.poll() is None else -1 for p, m in zip(self.procs, self.metrics)]

    def carrying(self, timeout: float = 10.0) -> int:
        """The replica whose gauge shows the one open stream (waiting up to ``timeout`` s for the gauges)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.spread()
            if counts.count(1) == 1 and sum(max(c, 0) for c in counts) == 1:
                return counts.index(1)
            threading.Event().wait(0.02)
        raise RuntimeError(f"no single replica carries the stream: {self.spread()}")

    def close(self) -> None:
        for p in self.procs:
            p.close()


def throughput(group: Group, streams: int, max_in_flight: int, warm_s: float, duration_s: float,
               frame: np.ndarray, settle_s: float, min_frames: int = 1) -> dict[str, Any]:
    """``streams`` concurrent streams through the replica list; answers counted inside the window, which lasts
    ``duration_s`` and until every stream has had ``min_frames`` answers in it."""
    stop = threading.Event()
    window = {"start": float("inf")}
    answered: list[list[float]] = [[] for _ in range(streams)]
    errors: list[str] = []

    def run(k: int, client: FeatureClient) -> None:
        frames = (frame for _ in iter(stop.is_set, True))
        try:
            for result in client.stream(frames, layers="backbone", max_in_flight=max_in_flight, encoding="raw"):
                now = time.perf_counter()
                if now >= window["start"] and result.ok:
                    answered[k].append(now)
        except Exception as err:  # reported in the row: a benchmark must not hide a failing stream
            errors.append(f"stream {k}: {err}")

    with FeatureClient(group.addresses, settle_s=settle_s) as client:
        threads = [threading.Thread(target=run, args=(k, client), daemon=True) for k in range(streams)]
        for t in threads:
            t.start()
        try:
            stop.wait(warm_s)
            window["start"] = time.perf_counter()
            stop.wait(duration_s / 2)
            spread = group.spread()
            # a stream that failed ends the window at once: the row reports its error
            end = close_window(window["start"], duration_s, lambda: [len(times) for times in answered], min_frames,
                               lambda: bool(errors) or not all(t.is_alive() for t in threads))
            window["end"] = time.perf_counter() if end is None else end
        finally:
            stop.set()
        for t in threads:
            t.join(timeout=30)
    counts = [sum(1 for at in times if at <= window["end"]) for times in answered]
    seconds = window["end"] - window["start"]
    return {"replicas": len(group.procs), "streams": streams, "max_in_flight": max_in_flight, "settle_s": settle_s,
            "frames": sum(counts), "window_s": seconds, "fps": sum(counts) / seconds, "per_stream_frames": counts,
            "streams_per_replica": spread, "errors": errors}


def failover(group: Group, frame: np.ndarray, frames_between: int = 40) -> list[dict[str, Any]]:
    """SIGKILL the replica carrying one stream, N-1 times; the gap from each kill to the next answer."""
    rows: list[dict[str, Any]] = []
    killed_at: float | None = None
    victim = -1
    kills_left = len(group.procs) - 1
    frames = (frame for _ in range(frames_between * (kills_left + 1)))
    with FeatureClient(group.addresses) as client:
        stream = client.stream(frames, layers="backbone", max_in_flight=1, encoding="raw")
        resumes_at_kill = 0
        for result in stream:
            now = time.perf_counter()
            # An answer the killed replica had already sent may still arrive: the gap ends at the first answer read
            # after the stream was reopened elsewhere.
            if killed_at is not None and stream.resumes > resumes_at_kill:
                rows.append({"killed": victim, "gap_ms": (now - killed_at) * 1000, "retries": result.retries,
                             "ok": result.ok})
                killed_at = None
            if kills_left and killed_at is None and result.frame_id % frames_between == frames_between - 1:
                victim = group.carrying()
                resumes_at_kill = stream.resumes
                group.procs[victim].proc.kill()
                killed_at = time.perf_counter()
                kills_left -= 1
        rows_resumes = stream.resumes
    for row in rows:
        row["stream_resumes"] = rows_resumes
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,3", help="comma list of replica counts (default 1,2,3)")
    parser.add_argument("--streams", type=int, default=6, help="concurrent streams (default 6)")
    parser.add_argument("--max-in-flight", type=int, default=4, help="frames in the server per stream (default 4)")
    parser.add_argument("--imgsz", type=int, default=128, help="model input size (default 128)")
    parser.add_argument("--warm", type=float, default=1.0, help="seconds before the window (default 1)")
    parser.add_argument("--duration", type=float, default=5.0, help="measuring window in seconds (default 5)")
    parser.add_argument("--min-frames", type=int, default=1,
                        help="answers each stream must have in the window, which lasts longer if needed (default 1)")
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S,
                        help="FeatureClient settle_s: how long new streams wait for every replica to connect")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    frame = np.random.default_rng(0).integers(0, 256, (args.imgsz * 3 // 4, args.imgsz, 3), dtype=np.uint8)
    results: dict[str, Any] = {"throughput": [], "failover": []}
    with tempfile.TemporaryDirectory(prefix="yolostream-scaleout-") as folder:
        for n in counts:
            print(f"[{time.strftime('%H:%M:%S')}] {n} replica(s)", file=sys.stderr, flush=True)
            group = Group(n, args.imgsz, Path(folder))
            try:
                row = throughput(group, args.streams, args.max_in_flight, args.warm, args.duration, frame,
                                 args.settle, args.min_frames)
                results["throughput"].append(row)
                if n > 1:
                    results["failover"].extend({"replicas": n, **r} for r in failover(group, frame))
            finally:
                group.close()
    print("| replicas | streams | settle s | frames/s | streams per replica | errors |\n|---|---|---|---|---|---|")
    for r in results["throughput"]:
        print(f"| {r['replicas']} | {r['streams']} | {r['settle_s']:g} | {r['fps']:.1f} | {r['streams_per_replica']} | "
              f"{len(r['errors'])} |")
    print("\n| replicas | killed | gap ms | first resumed answer ok | retries of that frame |\n|---|---|---|---|---|")
    for r in results["failover"]:
        print(f"| {r['replicas']} | {r['killed']} | {r['gap_ms']:.1f} | {r['ok']} | {r['retries']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
