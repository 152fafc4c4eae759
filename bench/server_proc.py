"""A feature server in its own process, for the benchmarks: its CPU time can be read apart from the clients'.

Run as a script it is ``yolostream serve``'s supervisor (device process, with ``ModelBypass`` in place of the
model under ``--bypass``, and ``--frontends`` front-end processes) on 127.0.0.1, port 0. It prints one JSON line
``{"port": …, "pid": …, "pids": {…}, "device": …}`` on stdout and serves until SIGTERM; then it drains and exits.
``ServerProcess`` starts and stops one from the bench driver and reads the CPU time of the whole process tree,
split by role. The driver side imports neither torch nor the server package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import psutil

REPO = Path(__file__).resolve().parents[1]


def ensure_importable() -> None:
    """Make ``yolostream`` importable from the checkout when it is not installed (as on a lent GPU machine).

    Adds protos/, server/ and client/ to sys.path and to PYTHONPATH, so the server process and the spawned
    clients find it too.
    """
    import importlib.util

    if importlib.util.find_spec("yolostream") is not None:
        return
    parts = [str(REPO / d) for d in ("protos", "server", "client")]
    sys.path[:0] = parts
    os.environ["PYTHONPATH"] = os.pathsep.join(parts + [p for p in [os.environ.get("PYTHONPATH")] if p])


class ServerProcess:
    """Start ``server_proc.py`` with ``args``; ``address`` once it serves, ``cpu_seconds()`` for its CPU use."""

    def __init__(self, args: Sequence[str], ready_timeout: float = 300.0) -> None:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="yolostream-bench-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        try:
            line = _read_line(self.proc, ready_timeout)
            if not line:
                raise RuntimeError(f"benchmark server exited before serving (rc={self.proc.poll()}):\n{self.log_tail()}")
            self.info = json.loads(line)
        except BaseException:
            self.stop()
            raise
        self.port = int(self.info["port"])
        self.address = f"127.0.0.1:{self.port}"
        self._ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        """User plus system CPU time of every server process so far (supervisor, device, front-ends)."""
        return sum(self.cpu_by_role().values())

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds so far per role: ``supervisor``, ``device`` and ``frontends`` (summed)."""
        roles = {"supervisor": float(sum(self._ps.cpu_times()[:2])), "device": 0.0, "frontends": 0.0}
        for role, pids in (("device", [self.info["pids"]["device"]]), ("frontends", self.info["pids"]["frontends"])):
            for pid in pids:
                try:
                    roles[role] += float(sum(psutil.Process(pid).cpu_times()[:2]))
                except psutil.NoSuchProcess:
                    pass
        return roles

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (it drains and exits); kill if it does not within ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first stdout line, or '' if the process ends or ``timeout`` passes first."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError(f"benchmark server did not report its port within {timeout:.0f} s")
    return proc.stdout.readline()


def server_args(cfg: str, imgsz: int, *, device: str = "auto", half: bool = False, bypass: bool = False,
                threads: int | None = None, max_batch: int | None = None, max_delay_ms: float | None = None,
                weights: str | None = None, frontends: int | None = None, backend: str = "torch",
                workers: int | None = None, uds: str | None = None, client_shm: bool = False) -> list[str]:
    """Command-line arguments of ``server_proc.py`` for these settings (``uds``: also listen on this Unix socket;
    ``client_shm``: map the shared memory of clients on this host, ``--allow-client-shm``)."""
    args = ["--cfg", cfg, "--imgsz", str(imgsz), "--device", device, "--backend", backend]
    if workers:
        args += ["--workers", str(workers)]
    if uds:
        args += ["--uds", uds]
    if client_shm:
        args.append("--allow-client-shm")
    if frontends:
        args += ["--frontends", str(frontends)]
    if weights:
        args += ["--weights", weights]
    if half:
        args.append("--half")
    if bypass:
        args.append("--bypass")
    if threads:
        args += ["--threads", str(threads)]
    if max_batch:
        args += ["--max-batch", str(max_batch)]
    if max_delay_ms is not None:
        args += ["--max-delay-ms", str(max_delay_ms)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov5n")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--bypass", action="store_true", help="move real-sized replies without running the model")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the device, over all workers")
    parser.add_argument("--max-batch", type=int, default=None)
    parser.add_argument("--max-delay-ms", type=float, default=None)
    parser.add_argument("--frontends", type=int, default=None)
    parser.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "auto"))
    parser.add_argument("--workers", type=int, default=None, help="device workers (default: the server's)")
    parser.add_argument("--uds", default=None, help="also listen on this Unix socket")
    parser.add_argument("--allow-client-shm", action="store_true", help="map the shared memory of local clients")
    args = parser.parse_args(argv)
    ensure_importable()

    import logging

    from yolostream.server.common.lifecycle import available_cores
    from yolostream.server.common.settings import ServerSettings
    from yolostream.server.serve.supervisor import Supervisor

    logging.basicConfig(level=logging.WARNING)
    settings = ServerSettings(weights=args.weights, cfg=None if args.weights else args.cfg, imgsz=args.imgsz,
                              device=args.device, half=args.half, host="127.0.0.1", port=0,
                              max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, frontends=args.frontends,
                              backend=args.backend, grace=2.0, workers=args.workers, uds=args.uds,
                              allow_client_shm=args.allow_client_shm)

    def announce(line: str) -> None:
        b = supervisor.batching
        print(json.dumps({"port": supervisor.port, "pid": os.getpid(), "device": supervisor.card.device,
                          "backend": args.backend,
                          "model": supervisor.card.name, "bypass": args.bypass, "max_batch": b.max_batch,
                          "max_delay_ms": b.max_delay_ms, "workers": b.workers,
                          "threads_per_worker": max(1, (args.threads or os.cpu_count() or 1) // b.workers),
                          "frontends": len(supervisor.frontends),
                          "decode_threads": supervisor.settings.decode_threads, "cores": available_cores(),
                          "pids": {"device": supervisor.device.process.pid,
                                   "frontends": [c.process.pid for c in supervisor.frontends.values()]}}),
              flush=True)

    supervisor = Supervisor(settings, bypass=args.bypass, device_threads=args.threads, announce=announce)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
