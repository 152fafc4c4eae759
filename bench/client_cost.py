"""What streaming costs the client: CPU per 640x480 frame (encode + send + receive + decode to numpy), JPEG vs raw,
and the largest frames/s one client process sustains against a local server asked only for layer 0.

    PYTHONPATH=protos:server:client python bench/client_cost.py [--frames 200] [--json results.json]

The server runs in its own process (``server_proc.py``), so ``time.process_time()`` here is the client's CPU alone,
all its threads together: the sender thread encoding frames, gRPC's C-core threads, and the reader turning replies
into numpy arrays. The server's CPU is read apart from its process. Both share this machine's CPUs: on a small VM
they compete, so the frames/s measured here are a lower bound of what a client gets from a server on another host.

Layer 0 of yolov5n at a 640x480 input is a (16, 240, 320) map, 4.9 MB in float32 per frame: the reply size, not
the model, then sets the pace. Each encoding is therefore measured with the full float32 map, the float16 map, and
the map average-pooled to 16 numbers (the client's own per-frame cost with next to nothing coming back).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_proc import ServerProcess, server_args  # noqa: E402  (bench helper beside this file)

from yolostream.client import FeatureClient  # noqa: E402
from yolostream.client.options import fill_frame  # noqa: E402
from yolostream.v1 import feature_service_pb2 as pb  # noqa: E402

HEIGHT, WIDTH = 480, 640

#: (label, dtype, pooling) of the replies asked for; the layer is always "0".
REPLIES = (("float32 map", "float32", "none"), ("float16 map", "float16", "none"), ("avg-pooled", "float32", "avg"))


def camera_like_frame(seed: int = 0) -> np.ndarray:
    """A 640x480 BGR picture with smooth areas, edges and sensor noise, so JPEG sizes and times are realistic."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    img = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, (x + y) * 127 // (WIDTH + HEIGHT)], -1).astype(np.float32)
    img += rng.normal(0, 4, img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(12):
        cx, cy, r = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT)), int(rng.integers(10, 80))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(img, (cx, cy), r, colour, -1) if rng.random() < 0.5 else \
            cv2.rectangle(img, (cx, cy), (cx + r, cy + r // 2), colour, -1)
    return img


@dataclass
class EncodeCost:
    encoding: str
    cpu_ms: float  # per frame, fill_frame: encode and put into the message
    serialize_ms: float  # per frame, protobuf serialisation of the request (done by gRPC when sending)
    bytes: int


def encode_cost(image: np.ndarray, encoding: str, reps: int) -> EncodeCost:
    request = pb.StreamRequest()
    start = time.process_time()
    for _ in range(reps):
        request = pb.StreamRequest()
        fill_frame(request.frame, image, encoding, 90)
    encode = (time.process_time() - start) / reps
    start = time.process_time()
    for _ in range(reps):
        data = request.SerializeToString()
    serialize = (time.process_time() - start) / reps
    return EncodeCost(encoding, encode * 1000, serialize * 1000, len(data))


@dataclass
class StreamCost:
    encoding: str
    reply: str
    frames: int
    fps: float
    client_cpu_ms: float  # per frame, every thread of this process
    server_cpu_ms: float  # per frame, the server process
    reply_bytes: int
    mean_batch: float
    latency_p50_ms: float


def stream_cost(client: FeatureClient, server: ServerProcess, image: np.ndarray, encoding: str, reply: tuple,
                frames: int) -> StreamCost:
    label, dtype, pooling = reply
    options = dict(layers=["0"], dtype=dtype, pooling=pooling, encoding=encoding, max_in_flight=8)
    for _ in client.stream([image] * 8, **options):  # warm-up: connection, server batch shapes
        pass
    wall, cpu, server_cpu = time.perf_counter(), time.process_time(), server.cpu_seconds()
    latencies, batches, reply_bytes = [], [], 0
    for result in client.stream((image for _ in range(frames)), **options):
        if not result.ok:
            raise RuntimeError(f"frame {result.frame_id}: {result.status} {result.error}")
        array = result.features["0"]  # decoded: a numpy view of the reply
        reply_bytes = array.nbytes
        latencies.append(result.latency)
        batches.append(result.batch_size)
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    server_cpu = server.cpu_seconds() - server_cpu
    return StreamCost(encoding, label, frames, frames / wall, cpu / frames * 1000, server_cpu / frames * 1000,
                      reply_bytes, float(np.mean(batches)), float(np.median(latencies)) * 1000)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="frames per measured stream (default 200)")
    parser.add_argument("--encodings", default="jpeg,raw")
    parser.add_argument("--replies", default=",".join(r[0] for r in REPLIES),
                        help="which replies to measure: " + ", ".join(r[0] for r in REPLIES))
    parser.add_argument("--bypass", action="store_true", help="server skips the model (transport alone)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    encodings = [e for e in args.encodings.split(",") if e]
    replies = [r for r in REPLIES if r[0] in args.replies.split(",")]

    import os

    image = camera_like_frame()
    print(f"client: pid {os.getpid()}, {os.cpu_count()} CPUs shared with the server process", flush=True)
    encode = [encode_cost(image, e, reps=100) for e in encodings]
    for e in encode:
        print(f"encode {e.encoding:<4}  {e.cpu_ms:6.2f} ms CPU + {e.serialize_ms:5.2f} ms protobuf serialisation, "
              f"{e.bytes / 1024:7.1f} KiB per 640x480 frame", flush=True)
    streams = []
    with ServerProcess(server_args("yolov5n", 640, device="cpu", bypass=args.bypass)) as server:
        print(f"server: {server.info}", flush=True)
        with FeatureClient(server.address) as client:
            for encoding in encodings:
                for reply in replies:
                    cost = stream_cost(client, server, image, encoding, reply, args.frames)
                    streams.append(cost)
                    print(f"stream {cost.encoding:<4} {cost.reply:<12} {cost.fps:6.1f} frames/s  client "
                          f"{cost.client_cpu_ms:6.2f} ms CPU/frame  server {cost.server_cpu_ms:6.2f} ms CPU/frame  "
                          f"reply {cost.reply_bytes / 1e6:5.2f} MB  batch {cost.mean_batch:4.1f}  "
                          f"p50 {cost.latency_p50_ms:6.1f} ms", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpus": os.cpu_count(), "bypass": args.bypass,
                                               "encode": [asdict(e) for e in encode],
                                               "streams": [asdict(s) for s in streams]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
