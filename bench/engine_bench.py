"""The engine alone, in-process: the limit a server can approach, and the seed approach it replaces.

Two ways of computing the same features, timed interleaved (every mode once per round, the starting mode
rotating), after warm-up rounds, reporting the median per mode. Each timed call starts on a quiet process
(``settle``): onnxruntime's intra-op threads spin for tens of milliseconds after a run, and the torch mode timed
next shared the cores with them (batch-1 ``backbone``, right after the last onnxruntime mode, read 3× slower
than batch-1 ``P3,P4,P5``, which computes more). Rows slower per frame than a row of the same backend and batch
that computes a superset of their layers carry a ``flag`` (``report.flag_inconsistent``).

- **server**: what the micro-batcher does: ``engine.collect(engine.launch(uint8 frames, keys))``: stack (or copy
  into a pooled pinned host block), upload, normalise on the device, truncated forward, cast, copy back. Fused
  BN; on CUDA fp16 + channels_last + the staged path. ``full`` runs ``engine.model`` (every layer and Detect with
  its decode) on the same uint8 batch, outputs left on the device.
- **seed**: what a user would otherwise write: a second, separately built copy of the model, fused (as upstream
  ``attempt_load`` returns it), fp32, batch 1, the whole detector (Detect and its decode included) with forward
  hooks on the wanted layers, the frame converted as upstream detect.py does (``.float() / 255``), and the
  hooked outputs copied to the host.

Inputs are the benchmark's 640×480 frame letterboxed as the server does it (``auto``), so the rows compare
directly with the end-to-end table. On CUDA every timed call ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import psutil
import torch

from yolostream.server.device.engine import DeviceRunner
from yolostream.server.model.loader import load_model

from e2e_bench import LAYER_SETS, synthetic_frame
from report import flag_inconsistent, median


@dataclass(frozen=True)
class EngineCase:
    """One model's engine rows."""

    cfg: str
    imgsz: int
    device: str = "auto"
    half: bool = False
    batches: tuple[int, ...] = (1, 4, 16, 32)
    repeats: int = 7
    warmup: int = 2
    out_dtype: str = "float32"
    seed: bool = True
    full: bool = True
    #: Other engine backends (``onnxruntime``) timed in the same rounds, server way only, at these batch sizes.
    backends: tuple[str, ...] = ()
    backend_batches: tuple[int, ...] = (1, 4, 8)


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class SeedModel:
    """The seed approach: the full detector with forward hooks on the wanted layers, batch 1, fp32."""

    def __init__(self, cfg: str, device: torch.device, hooked: Sequence[int]) -> None:
        engine = DeviceRunner(load_model(cfg=cfg), device=str(device), half=False,
                        channels_last=False, fuse=True, staged=False)
        self.model, self.device = engine.model, engine.device
        self.captured: dict[int, torch.Tensor] = {}
        self.wanted: set[int] = set()
        for index in sorted(set(hooked)):
            self.model.model[index].register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def capture(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            if index in self.wanted:
                self.captured[index] = output
        return capture

    def __call__(self, chw: np.ndarray, indices: Sequence[int]) -> dict[int, np.ndarray]:
        self.wanted, self.captured = set(indices), {}
        with torch.inference_mode():
            x = torch.from_numpy(chw).to(self.device).float() / 255
            self.model(x[None])
            return {i: t.cpu().numpy() for i, t in self.captured.items()}


def _modes(engine: DeviceRunner, seed: SeedModel | None, frame: np.ndarray, case: EngineCase,
           layers_run: Callable[[Sequence[int]], list[int]],
           batches: Sequence[int] | None = None) -> list[tuple[dict, Callable]]:
    """(row fields, timed callable) for every row of this case (``batches``: the engine's, default the case's).

    ``layers_run(indices)``: the layers a truncated forward to ``indices`` runs; each row's ``layers_run`` is what
    its mode computes (every layer for ``full`` and the seed), so rows can be checked against each other.
    """
    sync = _sync(engine.device)
    every_layer = list(range(len(engine.layers)))
    precision = "fp16+channels_last" if engine.dtype == torch.float16 else "fp32"
    path = "staged" if engine.staged else "direct"
    server_way = f"server: fused {precision}, {path}" + ("" if engine.backend == "torch" else f", {engine.backend}")
    modes = []
    for batch in case.batches if batches is None else batches:
        images = [frame] * batch
        for layers, names in LAYER_SETS.items():
            keys = [(r.index, "none", case.out_dtype) for r in engine.resolve(names)]

            def run(images=images, keys=keys):
                engine.collect(engine.launch(images, keys))
                sync()

            modes.append(({"way": server_way, "backend": engine.backend, "layers": layers, "batch": batch,
                           "out_dtype": case.out_dtype, "layers_run": layers_run([k[0] for k in keys])}, run))
        if case.full and engine.backend == "torch":
            def run_full(images=images):
                # tuned like the server way's forwards (Detect's convolutions tune in the bench's warm-up rounds)
                with torch.inference_mode(), engine.tuning.apply(True):
                    engine.model(engine.frames_to_input(torch.from_numpy(np.stack(images)).to(engine.device)))
                sync()

            modes.append(({"way": server_way, "backend": "torch", "layers": "full (Detect)", "batch": batch,
                           "out_dtype": None, "layers_run": every_layer}, run_full))
    if seed is not None:
        chw = np.ascontiguousarray(frame.transpose(2, 0, 1)[::-1])  # the seed feeds upstream's layout
        for layers, names in LAYER_SETS.items():
            indices = [r.index for r in engine.resolve(names)]

            def run_seed(indices=indices):
                seed(chw, indices)
                sync()

            modes.append(({"way": "seed: full model fp32, hooks", "backend": "torch", "layers": layers, "batch": 1,
                           "out_dtype": "float32", "layers_run": every_layer}, run_seed))
    return modes


def settle(limit_s: float = 1.0, slice_s: float = 0.005, busy: float = 0.1) -> None:
    """Wait until this process's threads are idle (under ``busy`` of a core over a ``slice_s`` slice), at most
    ``limit_s``.

    A run leaves worker threads spinning for a while (onnxruntime's intra-op pool for tens of milliseconds, OpenMP's
    briefly), and a mode timed meanwhile shares the cores with them: on 2 cores torch's batch-1 ``backbone`` timed
    right after onnxruntime read 3× its time. Only this process's CPU time counts: other load does not hold it up.
    """
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        cpu, wall = time.process_time(), time.perf_counter()
        time.sleep(slice_s)
        if time.process_time() - cpu < busy * (time.perf_counter() - wall):
            return


def time_interleaved(calls: Sequence[Callable[[], None]], repeats: int, warmup: int) -> list[list[float]]:
    """Per call, ``repeats`` wall times in ms; each round runs every call once, starting one further along.

    At least one untimed round comes first, whatever ``warmup`` says: a mode's first call pays one-off costs (an
    onnxruntime session's build, oneDNN primitives, allocator blocks). Every timed call starts ``settle``d.
    """
    times: list[list[float]] = [[] for _ in calls]
    n, warmup = len(calls), max(1, warmup)
    for r in range(warmup + repeats):
        for k in range(n):
            j = (k + r) % n
            if r >= warmup:
                settle()
            start = time.perf_counter()
            calls[j]()
            elapsed = (time.perf_counter() - start) * 1000.0
            if r >= warmup:
                times[j].append(elapsed)
    return times


def run_engine_case(case: EngineCase, progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """All rows of one model: server way at every batch size and layer set, plus the seed approach."""
    loaded = load_model(cfg=case.cfg)
    engine = DeviceRunner(loaded, device=case.device, half=case.half, imgsz=case.imgsz)
    frame, _ = engine.preprocess(synthetic_frame())
    if engine.staged:  # tune the bench's frame shape (and the square input) at every bucket, nothing else
        engine.warmup(max(case.batches), imgsz=case.imgsz, frame_sizes=(synthetic_frame().shape[:2],))
    hooked = [r.index for names in LAYER_SETS.values() for r in engine.resolve(names)]
    seed = SeedModel(case.cfg, engine.device, hooked) if case.seed else None

    def layers_run(indices: Sequence[int]) -> list[int]:  # every backend runs torch's truncated graph
        return list(engine.plan(indices).plan.steps)

    modes = _modes(engine, seed, frame, case, layers_run)
    for backend in case.backends:  # timed in the same interleaved rounds as torch, so load hits both alike
        other = DeviceRunner(load_model(cfg=case.cfg), device=case.device, half=case.half, imgsz=case.imgsz,
                             backend=backend)
        modes += _modes(other, None, frame, case, layers_run, [b for b in case.batches if b in case.backend_batches])
    progress(f"engine {engine.name}@{case.imgsz} on {engine.device}: {len(modes)} modes × "
             f"{case.warmup}+{case.repeats} rounds")
    own, machine = psutil.Process(), psutil.cpu_times()
    own_cpu, wall = sum(own.cpu_times()[:2]), time.perf_counter()
    times = time_interleaved([call for _, call in modes], case.repeats, case.warmup)
    wall = time.perf_counter() - wall
    own_cpu = sum(own.cpu_times()[:2]) - own_cpu
    busy = _busy(psutil.cpu_times()) - _busy(machine)
    load = {"bench_cpu_cores": own_cpu / wall, "other_cpu_cores": max(0.0, busy - own_cpu) / wall,
            "torch_threads": torch.get_num_threads()}
    rows = []
    for (fields, _), runs in zip(modes, times):
        ms = median(runs)
        rows.append({"model": engine.name, "imgsz": case.imgsz, "input": f"{frame.shape[0]}x{frame.shape[1]}",
                     "device": str(engine.device), **fields, "ms_batch": ms, "ms_frame": ms / fields["batch"],
                     "fps": 1000.0 * fields["batch"] / ms, "min_ms": min(runs), "runs_ms": runs,
                     "random_weights": engine.random_weights, **load})
    flag_inconsistent(rows)
    del seed, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def _busy(times) -> float:
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def run_engine(cases: Sequence[EngineCase], progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every case's rows, one model at a time (each freed before the next is built)."""
    rows = []
    for case in cases:
        rows += run_engine_case(case, progress)
    return rows
