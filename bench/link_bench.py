"""Thin links (issue 19): one 30 fps JPEG camera over a shaped link, per element type and compression.

The server (``server_proc.py``, the preset's link model at its size, the served default backend) sits behind a
``ShapedLink`` at each of the preset's rates (20 Mbit/s, 100 Mbit/s, 1 Gbit/s by default, each with its own
round trip), and also behind an unshaped one (``none``: the same proxy, no rate, which gives the CPU's own bound).
One client process streams a camera through it with the client library: a synthetic 640x480 scene, JPEG-encoded
by the client at quality 90, offered at ``rate`` frames/s in realtime mode (the server keeps only the newest waiting
frame, as a live camera wants; a tick the client could not send in time is skipped). It asks for ``backbone`` and
for ``P3,P4,P5`` in float32, float16, the 8-bit codes (``uint8``) and the codes compressed (``uint8`` + ``zstd``),
and decodes every reply to float32, as a user's code would.

Per row: achieved frames/s (answers with features inside the window), p50/p99 latency from send to answer,
bytes per frame on the link in each direction (counted by the proxy over the window, so HTTP/2 and gRPC framing
and the small DROPPED answers are included), bits per feature value (the downlink's bytes per frame × 8 over the
values per frame), server and client CPU per frame, the link's bound (line rate over the bits per frame in the
busier direction) and the CPU's (the unshaped row of the same request): ``bound`` says which one limits the row.

``run_cost`` then measures what the codes cost the server: the same camera straight to the server, paced at half
the slowest mode's CPU bound and not realtime, so every frame is computed and none is dropped, each mode in turn
over several interleaved rounds: server CPU per frame by role (device: quantising; front-end: compressing).

``link_quality`` measures the codes against float32 in-process on the same frames and model, where the Detect head
is (see ``codec_bench.quality``): the per-element bound, pooled and object vectors' cosine (anchor and roi), and
Detect + NMS on decoded P3-P5.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from e2e_bench import ClientWindow, run_clients, synthetic_frame
from report import median_row, percentiles, rotated
from server_proc import ServerProcess, server_args
from shaped_link import DOWN, UP, ShapedLink


@dataclass(frozen=True)
class Link:
    """A link to shape: its name in the tables, its rate in each direction (Mbit/s; None: unshaped) and round
    trip."""

    name: str
    mbit_s: float | None
    rtt_ms: float


#: Typical round trips: a mobile or busy Wi-Fi link, a Wi-Fi LAN, a wired gigabit LAN.
LINKS = (Link("20 Mbit/s", 20.0, 40.0), Link("100 Mbit/s", 100.0, 4.0), Link("1 Gbit/s", 1000.0, 0.5))
UNSHAPED = Link("none", None, 0.0)
#: (dtype, compression) per row.
MODES = (("float32", None), ("float16", None), ("uint8", None), ("uint8", "zstd"))
LAYER_SETS = {"backbone": ("backbone",), "P3,P4,P5": ("P3", "P4", "P5")}


@dataclass(frozen=True)
class LinkSpec:
    """One client process's camera stream."""

    target: str
    layers: tuple[str, ...]
    dtype: str
    compression: str | None
    imgsz: int
    rate: float
    max_in_flight: int = 2
    #: realtime mode (the server drops waiting frames); off for the cost rows, where every frame is computed
    realtime: bool = True
    height: int = 480
    width: int = 640


def link_worker(spec: LinkSpec, window: ClientWindow | None, prepared: Any = None) -> Any:
    """Client-process entry: connect when ``window`` is None; else run the camera until the window closes and return
    the send and answer times of the frames answered with features, and how many were dropped or failed."""
    from yolostream.client import FeatureClient

    if window is None:
        client = FeatureClient(spec.target, timeout=120, settle_s=0)
        client.model_info()
        return client, synthetic_frame(spec.height, spec.width)
    client, image = prepared

    def camera():
        start, tick = window.start_at, 0
        while True:
            at = start + tick / spec.rate
            left = at - time.perf_counter()
            if left > 0:
                time.sleep(left)
            if window.closed(time.perf_counter()):
                return
            yield image
            # a camera does not wait: ticks missed while the sender was blocked are gone
            tick = max(tick + 1, math.floor((time.perf_counter() - start) * spec.rate) + 1)

    sent, received, batch, values, dropped, failed = [], [], [], 0, 0, 0
    with client:
        for result in client.stream(camera(), layers=spec.layers, dtype=spec.dtype, compression=spec.compression,
                                    imgsz=spec.imgsz, realtime=spec.realtime, encoding="jpeg", quality=90,
                                    max_in_flight=spec.max_in_flight):
            if not result.ok:
                if window.inside(time.perf_counter()):
                    dropped += result.status == "dropped"
                    failed += result.status == "error"
                continue
            now = window.answered()
            received.append(now)
            sent.append(now - result.latency)
            batch.append(result.batch_size)
            values = values or sum(array.size for array in result.features.values())
    return {"sent": np.asarray(sent), "received": np.asarray(received), "batch": np.asarray(batch),
            "ok": np.ones(len(sent), bool), "reply_bytes": 0, "values": int(values), "dropped": int(dropped),
            "failed": int(failed)}


