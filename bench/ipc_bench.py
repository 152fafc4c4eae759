"""The front-end ↔ device control channel: ``multiprocessing.connection`` against pyzmq, on the real messages.

A front-end sends the device one small message per frame (a RUN tuple: slot offsets, shape, requested outputs) and
the device answers once per batch. Both channels here move exactly those pickled messages between two processes,
ping-pong with ``depth`` messages in flight, and report messages/s and the CPU time both processes spend per
message. pyzmq is optional: without it the table has the stdlib row only.

    python bench/ipc_bench.py [--seconds 3] [--depth 1,8]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import secrets
import sys
import time
from typing import Any

import psutil

RUN = ("run", 123456, 1 << 20, (640, 640, 3), 1 << 24, 409600, ((9, "none", "float32"),))
RESULT = ("results", [(123456, 1, 250, 4000, 30)], [])


def _stdlib_device(address: str, authkey: bytes) -> None:
    from multiprocessing.connection import Listener

    with Listener(address, family="AF_UNIX", authkey=authkey) as listener, listener.accept() as conn:
        while True:
            try:
                conn.recv()
            except EOFError:
                return
            conn.send(RESULT)


def _zmq_device(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(endpoint)
    while True:
        data = sock.recv()
        if data == b"stop":
            break
        pickle.loads(data)
        sock.send(pickle.dumps(RESULT))
    sock.close()
    ctx.term()


def _measure(send: Any, recv: Any, peer: psutil.Process, seconds: float, depth: int) -> dict[str, float]:
    for _ in range(depth):
        send([RUN])
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2]) + sum(peer.cpu_times()[:2])
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        recv()
        send([RUN])
        count += 1
    elapsed = time.perf_counter() - start
    cpu = sum(me.cpu_times()[:2]) + sum(peer.cpu_times()[:2]) - cpu0
    for _ in range(depth):
        recv()
    return {"msgs_s": count / elapsed, "cpu_us_per_msg": cpu / count * 1e6}


def bench_stdlib(seconds: float, depth: int) -> dict[str, float]:
    from multiprocessing.connection import Client

    address, authkey = f"\0yolostream-ipc-bench-{os.getpid()}-{secrets.token_hex(4)}", secrets.token_bytes(16)
    proc = mp.get_context("spawn").Process(target=_stdlib_device, args=(address, authkey), daemon=True)
    proc.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = Client(address, family="AF_UNIX", authkey=authkey)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    try:
        return _measure(conn.send, conn.recv, psutil.Process(proc.pid), seconds, depth)
    finally:
        conn.close()
        proc.join(10)


def bench_zmq(seconds: float, depth: int) -> dict[str, float] | None:
    try:
        import zmq
    except ImportError:
        return None
    endpoint = f"ipc:///tmp/yolostream-ipc-bench-{os.getpid()}-{secrets.token_hex(4)}"
    proc = mp.get_context("spawn").Process(target=_zmq_device, args=(endpoint,), daemon=True)
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(endpoint)
    try:
        return _measure(lambda m: sock.send(pickle.dumps(m)), lambda: pickle.loads(sock.recv()),
                        psutil.Process(proc.pid), seconds, depth)
    finally:
        sock.send(b"stop")
        proc.join(10)
        sock.close()
        ctx.term()
        try:
            os.unlink(endpoint.removeprefix("ipc://"))
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--depth", default="1,8", help="messages in flight, comma list")
    args = parser.parse_args(argv)
    print("| channel | in flight | messages/s | CPU µs per message (both processes) |")
    print("|---|---|---|---|")
    for depth in (int(d) for d in args.depth.split(",")):
        for name, run in (("multiprocessing.connection (AF_UNIX)", bench_stdlib), ("pyzmq PAIR (ipc://)", bench_zmq)):
            row = run(args.seconds, depth)
            if row is None:
                print(f"| {name} | {depth} | pyzmq not installed | |")
                continue
            print(f"| {name} | {depth} | {row['msgs_s']:,.0f} | {row['cpu_us_per_msg']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
