"""``make bench``: the benchmark suite. Prints a markdown table per section and writes the numbers as JSON.

    python bench/run.py [--quick | --gpu] [--out bench/results] [--only engine,e2e,camera,transport,objects,samehost,link]
                        [--frontends N]

``--quick`` is the CPU preset (yolov5n at 320, a documented subset of the end-to-end matrix; the thin-link section
runs yolov5s at 640 as its issue asks: about 17 minutes on 2 cores, 7 of them the link section); ``--gpu`` is
yolov5s at 640 fp16 with yolov5l engine rows and a matrix sized to finish in under 5 minutes before the link section
(an estimate until it has run on a GPU: BENCHMARKS.md shows the arithmetic). Without either, the
preset is ``--gpu`` when torch sees CUDA, else ``--quick``. Random weights throughout: timing does not depend
on them. See BENCHMARKS.md for the method and the targets.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from link_bench import LINKS, MODES  # noqa: E402  (light: no torch)
from server_proc import ensure_importable  # noqa: E402  (light: no torch)
from transport_bench import TransportCase  # noqa: E402

ensure_importable()

SECTION_NAMES = ("engine", "e2e", "camera", "transport", "objects", "samehost", "link")


@dataclass(frozen=True)
class Preset:
    """Everything one preset measures; every field lands in the JSON file."""

    name: str
    cfg: str
    imgsz: int
    device: str
    half: bool
    threads: int | None
    engine_models: tuple[str, ...]
    batches: tuple[int, ...]
    repeats: int
    warmup: int
    engine_out_dtype: str
    e2e_streams: tuple[int, ...]
    e2e_inputs: tuple[str, ...]
    e2e_outputs: tuple[tuple[str, str], ...]
    e2e_warm_s: float
    e2e_duration_s: float
    max_in_flight: int
    camera_streams: tuple[int, ...]
    camera_rate: float
    camera_warm_s: float
    camera_duration_s: float
    transport_cases: tuple[TransportCase, ...]
    transport_in_flight: tuple[int, ...]
    transport_frontends: tuple[int, ...]
    transport_warm_s: float
    transport_duration_s: float
    notes: tuple[str, ...] = field(default=())
    objects_imgsz: int = 640
    objects_repeats: int = 5
    #: Engine backends besides torch, timed in the same engine rounds (at ``backend_batches``) and end to end (at
    #: ``backend_e2e_streams`` × ``backend_e2e_inputs`` × ``e2e_outputs``, against their own server).
    backends: tuple[str, ...] = ()
    backend_batches: tuple[int, ...] = (1, 4, 8)
    backend_e2e_streams: tuple[int, ...] = ()
    backend_e2e_inputs: tuple[str, ...] = ("jpeg",)
    #: Answers every client must have inside each e2e, camera and transport window: a window lasts its duration
    #: and, on a machine too slow or loaded for that, until each client has had this many (never an empty row).
    min_frames: int = 1
    #: Same host (``samehost_bench.py``): reply sizes (model bypassed) × inputs × shared memory, gRPC over a Unix
    #: socket and over TCP; then latency at ``camera_rate`` with raw ``samehost_camera_hw`` frames and the real
    #: model, returning ``samehost_camera_layers`` in ``engine_out_dtype``.
    samehost_cases: tuple[TransportCase, ...] = ()
    samehost_inputs: tuple[str, ...] = ("strip", "1080p")
    samehost_in_flight: int = 8
    samehost_warm_s: float = 0.5
    samehost_duration_s: float = 3.0
    samehost_rounds: int = 1
    samehost_camera_layers: str = "P3,P4,P5"
    samehost_camera_hw: tuple[int, int] = (1080, 1920)
    samehost_camera_rate: float = 30.0
    #: Thin links (``link_bench.py``): one ``link_rate`` JPEG camera to ``link_cfg`` at ``link_imgsz`` behind each of
    #: ``links`` (and unshaped), for each of ``link_layers`` × ``link_modes`` ((dtype, compression) pairs); the codes'
    #: quality on ``link_quality_frames`` frames in-process.
    link_cfg: str = "yolov5s"
    link_imgsz: int = 640
    links: tuple = ()
    link_layers: tuple[str, ...] = ("backbone", "P3,P4,P5")
    link_modes: tuple[tuple[str, str | None], ...] = ()
    link_rate: float = 30.0
    link_warm_s: float = 3.0
    link_duration_s: float = 6.0
    link_min_frames: int = 3
    link_cost_rounds: int = 3
    link_quality_frames: int = 4


#: Reply sizes for the transport section: 256x20x20 float32 = 409,600 B, and 4 * (128*80*80 + 256*40*40 + 512*20*20)
#: = 5,734,400 B, each plus a few dozen bytes of message framing.
TRANSPORT_CASES = (
    TransportCase("yolov5n backbone float32 @640 (~410 KB)", "yolov5n", ("backbone",)),
    TransportCase("yolov5s P3,P4,P5 float32 @640 (~5.7 MB)", "yolov5s", ("P3", "P4", "P5")),
)

QUICK = Preset(
    name="quick", cfg="yolov5n", imgsz=320, device="cpu", half=False, threads=2,
    engine_models=("yolov5n",), batches=(1, 4, 8, 16, 32), repeats=11, warmup=2, engine_out_dtype="float32",
    e2e_streams=(1, 4), e2e_inputs=("jpeg", "raw"), e2e_outputs=(("backbone", "float32"), ("P3,P4,P5", "float16")),
    e2e_warm_s=0.6, e2e_duration_s=4.0, max_in_flight=8,
    camera_streams=(1, 8), camera_rate=30.0, camera_warm_s=1.0, camera_duration_s=4.0,
    transport_cases=TRANSPORT_CASES, transport_in_flight=(8,), transport_frontends=(1, 2), transport_warm_s=0.5,
    transport_duration_s=3.0,
    notes=("e2e subset: 1 and 4 streams × JPEG and raw × (backbone float32, P3,P4,P5 float16)",
           "camera rows: JPEG, backbone, float32",
           "batch 8 added to the engine rows: it is the CPU server's max_batch",
           "onnxruntime: engine rows at batch 1, 4, 8 in the same rounds as torch; e2e with 1 and 4 JPEG streams"),
    backends=("onnxruntime",), backend_batches=(1, 4, 8), backend_e2e_streams=(1, 4), backend_e2e_inputs=("jpeg",),
    # 15 frames/s: one device thread takes ~32 ms per 1080p frame (P3,P4,P5 at 320) on this VM's cores, so 30 could
    # not be kept up beside the client and the front-end on 2 shared cores: latency would be queueing, not transport
    samehost_cases=TRANSPORT_CASES, samehost_warm_s=0.5, samehost_duration_s=2.0, samehost_rounds=3,
    samehost_camera_rate=15.0,
    links=LINKS, link_modes=MODES,
)

GPU = Preset(
    name="gpu", cfg="yolov5s", imgsz=640, device="cuda", half=True, threads=None,
    engine_models=("yolov5s", "yolov5l"), batches=(1, 4, 8, 16, 32), repeats=15, warmup=3, engine_out_dtype="float16",
    e2e_streams=(1, 4, 8, 16), e2e_inputs=("jpeg", "raw"),
    e2e_outputs=(("backbone", "float16"), ("P3,P4,P5", "float32")),
    e2e_warm_s=0.75, e2e_duration_s=2.5, max_in_flight=8,
    camera_streams=(1, 8), camera_rate=30.0, camera_warm_s=1.0, camera_duration_s=4.0,
    transport_cases=TRANSPORT_CASES, transport_in_flight=(8,), transport_frontends=(1, 2),
    transport_warm_s=0.5, transport_duration_s=2.5,
    notes=("e2e: 1, 4, 8 and 16 streams x JPEG and raw x (backbone float16, P3,P4,P5 float32): the smallest and "
           "the largest reply", "camera rows: JPEG, backbone, float16",
           "engine rows output float16 (the staged path casts on the device)",
           "no priming pass: the server's warm-up tunes cuDNN for the bench's 480x640 frames at every batch bucket, "
           "and other shapes never tune mid-run"),
    samehost_cases=TRANSPORT_CASES, samehost_rounds=3,
    links=LINKS, link_modes=MODES,
)

PRESETS = {"quick": QUICK, "gpu": GPU}


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="yolostream benchmark suite")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", dest="preset", action="store_const", const="quick", help="CPU preset")
    which.add_argument("--gpu", dest="preset", action="store_const", const="gpu", help="GPU preset")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON results (default bench/results)")
    parser.add_argument("--only", default=",".join(SECTION_NAMES),
                        help=f"comma-separated sections to run, of {','.join(SECTION_NAMES)}")
    parser.add_argument("--frontends", type=int, default=None,
                        help="front-end processes of the e2e and camera server (default: the server's own)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTION_NAMES]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTION_NAMES)}")
    args.sections = sections
    return args


def default_preset() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "quick"


def run_suite(preset: Preset, sections: Sequence[str], out_dir: Path | None,
              frontends: int | None = None) -> dict[str, Any]:
    """Run the chosen sections of ``preset`` (the e2e server with ``frontends`` front-end processes); print
    their tables; write and return the results."""
    import dataclasses

    import torch

    import report

    if preset.threads:
        torch.set_num_threads(preset.threads)
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the gpu preset needs CUDA, and torch sees none: use --quick")
    results: dict[str, Any] = {"machine": report.machine_info(preset.name), "preset": dataclasses.asdict(preset),
                               "sections": {}}
    started = time.perf_counter()
    engine_rows: list[dict] = []
    if "engine" in sections:
        from engine_bench import EngineCase, run_engine

        cases = [EngineCase(cfg, preset.imgsz, preset.device, preset.half, preset.batches, preset.repeats,
                            preset.warmup, preset.engine_out_dtype, backends=preset.backends if k == 0 else (),
                            backend_batches=preset.backend_batches) for k, cfg in enumerate(preset.engine_models)]
        engine_rows = run_engine(cases, _log)
        _emit(results, "engine", engine_rows)
    served_rows = [r for r in engine_rows if r["model"] == preset.cfg and r["backend"] == "torch"]
    if "e2e" in sections or "camera" in sections:
        from e2e_bench import E2ECell, add_decode_bound, jpeg_decode_ms, payloads_for, run_e2e
        from server_proc import ServerProcess, server_args
        from yolostream.server.common.sizing import decode_capacity

        payloads = payloads_for()
        results["frames"] = {k: {"bytes": len(p.data), "height": p.height, "width": p.width}
                             for k, p in payloads.items()}
        args = server_args(preset.cfg, preset.imgsz, device=preset.device, half=preset.half, threads=preset.threads,
                           frontends=frontends)
        _log(f"starting the server: {' '.join(args)}")
        with ServerProcess(args) as server:
            results["server"] = server.info
            info = server.info
            decode_ms = jpeg_decode_ms(payloads["jpeg"])
            decode_fps = decode_capacity(info["frontends"], info["decode_threads"], info["cores"], decode_ms)
            results["decode"] = {"ms_per_frame": decode_ms, "capacity_fps": decode_fps,
                                 "frontends": info["frontends"], "decode_threads": info["decode_threads"],
                                 "cores": info["cores"]}
            _log(f"JPEG decode {decode_ms:.2f} ms/frame; {info['frontends']} front-end(s) x "
                 f"{info['decode_threads']} thread(s) on {info['cores']} cores: ~{decode_fps:.0f} frames/s")
            if "e2e" in sections:
                cells = [E2ECell(n, kind, layers, dtype) for n in preset.e2e_streams for kind in preset.e2e_inputs
                         for layers, dtype in preset.e2e_outputs]
                rows = run_e2e(server.address, cells, payloads, warm_s=preset.e2e_warm_s,
                               duration_s=preset.e2e_duration_s, max_in_flight=preset.max_in_flight,
                               cpu_seconds=server.cpu_seconds, engine_rows=served_rows, min_frames=preset.min_frames,
                               progress=_log)
                _emit(results, "e2e", [{**add_decode_bound(row, decode_fps), "backend": "torch"} for row in rows])
            if "camera" in sections:
                dtype = "float16" if preset.half else "float32"
                cells = [E2ECell(n, "jpeg", "backbone", dtype, preset.camera_rate) for n in preset.camera_streams]
                rows = run_e2e(server.address, cells, payloads, warm_s=preset.camera_warm_s,
                               duration_s=preset.camera_duration_s, max_in_flight=preset.max_in_flight,
                               cpu_seconds=server.cpu_seconds, engine_rows=served_rows, camera=True,
                               min_frames=preset.min_frames, progress=_log)
                _emit(results, "camera", rows)
    if "e2e" in sections and preset.backend_e2e_streams:
        for backend in preset.backends:
            own_rows = [r for r in engine_rows if r["model"] == preset.cfg and r["backend"] == backend]
            args = server_args(preset.cfg, preset.imgsz, device=preset.device, half=preset.half,
                               threads=preset.threads, frontends=frontends, backend=backend)
            _log(f"starting the {backend} server: {' '.join(args)}")
            with ServerProcess(args) as server:
                cells = [E2ECell(n, kind, layers, dtype) for n in preset.backend_e2e_streams
                         for kind in preset.backend_e2e_inputs for layers, dtype in preset.e2e_outputs]
                rows = run_e2e(server.address, cells, payloads, warm_s=preset.e2e_warm_s,
                               duration_s=preset.e2e_duration_s, max_in_flight=preset.max_in_flight,
                               cpu_seconds=server.cpu_seconds, engine_rows=own_rows, min_frames=preset.min_frames,
                               progress=_log)
            decode_fps = results.get("decode", {}).get("capacity_fps")
            results["sections"]["e2e"] += [{**(add_decode_bound(row, decode_fps) if decode_fps else row),
                                            "backend": backend} for row in rows]
            print(report.section_markdown("e2e", [r for r in results["sections"]["e2e"] if r["backend"] == backend]),
                  flush=True)
    if preset.backends and ("engine" in sections or "e2e" in sections):
        _emit(results, "backends", report.backend_ratios(results["sections"]))
    if "transport" in sections:
        from transport_bench import run_transport

        rows = run_transport(preset.transport_cases, in_flight=preset.transport_in_flight,
                             frontends=preset.transport_frontends,
                             warm_s=preset.transport_warm_s,
                             duration_s=preset.transport_duration_s, min_frames=preset.min_frames, progress=_log)
        _emit(results, "transport", rows)
    if "objects" in sections:
        from objects_bench import ObjectsCase, nms_rows, overhead_rows

        # NMS at 25,200 candidates needs a P5 model at 640, whatever the preset's input size.
        case = ObjectsCase(preset.cfg, preset.objects_imgsz, 1, preset.threads or 0, repeats=preset.objects_repeats,
                           device=preset.device)
        _log("objects: NMS alone, then layers against layers + detections (+ vectors)")
        _emit(results, "objects_nms", nms_rows(case))
        _emit(results, "objects_overhead", overhead_rows(case))
    if "samehost" in sections:
        from samehost_bench import run_samehost, run_samehost_camera, targets

        _log("same host: shared memory, gRPC over a Unix socket and over TCP")
        rows = run_samehost(preset.samehost_cases, inputs=preset.samehost_inputs, in_flight=preset.samehost_in_flight,
                            warm_s=preset.samehost_warm_s, duration_s=preset.samehost_duration_s,
                            rounds=preset.samehost_rounds, min_frames=preset.min_frames, progress=_log)
        _emit(results, "samehost", rows)
        # One device thread on a CPU: the client and the front-end need the other core (and torch's threads spin
        # badly on an oversubscribed machine); the engine's batch-1 time is measured with the same one thread.
        camera = run_samehost_camera(preset.cfg, preset.imgsz, device=preset.device, half=preset.half,
                                     threads=1 if preset.device == "cpu" else preset.threads,
                                     layers=preset.samehost_camera_layers,
                                     dtype=preset.engine_out_dtype, rate=preset.samehost_camera_rate,
                                     hw=preset.samehost_camera_hw, warm_s=preset.camera_warm_s,
                                     duration_s=preset.camera_duration_s, repeats=preset.repeats,
                                     warmup=preset.warmup, min_frames=preset.min_frames, progress=_log)
        _emit(results, "samehost_camera", camera)
        _emit(results, "samehost_targets", targets(rows, camera, preset.samehost_cases,
                                                   results["sections"].get("transport", ())))
    if "link" in sections:
        from link_bench import link_quality, run_link, targets as link_targets

        _log(f"thin links: one {preset.link_rate:.0f} fps camera, {preset.link_cfg} at {preset.link_imgsz}")
        rows, costs = run_link(preset.link_cfg, preset.link_imgsz, links=preset.links, layer_sets=preset.link_layers,
                               modes=preset.link_modes, rate=preset.link_rate, warm_s=preset.link_warm_s,
                               duration_s=preset.link_duration_s, min_frames=preset.link_min_frames,
                               cost_rounds=preset.link_cost_rounds, device=preset.device, half=preset.half,
                               progress=_log)
        _emit(results, "link", rows)
        _emit(results, "link_cost", costs)
        _emit(results, "link_targets", link_targets(rows, costs, preset.link_rate))
        _log("thin links: the codes against float32, in-process")
        _emit(results, "link_quality", link_quality(preset.link_cfg, preset.link_imgsz, preset.link_quality_frames))
    results["machine"]["elapsed_s"] = time.perf_counter() - started
    results["machine"]["loadavg_end"] = list(__import__("os").getloadavg())
    print(report.machine_line(results["machine"]))
    if out_dir is not None:
        path = report.write_json(results, out_dir)
        print(f"\nresults: {path}")
        results["path"] = str(path)
    _log(f"done in {results['machine']['elapsed_s']:.0f} s")
    return results


def _emit(results: dict[str, Any], name: str, rows: list[dict]) -> None:
    import report

    results["sections"][name] = rows
    print(report.section_markdown(name, rows), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset or default_preset()]
    run_suite(preset, args.sections, args.out, frontends=args.frontends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
