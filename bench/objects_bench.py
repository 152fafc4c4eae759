"""Cost of detections and per-object vectors (issue 9), in-process, on the engine's device path.

Two tables:

- **nms**: ``non_max_suppression`` alone on one 640×640 image's decoded output (25,200 anchor rows for a P5
  model), at upstream's default conf_thres 0.25 and at 0.001 (nearly every row a candidate), plus multi-label.
- **overhead**: the extra cost of detections plus object vectors over extracting the same layers alone. Every
  mode runs the same truncated forward to the Detect inputs (P3, P4, P5); ``layers`` stops there, ``detect``
  adds Detect's convs, the decode, NMS and the mapping to the frame, ``detect+anchor`` and ``detect+roi`` add the
  vectors (anchor cells; RoIAlign 7×7 averaged) of every kept box.

Modes are timed interleaved (each once per round, after warm-up rounds) and reported as medians. Random weights
(seeded): with upstream's conf_thres they leave many candidates, which is the expensive case for NMS.

    PYTHONPATH=protos:server:client python bench/objects_bench.py [--imgsz 640] [--batch 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from yolostream.server.model import detections as det
from yolostream.server.model import objects as obj
from yolostream.server.model.loader import load_model
from yolostream.server.model.modules import fuse_model
from yolostream.server.model.plan import make_plan, run_plan

from report import median


@dataclass(frozen=True)
class ObjectsCase:
    """One configuration of the benchmark: model config, square input size, batch, CPU threads, rounds."""

    cfg: str = "yolov5n"
    imgsz: int = 640
    batch: int = 1
    threads: int = 2
    repeats: int = 5
    warmup: int = 1
    device: str = "cpu"


def _interleaved(modes: dict[str, Callable[[], object]], repeats: int,
                 warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, process CPU ms) per mode; every round runs each mode once, from a rotating start.

    CPU time is reported beside wall time because a shared machine stretches wall time; it sums all threads.
    """
    names = list(modes)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            wall, cpu = time.perf_counter(), time.process_time()
            modes[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))
    return {n: (median([w for w, _ in t]), median([c for _, c in t])) for n, t in times.items()}


def _setup(case: ObjectsCase) -> tuple[torch.nn.Module, torch.Tensor, tuple[int, ...]]:
    if case.threads:
        torch.set_num_threads(case.threads)
    model = fuse_model(load_model(cfg=case.cfg).model.eval()).to(case.device)
    x = torch.rand(case.batch, 3, case.imgsz, case.imgsz, generator=torch.Generator().manual_seed(0))
    return model, x.to(case.device), det.detect_input_layers(model)


@torch.inference_mode()
def nms_rows(case: ObjectsCase) -> list[dict]:
    """Time NMS alone on the decoded output of ``case``'s first image, for three settings."""
    model, x, levels = _setup(case)
    outputs = run_plan(model.model, x[:1], make_plan(model.model, levels))
    pred = det.decode(model.model[model.detect_index], [outputs[j] for j in levels])
    settings = {
        "default (conf 0.25)": det.NmsOptions(),
        "conf 0.001": det.NmsOptions(conf_thres=0.001),
        "multi_label, conf 0.25": det.NmsOptions(multi_label=True),
    }
    rows = []
    for label, options in settings.items():
        wall, cpu = _interleaved({label: lambda o=options: det.non_max_suppression(pred, o)}, case.repeats,
                                 case.warmup)[label]
        kept = det.non_max_suppression(pred, options)[0]
        candidates = int((pred[0, :, 4] > options.conf_thres).sum())
        rows.append({"setting": f"{label}, {case.device}", "rows": int(pred.shape[1]), "objectness_candidates": candidates,
                     "kept": len(kept), "torchvision": det.torchvision_ops() is not None, "ms": round(wall, 2),
                     "cpu_ms": round(cpu, 2)})
    return rows


@torch.inference_mode()
def overhead_rows(case: ObjectsCase) -> list[dict]:
    """Time the layers alone against layers + detections (+ anchor or roi vectors) on the same batch."""
    model, x, levels = _setup(case)
    plan = make_plan(model.model, levels)
    hw = (case.imgsz, case.imgsz)
    frames = [hw] * case.batch

    def layers() -> object:
        return run_plan(model.model, x, plan)

    def with_objects(objects: obj.ObjectOptions | None) -> Callable[[], object]:
        return lambda: obj.frame_objects(model, run_plan(model.model, x, plan), hw, frames, nms=det.NmsOptions(),
                                         objects=objects)

    def layers_on(mode: str) -> str:
        return f"{mode} ({case.device})"

    modes = {"layers": layers, "detect": with_objects(None),
             "detect+anchor": with_objects(obj.ObjectOptions()),
             "detect+roi": with_objects(obj.ObjectOptions(mode="roi"))}
    ms = _interleaved(modes, case.repeats, case.warmup)
    boxes = sum(len(f.boxes) for f in with_objects(None)())
    base_wall, base_cpu = ms["layers"]
    return [{"mode": layers_on(m), "batch": case.batch, "imgsz": case.imgsz, "boxes": boxes, "ms": round(wall, 2),
             "extra_ms": round(wall - base_wall, 2), "extra_pct": round(100 * (wall / base_wall - 1), 1),
             "cpu_ms": round(cpu, 2), "extra_cpu_pct": round(100 * (cpu / base_cpu - 1), 1)}
            for m, (wall, cpu) in ms.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", default="yolov5n")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    case = ObjectsCase(args.cfg, args.imgsz, args.batch, args.threads, args.repeats, device=args.device)
    print(json.dumps({"case": asdict(case), "nms": nms_rows(case), "overhead": overhead_rows(case)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
