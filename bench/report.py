"""Numbers in, tables and a JSON file out: the statistics, the machine description and the markdown tables.

Kept free of torch and gRPC so the client processes and the tests can use it cheaply.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def percentiles(values: Sequence[float], points: Iterable[float] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": …, "p95": …, "p99": …}``; None for an empty sample (a cell that answered nothing)."""
    data = np.asarray(values, dtype=np.float64)
    return {f"p{p:g}": (float(np.percentile(data, p)) if data.size else None) for p in points}


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def rotated(items: Sequence[Any], by: int) -> list[Any]:
    """``items`` starting at index ``by`` (modulo their count): the order of round ``by`` when cells are
    interleaved and the first one rotates each round, so a loaded machine's load hits every cell alike."""
    k = by % len(items) if items else 0
    return [*items[k:], *items[:k]]


def median_row(rounds: Sequence[dict]) -> dict:
    """One row from several rounds of the same cell: the median of every number, the first value of the rest, and
    ``rounds``, how many there were."""
    row = dict(rounds[0])
    for key, value in rounds[0].items():
        values = [r[key] for r in rounds]
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and all(isinstance(v, (int, float)) for v in values):
            row[key] = median(values)
    row["rounds"] = len(rounds)
    return row


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(preset: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Where the numbers come from: host, CPU, cores, library versions, accelerator, load at the start."""
    import grpc
    import torch

    cuda = torch.cuda.is_available()
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "device_name": torch.cuda.get_device_name(0) if cuda else f"cpu ({cpu_model()})",
        "preset": preset,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update(extra or {})
    return info


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers rounded, None as an em dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "—"
        if abs(value) >= 100 or digits == 0:
            return f"{value:.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: Sequence[tuple[str, str, int]], rows: Sequence[dict[str, Any]]) -> str:
    """``columns`` are (header, key, digits); one markdown row per dict."""
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(row.get(key), digits) for _, key, digits in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


ENGINE_COLUMNS = [
    ("model", "model", 0), ("imgsz", "imgsz", 0), ("input", "input", 0), ("way", "way", 0), ("backend", "backend", 0),
    ("layers", "layers", 0), ("batch", "batch", 0), ("ms/batch", "ms_batch", 2), ("ms/frame", "ms_frame", 2),
    ("frames/s", "fps", 1), ("other load (cores)", "other_cpu_cores", 2), ("check", "flag", 0),
]

E2E_COLUMNS = [
    ("backend", "backend", 0), ("streams", "streams", 0), ("input", "input", 0), ("layers", "layers", 0), ("dtype", "dtype", 0),
    ("frames/s", "fps", 1), ("p50 ms", "p50_ms", 1), ("p95 ms", "p95_ms", 1), ("p99 ms", "p99_ms", 1),
    ("mean batch", "mean_batch", 2), ("server CPU-ms/frame", "server_cpu_ms_per_frame", 1),
    ("engine frames/s (at batch)", "engine_ref", 0), ("e2e / engine", "ratio_vs_engine", 2),
    ("decode cap frames/s", "decode_cap_fps", 0), ("lower of decode cap / engine", "bound", 0),
    ("other load (cores)", "other_cpu_cores", 2),
]

CAMERA_COLUMNS = [
    ("streams", "streams", 0), ("input", "input", 0), ("layers", "layers", 0), ("dtype", "dtype", 0),
    ("target fps/stream", "rate", 0), ("achieved frames/s", "fps", 1), ("p50 ms", "p50_ms", 1),
    ("p99 ms", "p99_ms", 1), ("mean batch", "mean_batch", 2), ("engine batch-1 ms", "engine_b1_ms", 1),
    ("p50 / engine b1", "p50_vs_engine", 2), ("p99 / engine b1", "p99_vs_engine", 2),
    ("other load (cores)", "other_cpu_cores", 2),
]

TRANSPORT_COLUMNS = [
    ("reply", "what", 0), ("reply bytes", "reply_bytes", 0), ("front-ends", "frontends", 0),
    ("in flight", "in_flight", 0),
    ("service msgs/s", "grpc_msgs_s", 0), ("service MB/s", "grpc_mb_s", 0), ("plain gRPC MB/s", "echo_mb_s", 0),
    ("socket MB/s", "socket_mb_s", 0), ("service / socket", "ratio", 2), ("plain gRPC / socket", "echo_ratio", 2),
    ("service server CPU-ms/msg", "server_cpu_ms_per_msg", 3), ("of it front-ends", "frontend_cpu_ms_per_msg", 3),
    ("of it device", "device_cpu_ms_per_msg", 3), ("plain gRPC server CPU-ms/msg", "echo_server_cpu_ms_per_msg", 3),
    ("service / plain gRPC CPU", "cpu_vs_plain_grpc", 2), ("front-end / plain gRPC CPU", "frontend_vs_plain_grpc", 2),
    ("other load (cores)", "other_cpu_cores", 2),
]

OBJECTS_NMS_COLUMNS = [
    ("setting", "setting", 0), ("anchor rows", "rows", 0), ("objectness candidates", "objectness_candidates", 0),
    ("kept", "kept", 0), ("torchvision", "torchvision", 0), ("ms", "ms", 2), ("CPU ms", "cpu_ms", 2),
]

OBJECTS_OVERHEAD_COLUMNS = [
    ("mode", "mode", 0), ("batch", "batch", 0), ("imgsz", "imgsz", 0), ("boxes", "boxes", 0), ("ms", "ms", 2),
    ("extra ms", "extra_ms", 2), ("extra %", "extra_pct", 1), ("CPU ms", "cpu_ms", 2),
    ("extra CPU %", "extra_cpu_pct", 1),
]

BACKEND_COLUMNS = [
    ("what", "what", 0), ("layers", "layers", 0), ("dtype", "dtype", 0), ("batch / streams", "size", 0),
    ("backend", "backend", 0), ("torch frames/s", "torch_fps", 1), ("backend frames/s", "backend_fps", 1),
    ("backend / torch", "ratio", 2),
]

SAMEHOST_COLUMNS = [
    ("reply", "what", 0), ("input", "input", 0), ("way", "way", 0), ("reply bytes", "reply_bytes", 0),
    ("in flight", "in_flight", 0), ("msgs/s", "msgs_s", 0), ("MB/s", "mb_s", 0), ("p50 ms", "p50_ms", 1),
    ("server CPU-ms/msg", "server_cpu_ms_per_msg", 3), ("client CPU-ms/msg", "client_cpu_ms_per_msg", 3),
    ("server+client CPU-ms/msg", "cpu_ms_per_msg", 3), ("of it front-end", "frontend_cpu_ms_per_msg", 3),
    ("of it device", "device_cpu_ms_per_msg", 3), ("errors", "errors", 0), ("other load (cores)", "other_cpu_cores", 2),
]

SAMEHOST_CAMERA_COLUMNS = [
    ("way", "way", 0), ("input", "input", 0), ("model input", "model_input", 0), ("layers", "layers", 0),
    ("dtype", "dtype", 0), ("target fps", "rate", 0), ("achieved frames/s", "msgs_s", 1), ("p50 ms", "p50_ms", 1),
    ("p99 ms", "p99_ms", 1), ("engine batch-1 ms", "engine_b1_ms", 1), ("p50 / engine b1", "p50_vs_engine", 2),
    ("p99 / engine b1", "p99_vs_engine", 2), ("server CPU-ms/frame", "server_cpu_ms_per_msg", 2),
    ("client CPU-ms/frame", "client_cpu_ms_per_msg", 2), ("other load (cores)", "other_cpu_cores", 2),
]

SAMEHOST_TARGET_COLUMNS = [
    ("goal", "goal", 0), ("measured", "measured", 0), ("ratio", "ratio", 2), ("limit", "limit", 0), ("met", "met", 0),
]

LINK_COLUMNS = [
    ("link", "link", 0), ("RTT ms", "rtt_ms", 1), ("layers", "layers", 0), ("sent as", "mode", 0),
    ("frames/s", "fps", 1), ("p50 ms", "p50_ms", 0), ("p99 ms", "p99_ms", 0),
    ("kB/frame down", "down_kb_per_frame", 1), ("Mbit/s down", "down_mbit_s", 1), ("Mbit/s up", "up_mbit_s", 1),
    ("bits/value", "bits_per_value", 2), ("link bound frames/s", "link_bound_fps", 1),
    ("CPU bound frames/s", "cpu_bound_fps", 1), ("bound", "bound", 0), ("server CPU-ms/frame", "server_cpu_ms_per_frame", 0),
    ("client CPU-ms/frame", "client_cpu_ms_per_frame", 1), ("dropped", "dropped", 0),
    ("other load (cores)", "other_cpu_cores", 2),
]

LINK_COST_COLUMNS = [
    ("layers", "layers", 0), ("sent as", "mode", 0), ("frames/s offered", "rate", 1), ("rounds", "rounds", 0),
    ("server CPU-ms/frame", "server_cpu_ms_per_frame", 1), ("of it device", "device_cpu_ms_per_frame", 1),
    ("of it front-end", "frontend_cpu_ms_per_frame", 1), ("client CPU-ms/frame", "client_cpu_ms_per_frame", 1),
    ("server CPU ÷ float16's", "vs_float16", 3),
]

LINK_TARGET_COLUMNS = [
    ("goal", "goal", 0), ("measured", "measured", 0), ("float16, same link", "float16", 0), ("ratio", "ratio", 2),
    ("limit", "limit", 0), ("met", "met", 0),
]

LINK_QUALITY_COLUMNS = [("measure", "measure", 0), ("value", "value", 0), ("target", "target", 0), ("met", "met", 0)]

SECTIONS = {
    "engine": ("DeviceRunner alone, in-process", ENGINE_COLUMNS),
    "objects_nms": ("NMS alone, one 640x640 image's decoded output", OBJECTS_NMS_COLUMNS),
    "objects_overhead": ("Detections and object vectors over the same layers alone", OBJECTS_OVERHEAD_COLUMNS),
    "e2e": ("End to end through gRPC on loopback", E2E_COLUMNS),
    "camera": ("Latency at camera rate", CAMERA_COLUMNS),
    "transport": ("Transport alone (model bypassed) against a raw TCP socket", TRANSPORT_COLUMNS),
    "backends": ("Engine backends: frames/s of each against torch's, same run", BACKEND_COLUMNS),
    "samehost": ("Same host: shared memory against gRPC over a Unix socket and TCP (model bypassed)",
                 SAMEHOST_COLUMNS),
    "samehost_camera": ("Same host: latency at camera rate, raw frames", SAMEHOST_CAMERA_COLUMNS),
    "samehost_targets": ("Same host: against the goals of issue 20", SAMEHOST_TARGET_COLUMNS),
    "link": ("Thin links: one camera over a shaped link", LINK_COLUMNS),
    "link_cost": ("Thin links: server CPU per frame with every frame computed (no link)", LINK_COST_COLUMNS),
    "link_targets": ("Thin links: against the targets of issue 19", LINK_TARGET_COLUMNS),
    "link_quality": ("Thin links: the 8-bit codes against float32", LINK_QUALITY_COLUMNS),
}


def backend_ratios(sections: dict[str, list[dict]]) -> list[dict]:
    """Per engine row and end-to-end cell that another backend shares with torch: both frames/s and their ratio."""
    rows = []
    engine = [r for r in sections.get("engine", ()) if r["way"].startswith("server")]
    e2e = sections.get("e2e", ())
    for what, source, key in (("engine", engine, lambda r: (r["model"], r["layers"], r.get("out_dtype"), r["batch"])),
                              ("e2e", e2e, lambda r: (r["input"], r["layers"], r["dtype"], r["streams"]))):
        torch_rows = {key(r): r for r in source if r["backend"] == "torch"}
        for r in source:
            base = torch_rows.get(key(r))
            if r["backend"] == "torch" or base is None:
                continue
            label = f"engine {r['model']}" if what == "engine" else f"e2e {r['input']}"
            rows.append({"what": label, "layers": r["layers"], "dtype": r.get("out_dtype", r.get("dtype")),
                         "size": r["batch"] if what == "engine" else r["streams"], "backend": r["backend"],
                         "torch_fps": base["fps"], "backend_fps": r["fps"], "ratio": r["fps"] / base["fps"]})
    return rows


#: An engine row is flagged when its ms per frame exceeds this many times that of a row computing a superset of its
#: layers (same model, input, device, backend and batch): computing more cannot honestly be that much faster.
INCONSISTENT_RATIO = 1.5


def flag_inconsistent(rows: Sequence[dict[str, Any]], ratio: float = INCONSISTENT_RATIO) -> None:
    """Set every engine row's ``flag``: None, or why the row cannot be right (it is more than ``ratio`` times
    slower per frame than the fastest comparable row whose ``layers_run`` include all of its own).

    A row that lies (one-off costs, another backend's threads still spinning) shows in the table and the JSON at
    once instead of in a footnote written after someone noticed.
    """
    def group(row: dict[str, Any]) -> tuple:
        return row["model"], row["imgsz"], row["input"], row["device"], row["backend"], row["batch"]

    for row in rows:
        own = set(row["layers_run"])
        supersets = [other for other in rows if other is not row and group(other) == group(row)
                     and own <= set(other["layers_run"])]
        fastest = min(supersets, key=lambda other: other["ms_frame"], default=None)
        row["flag"] = None
        if fastest is not None and row["ms_frame"] > ratio * fastest["ms_frame"]:
            row["flag"] = (f"⚠ {row['ms_frame'] / fastest['ms_frame']:.1f}x the ms/frame of "
                           f"{fastest['layers']} ({fastest['way'].split(':')[0]}), which computes all of its layers")


def section_markdown(name: str, rows: Sequence[dict[str, Any]]) -> str:
    title, columns = SECTIONS[name]
    return f"### {title}\n\n{markdown_table(columns, rows)}\n"


def machine_line(info: dict[str, Any]) -> str:
    return (f"Machine: {info['hostname']}, {info['cores']} cores ({info['cpu_model']}), device {info['device_name']}, "
            f"torch {info['torch']}, grpcio {info['grpcio']}, preset `{info['preset']}`, {info['started']}.")


def write_json(results: dict[str, Any], out_dir: Path) -> Path:
    """``<out_dir>/<hostname>-<YYYYMMDD-HHMMSS>.json``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    host = socket.gethostname().replace("/", "_") or "host"
    path = out_dir / f"{host}-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in the results file")
