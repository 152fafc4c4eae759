"""Server memory after abuse: RSS of every ``yolostream serve`` process before and after many abandoned streams.

Each stream sends a config and a few 640×480 JPEG frames, reads at most one answer, and is cancelled (as a client
that goes away mid-stream); every tenth one is given up before any answer. RSS is summed over the supervisor,
the device process and the front-ends (pages of a shared-memory arena count once per process that touched them,
as the kernel reports them).

    python bench/abuse_memory.py [--streams 1000] [--imgsz 640] [--frontends 1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import grpc
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"^yolostream serving \S+ on (\S+) ")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / d) for d in ("protos", "server", "client")]
                                        + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def abandon_streams(address: str, count: int, jpeg: bytes) -> None:
    """Open ``count`` streams one after another and give each up mid-stream."""
    sys.path[:0] = [str(REPO / "protos")]
    from yolostream.v1 import feature_service_pb2 as pb
    from yolostream.v1 import feature_service_pb2_grpc as pb_grpc

    config = pb.StreamRequest(config=pb.StreamConfig(options=pb.FeatureOptions(layers=["P3", "P4", "P5"]),
                                                     max_in_flight=4))
    frames = [pb.StreamRequest(frame=pb.Frame(frame_id=k, encoded=jpeg)) for k in range(6)]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        for k in range(count):
            call = stub.StreamFeatures(iter([config, *frames]), timeout=60)
            if k % 10 != 9:
                next(call)
            call.cancel()


def measure(streams: int, imgsz: int, frontends: int, warm_streams: int = 1) -> dict[str, float]:
    """RSS (MB) of the warm server (started, ``warm_streams`` streams served), then after ``streams`` abandoned ones."""
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
    proc = subprocess.Popen([sys.executable, "-m", "yolostream.server.cli", "serve", "--port", "0", "--device",
                             "cpu", "--imgsz", str(imgsz), "--frontends", str(frontends), "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env())
    try:
        address = None
        for line in proc.stdout:
            match = SERVING.match(line)
            if match:
                address = match.group(1)
                break
        if address is None:
            raise RuntimeError(f"the server exited ({proc.wait()}) before serving")
        abandon_streams(address, warm_streams, jpeg)
        time.sleep(1.0)
        warm = tree_rss(proc.pid)
        start = time.perf_counter()
        abandon_streams(address, streams, jpeg)
        elapsed = time.perf_counter() - start
        time.sleep(1.0)
        after = tree_rss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"streams": streams, "imgsz": imgsz, "frontends": frontends, "warm_mb": warm / 1e6,
            "after_mb": after / 1e6, "growth": after / warm - 1.0, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--frontends", type=int, default=1)
    args = parser.parse_args(argv)
    row = measure(args.streams, args.imgsz, args.frontends)
    print(json.dumps(row))
    print(f"RSS {row['warm_mb']:.0f} MB warm -> {row['after_mb']:.0f} MB after {row['streams']} abandoned streams "
          f"({row['growth'] * 100:+.1f} %), {row['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