def _bound(row: dict[str, Any], cpu_fps: float | None, camera_fps: float) -> str:
    """What holds a row back: the lowest of the camera's rate, the link's bound and the CPU's, when the row reaches
    85 % of it; else ``neither (load)`` (the machine was busier than in the CPU's own row)."""
    limits = [(camera_fps, "camera")]
    if row["link_bound_fps"] is not None:
        limits.append((row["link_bound_fps"], "link"))
    if cpu_fps:
        limits.append((cpu_fps, "CPU"))
    fps_limit, name = min(limits)
    return name if row["fps"] >= 0.85 * fps_limit else "neither (load)"


def run_link(cfg: str, imgsz: int, *, links: Sequence[Link] = LINKS, layer_sets: Sequence[str] = tuple(LAYER_SETS),
             modes: Sequence[tuple[str, str | None]] = MODES, rate: float = 30.0, warm_s: float = 3.0,
             duration_s: float = 6.0, min_frames: int = 3, cost_rounds: int = 3, device: str = "cpu",
             half: bool = False, backend: str = "auto",
             progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict], list[dict]]:
    """The link rows, one per (link, layers, mode) with the unshaped link first (see the module doc for the
    columns), and the cost rows (``run_cost``) from the same server."""
    rows: list[dict] = []
    args = server_args(cfg, imgsz, device=device, half=half, backend=backend)
    progress(f"link: starting the server: {' '.join(args)}")
    with ServerProcess(args) as server:
        target = ("127.0.0.1", server.port)
        cpu_fps: dict[tuple[str, str, str | None], float] = {}
        for link in (UNSHAPED, *links):
            shaped = ShapedLink(target, link.mbit_s, link.rtt_ms / 2).start()
            try:
                for layers in layer_sets:
                    for dtype, compression in modes:
                        spec = LinkSpec(shaped.address, LAYER_SETS[layers], dtype, compression, imgsz, rate)
                        window = run_clients(link_worker, [spec], warm_s=warm_s, duration_s=duration_s,
                                             min_frames=min_frames, cpu_seconds=server.cpu_seconds,
                                             window_timeout_s=300.0)
                        row = _row(window, shaped, link, layers, dtype, compression, rate)
                        key = (layers, dtype, compression)
                        if link.mbit_s is None:
                            cpu_fps[key] = row["fps"]
                        row["cpu_bound_fps"] = cpu_fps.get(key)
                        row["bound"] = _bound(row, row["cpu_bound_fps"], rate)
                        rows.append(row)
                        progress(f"link {link.name}, {layers}, {row['mode']}: {row['fps']:.1f} frames/s, "
                                 f"{row['down_bytes_per_frame'] / 1e3:.0f} kB/frame, "
                                 f"{row['bits_per_value'] or 0:.2f} bits/value, bound: {row['bound']}")
            finally:
                shaped.stop()
        costs = run_cost(server, imgsz, layers="P3,P4,P5", modes=modes, rounds=cost_rounds,
                         rate=0.5 * min(cpu_fps.get(("P3,P4,P5", d, c), rate) for d, c in modes),
                         warm_s=warm_s, duration_s=duration_s, min_frames=min_frames, progress=progress)
    return rows, costs


def run_cost(server: ServerProcess, imgsz: int, *, layers: str, modes: Sequence[tuple[str, str | None]], rounds: int,
             rate: float, warm_s: float, duration_s: float, min_frames: int,
             progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Server CPU per frame of each mode with every frame computed: the camera paced at ``rate`` (half what the
    CPU managed in the mode it managed least, so none is dropped or queued), not realtime, straight to the server;
    the modes interleaved, the first one rotating each round, and each mode's median over ``rounds``. Realtime rows
    do not tell this: their server also decodes the frames it then drops, and the drops differ by mode."""
    measured: dict[str, list[dict]] = {}
    for r in range(rounds):
        for dtype, compression in rotated(modes, r):
            spec = LinkSpec(server.address, LAYER_SETS[layers], dtype, compression, imgsz, rate, realtime=False)
            window = run_clients(link_worker, [spec], warm_s=warm_s, duration_s=duration_s, min_frames=min_frames,
                                 cpu_seconds=server.cpu_seconds, cpu_by_role=server.cpu_by_role,
                                 window_timeout_s=300.0)
            ms_per_frame = 1000.0 / window.frames
            mode = dtype + (f"+{compression}" if compression else "")
            measured.setdefault(mode, []).append({
                "layers": layers, "mode": mode, "rate": rate, "fps": window.fps, "frames": window.frames,
                "server_cpu_ms_per_frame": window.cpu_s * ms_per_frame,
                "device_cpu_ms_per_frame": window.cpu_by_role_s.get("device", 0.0) * ms_per_frame,
                "frontend_cpu_ms_per_frame": window.cpu_by_role_s.get("frontends", 0.0) * ms_per_frame,
                "client_cpu_ms_per_frame": window.client_cpu_s * ms_per_frame})
    rows = []
    for runs in measured.values():
        row = median_row(runs)
        row["frames"] = sum(run["frames"] for run in runs)
        row["server_cpu_ms_rounds"] = [run["server_cpu_ms_per_frame"] for run in runs]
        rows.append(row)
    base = next((row for row in rows if row["mode"] == "float16"), None)
    for row in rows:
        row["vs_float16"] = row["server_cpu_ms_per_frame"] / base["server_cpu_ms_per_frame"] if base else None
        progress(f"link cost {layers}, {row['mode']}: server {row['server_cpu_ms_per_frame']:.1f} CPU-ms/frame "
                 f"(device {row['device_cpu_ms_per_frame']:.1f}, front-end {row['frontend_cpu_ms_per_frame']:.1f})")
    return rows


def _row(window: Any, shaped: ShapedLink, link: Link, layers: str, dtype: str, compression: str | None,
         rate: float) -> dict[str, Any]:
    stats = percentiles(window.latencies_ms)
    frames = window.frames
    down = shaped.bytes_between(DOWN, window.start, window.end)
    up = shaped.bytes_between(UP, window.start, window.end)
    values = window.extra.get("values", 0)
    down_pf = down / frames if frames else None
    up_pf = up / frames if frames else None
    # the reply direction bounds the rate; the camera's JPEGs go up at its own rate whatever comes back
    link_fps = link.mbit_s * 1e6 / (8.0 * down_pf) if link.mbit_s is not None and down_pf else None
    return {
        "link": link.name, "mbit_s": link.mbit_s, "rtt_ms": link.rtt_ms, "layers": layers, "dtype": dtype,
        "compression": compression, "mode": dtype + (f"+{compression}" if compression else ""), "rate": rate,
        "fps": window.fps, "frames": frames, "duration_s": window.duration_s,
        "dropped": window.extra.get("dropped", 0), "errors": window.extra.get("failed", 0),
        "p50_ms": stats["p50"], "p99_ms": stats["p99"],
        "down_bytes_per_frame": down_pf, "up_bytes_per_frame": up_pf, "values_per_frame": values,
        "down_kb_per_frame": down_pf / 1e3 if down_pf else None, "up_kb_per_frame": up_pf / 1e3 if up_pf else None,
        "bits_per_value": 8.0 * down_pf / values if down_pf and values else None,
        "link_bound_fps": link_fps, "up_mbit_s": 8.0 * up / window.duration_s / 1e6,
        "down_mbit_s": 8.0 * down / window.duration_s / 1e6,
        "server_cpu_ms_per_frame": window.cpu_s / frames * 1000.0 if window.cpu_s is not None and frames else None,
        "client_cpu_ms_per_frame": window.client_cpu_s / frames * 1000.0 if frames else None,
        "other_cpu_cores": max(0.0, window.machine_busy_s - window.client_cpu_s - (window.cpu_s or 0.0))
        / window.duration_s,
    }


def targets(rows: Sequence[dict], costs: Sequence[dict] = (), rate: float = 30.0) -> list[dict]:
    """Issue 19's targets: frames/s on the two thin links from the link rows (the achieved rate, and where the CPU
    bounds the row the link's bound from the measured bytes), and the server CPU the codes cost against float16 from
    the cost rows."""
    def pick(**match: Any) -> dict | None:
        return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)

    out = []
    for link, layers, goal in (("100 Mbit/s", "P3,P4,P5", 15.0), ("20 Mbit/s", "backbone", 20.0)):
        base = pick(link=link, layers=layers, mode="float16")
        for mode in ("uint8+zstd", "uint8"):
            row = pick(link=link, layers=layers, mode=mode)
            if not row:
                continue
            achieved, bound = row["fps"], row["link_bound_fps"]
            best = max(achieved, min(bound or 0.0, rate))
            out.append({"goal": f"{layers} at {link}, {mode}: ≥ {goal:.0f} frames/s",
                        "measured": f"achieved {achieved:.1f}, link bound {bound or 0:.1f} frames/s "
                                    f"({row['down_bytes_per_frame'] / 1e3:.0f} kB/frame; bound: {row['bound']})",
                        "float16": f"achieved {base['fps']:.1f}, link bound {base['link_bound_fps'] or 0:.1f}"
                        if base else None,
                        "ratio": best / goal, "limit": "≥ 1",
                        "met": ("yes" if achieved >= goal else "on the link's bound (CPU-bound here)"
                                if best >= goal else "no")})
    base = next((row for row in costs if row["mode"] == "float16"), None)
    for row in costs:
        if base is None or row is base or not row["mode"].startswith("uint8"):
            continue
        out.append({"goal": f"server CPU per frame, P3,P4,P5, {row['mode']}: ≤ 1.10 × float16 (every frame computed, "
                            f"{row['rate']:.1f} frames/s, median of {row['rounds']} rounds)",
                    "measured": f"{row['server_cpu_ms_per_frame']:.1f} ÷ {base['server_cpu_ms_per_frame']:.1f} "
                                f"CPU-ms/frame (device {row['device_cpu_ms_per_frame']:.1f} ÷ "
                                f"{base['device_cpu_ms_per_frame']:.1f}, front-end {row['frontend_cpu_ms_per_frame']:.1f}"
                                f" ÷ {base['frontend_cpu_ms_per_frame']:.1f})", "float16": None,
                    "ratio": row["vs_float16"], "limit": "≤ 1.10", "met": "yes" if row["vs_float16"] <= 1.10 else "no"})
    return out


def link_quality(cfg: str, imgsz: int, frames: int = 4) -> list[dict]:
    """The codes against float32 on ``frames`` of the bench's scenes, with the link bench's model (random weights,
    ``cfg``) in this process; one row per measure (see ``codec_bench.quality``)."""
    import torch

    from codec_bench import features_of, quality
    from yolostream.server.common.object_request import ObjectOptions
    from yolostream.server.model import objects as obj
    from yolostream.server.model import detections as det
    from yolostream.server.model.loader import load_model
    from yolostream.v1 import wire

    loaded = load_model(cfg=cfg)
    features, head = features_of(loaded, frames, imgsz)
    found = quality(features, head)
    layers = obj.default_object_layers(loaded.model)
    cosines: dict[str, list[float]] = {"anchor": [], "roi": []}
    for frame in features:
        maps = [torch.from_numpy(frame[name])[None] for name in ("P3", "P4", "P5")]
        input_hw = (maps[0].shape[-2] * 8, maps[0].shape[-1] * 8)
        with torch.no_grad():
            boxes = det.non_max_suppression(det.decode(head, maps))[0]
        if not len(boxes.boxes):
            continue
        for mode in cosines:
            vectors = obj.object_features(maps, layers, [boxes.boxes], input_hw,
                                          ObjectOptions(mode=mode)).vectors[0].numpy()
            decoded = wire.quantize_affine(vectors).dequantize()
            cos = (vectors * decoded).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(decoded, axis=1))
            cosines[mode] += cos.tolist()
    rows = [{"measure": f"per-element bound on {name} ({row['tensors']} tensors)",
             "value": f"holds: {row['bound_holds']}; worst |error| = {row['max_err_over_half_scale']:.5f} × scale/2",
             "target": "≤ scale/2 (+ float rounding)", "met": "yes" if row["bound_holds"] else "no"}
            for name, row in found["layers"].items()]
    for mode, values in cosines.items():
        worst = min(values) if values else None
        rows.append({"measure": f"object vectors ({mode}, {len(values)} boxes): worst cosine",
                     "value": f"{worst:.6f}" if worst is not None else "no boxes", "target": "≥ 0.999",
                     "met": "yes" if worst is not None and worst >= 0.999 else "no"})
    rows.append({"measure": "pooled vectors (avg, max): worst cosine",
                 "value": f"{min(found['pooled_cosine_min']['avg_codes'], found['pooled_cosine_min']['max_codes']):.6f}",
                 "target": "≥ 0.999", "met": "yes" if min(found["pooled_cosine_min"]["avg_codes"],
                                                            found["pooled_cosine_min"]["max_codes"]) >= 0.999 else "no"})
    for kind, counts in found["detections_iou90_same_class"].items():
        rows.append({"measure": f"Detect + NMS on decoded P3-P5 ({kind}): float32 boxes found again (same class, "
                                f"IoU ≥ 0.9)",
                     "value": f"{counts['matched']} of {counts['boxes']} "
                              f"({100 * (counts['fraction'] or 0):.1f} %)",
                     "target": "≥ 99 %" if kind == "uint8" else "(comparison)",
                     "met": ("yes" if (counts["fraction"] or 0) >= 0.99 else "no") if kind == "uint8" else "—"})
    for kind, counts in found["anchor_rows_iou90_same_class"].items():
        rows.append({"measure": f"well-posed anchor rows before NMS ({kind}): same class and IoU ≥ 0.9",
                     "value": f"{counts['kept']} of {counts['candidates']} ({100 * (counts['fraction'] or 0):.1f} %)",
                     "target": "(diagnostic)", "met": "—"})
    return rows
