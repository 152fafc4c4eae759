"""Codec study for issue 19: lossless compression of real replies, and the quality of 8-bit per-channel codes.

Real replies: the fixture yolov5n (``--weights``, default ``../shared/fixtures/yolov5n.pt``) runs its truncated
forward (``FeatureExtractor``, BatchNorm fused, as the server) on synthetic 480x640 street-like frames
(``e2e_bench.synthetic_frame``, letterboxed as the server does: 480x640 input), for the layer sets ``backbone``
and ``P3,P4,P5``. Each tensor is compressed on its own, as the wire does, in three element types: float32,
float16 and the DTYPE_UINT8_AFFINE codes (``wire.quantize_affine``).

Codecs, all on one thread (MB/s are per core, of plain bytes):

- ``gzip-6``: zlib level 6 in a gzip wrapper, what gRPC's own gzip compression costs (the anchor);
- ``zstd-L``: Zstandard (``zstandard``) at a few levels, on the plain bytes;
- ``shuffle+zstd-L``: bytes grouped by significance (``wire.shuffle_bytes``, numpy) then zstd: the
  COMPRESSION_SHUFFLE_ZSTD wire format (decompression includes the un-shuffle);
- ``lz4``, ``shuffle+lz4``: ``lz4.frame`` at its default level;
- ``blosc2 …``: ``blosc2.compress2`` with its SIMD shuffle or bitshuffle and zstd or lz4 inside (a container format
  that only C and Python read, so a reference point for the shuffle rather than a wire candidate).

Each cell is the median of ``--repeats`` passes over all tensors, timed in this thread's CPU time (the cost per
core; other processes on the machine stretch wall time far more). The choice rule (``choose``), on P3,P4,P5: among
the wire candidates (everything but blosc2) that compress one 30-fps stream's reply within ``--max-core-pct`` of a
core in every element type, the best geometric mean of the float32, float16 and 8-bit ratios; within 2 % of it,
the cheapest. Compression is opt-in per stream, so a stream that asks for it is short of bandwidth: ratio first,
as long as the front-end can afford it at camera rate.

Quality of the 8-bit codes, on the same frames: the device quantiser (torch, CPU here) against the numpy reference
(bit for bit), the per-element bound |x - decoded| <= scale/2 + 6 * 2**-24 * max(|min|, |max|) + 2**-142, the
error relative to the tensor's RMS, the cosine of pooled vectors (sent as codes, and pooled from decoded maps), and
Detect + NMS (upstream defaults) run on decoded P3-P5: the share of the float32 boxes found again with the same
class and IoU >= 0.9 (float16 maps as a point of comparison), and, before NMS, the share of the well-posed float32
anchor rows (score above 0.25, best class ahead by 1e-3 or more, box sides of 2 pixels or more) whose own row keeps
its class and a box at IoU >= 0.9. The fixture's weights are seeded random ones, not trained: feature statistics
differ from a trained model's, most rows score above 0.25, many class scores tie at 1.0 and many boxes are far
under a pixel, so NMS order and classes among ties move with any perturbation (float16 included); the per-anchor
share on well-posed rows is free of that.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'   # lz4 and blosc2; codecs not installed are left out
    .venv/bin/python bench/codec_bench.py [--frames 4] [--repeats 5] [--max-core-pct 25] [--out bench/results]
"""

from __future__ import annotations

import argparse
import gzip
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import report
from e2e_bench import synthetic_frame

from yolostream.server.offline.extractor import FeatureExtractor
from yolostream.server.model import detections as det
from yolostream.server.model.loader import load_model
from yolostream.server.common.preprocess import prepare
from yolostream.v1 import wire

REPO = Path(__file__).resolve().parents[1]
LAYER_SETS = {"backbone": ("backbone",), "P3,P4,P5": ("P3", "P4", "P5")}
CAMERA_FPS = 30
#: Slack of the per-element bound beyond scale/2: float32 rounding of the quantiser and of the decode, and
#: of a subnormal scale (tests/test_quantize.py explains both terms).
BOUND_ULPS = 6 * 2.0**-24
BOUND_TINY = 2.0**-142


@dataclass(frozen=True)
class Codec:
    """A named pair of functions over one tensor's plain bytes: ``pack(data, itemsize)`` and
    ``unpack(packed, itemsize, size)``; ``wire`` says whether it is a candidate for the wire format."""

    name: str
    pack: Callable[[bytes, int], bytes]
    unpack: Callable[[bytes, int, int], bytes]
    wire: bool = True


def codecs() -> list[Codec]:
    """Every codec whose package is installed (zlib always is)."""
    out = [Codec("gzip-6", lambda b, k: gzip.compress(b, 6, mtime=0), lambda p, k, n: gzip.decompress(p))]
    try:
        import zstandard
    except ImportError:
        print("zstandard is not installed: no zstd rows (pip install 'yolostream[compress]')", file=sys.stderr)
    else:
        dctx = zstandard.ZstdDecompressor()
        for level in (1, 3, 9):
            cctx = zstandard.ZstdCompressor(level=level)
            out.append(Codec(f"zstd-{level}", lambda b, k, c=cctx: c.compress(b),
                             lambda p, k, n: dctx.decompress(p, max_output_size=n)))
        for level in (1, 3):
            cctx = zstandard.ZstdCompressor(level=level)
            out.append(Codec(f"shuffle+zstd-{level}", lambda b, k, c=cctx: c.compress(wire.shuffle_bytes(b, k)),
                             lambda p, k, n: wire.unshuffle_bytes(dctx.decompress(p, max_output_size=n), k)))
    try:
        import lz4.frame as lz4f
    except ImportError:
        print("lz4 is not installed: no lz4 rows (pip install 'yolostream[bench]')", file=sys.stderr)
    else:
        out.append(Codec("lz4", lambda b, k: lz4f.compress(b), lambda p, k, n: lz4f.decompress(p)))
        out.append(Codec("shuffle+lz4", lambda b, k: lz4f.compress(wire.shuffle_bytes(b, k)),
                         lambda p, k, n: wire.unshuffle_bytes(lz4f.decompress(p), k)))
    try:
        import blosc2
    except ImportError:
        print("blosc2 is not installed: no blosc2 rows (pip install 'yolostream[bench]')", file=sys.stderr)
    else:
        variants = (("blosc2 zstd-1 shuffle", blosc2.Codec.ZSTD, 1, blosc2.Filter.SHUFFLE),
                    ("blosc2 zstd-1 bitshuffle", blosc2.Codec.ZSTD, 1, blosc2.Filter.BITSHUFFLE),
                    ("blosc2 lz4-5 shuffle", blosc2.Codec.LZ4, 5, blosc2.Filter.SHUFFLE))
        for name, codec, level, filt in variants:
            def pack(b: bytes, k: int, codec=codec, level=level, filt=filt) -> bytes:
                return blosc2.compress2(b, codec=codec, clevel=level, typesize=k, filters=[filt], filters_meta=[0],
                                        nthreads=1)
            out.append(Codec(name, pack, lambda p, k, n: blosc2.decompress2(p, nthreads=1), wire=False))
    return out


def run_features(weights: Path, frames: int) -> tuple[list[dict[str, np.ndarray]], Any]:
    """float32 backbone, P3, P4, P5 of ``frames`` synthetic 480x640 frames, and the model's Detect head."""
    return features_of(load_model(weights), frames)


def features_of(loaded: Any, frames: int, imgsz: int = 640) -> tuple[list[dict[str, np.ndarray]], Any]:
    """float32 backbone, P3, P4, P5 of ``loaded`` (a ``load_model`` result) on ``frames`` synthetic 480x640 frames
    letterboxed to ``imgsz``, and the model's Detect head."""
    extractor = FeatureExtractor(loaded, ["backbone", "P3", "P4", "P5"])
    head = loaded.model.model[loaded.model.detect_index].eval().requires_grad_(False)
    out = []
    with torch.no_grad():
        for seed in range(frames):
            chw, _ = prepare(synthetic_frame(480, 640, seed), imgsz, extractor.stride, "auto")
            maps = extractor(extractor.to_input(chw[None]))
            out.append({name: t[0].to(torch.float32).numpy().copy() for name, t in maps.items()})
    return out, head


def element_payloads(features: Sequence[dict[str, np.ndarray]], names: Sequence[str]) -> dict[str, list[bytes]]:
    """The plain bytes of every tensor of the layer set, per element type."""
    out: dict[str, list[bytes]] = {"float32": [], "float16": [], "uint8": []}
    for frame in features:
        for name in names:
            x = frame[name]
            out["float32"].append(x.tobytes())
            out["float16"].append(x.astype(np.float16).tobytes())
            out["uint8"].append(wire.quantize_affine(x).codes.tobytes())
    return out


def time_codec(codec: Codec, payloads: Sequence[bytes], itemsize: int, repeats: int) -> dict[str, float]:
    """Ratio and median per-core throughput of ``codec`` over ``payloads`` (checked to round-trip).

    Throughput is plain bytes per second of this thread's CPU time (the work is single-threaded, so it is the cost
    per core, and other processes competing for the cores inflate it far less than wall time); the wall-time
    figures are kept too.
    """
    plain = sum(len(p) for p in payloads)
    packed = [codec.pack(p, itemsize) for p in payloads]
    for p, q in zip(payloads, packed):
        if bytes(codec.unpack(q, itemsize, len(p))) != p:
            raise AssertionError(f"{codec.name} does not round-trip")
    cpu = {"pack": [], "unpack": []}
    wall = {"pack": [], "unpack": []}
    for _ in range(repeats):
        for what, work in (("pack", lambda: [codec.pack(p, itemsize) for p in payloads]),
                           ("unpack", lambda: [codec.unpack(q, itemsize, len(p)) for p, q in zip(payloads, packed)])):
            c0, w0 = time.thread_time(), time.perf_counter()
            work()
            cpu[what].append(time.thread_time() - c0)
            wall[what].append(time.perf_counter() - w0)
    size = sum(len(q) for q in packed)
    return {"plain_bytes": plain, "packed_bytes": size, "ratio": plain / size,
            "compress_mb_s": plain / report.median(cpu["pack"]) / 1e6,
            "decompress_mb_s": plain / report.median(cpu["unpack"]) / 1e6,
            "compress_mb_s_wall": plain / report.median(wall["pack"]) / 1e6,
            "decompress_mb_s_wall": plain / report.median(wall["unpack"]) / 1e6}


def codec_rows(features: Sequence[dict[str, np.ndarray]], frames: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    itemsizes = {"float32": 4, "float16": 2, "uint8": 1}
    all_codecs = codecs()
    for layers, names in LAYER_SETS.items():
        payloads = element_payloads(features, names)
        for dtype, items in payloads.items():
            for codec in all_codecs:
                cell = time_codec(codec, items, itemsizes[dtype], repeats)
                per_frame = cell["plain_bytes"] / frames
                rows.append({
                    "layers": layers, "dtype": dtype, "codec": codec.name, "wire_candidate": codec.wire,
                    "kb_frame": per_frame / 1e3, "packed_kb_frame": cell["packed_bytes"] / frames / 1e3, **cell,
                    "compress_ms_frame": per_frame / cell["compress_mb_s"] / 1e3,
                    "decompress_ms_frame": per_frame / cell["decompress_mb_s"] / 1e3,
                    "core_pct_at_camera": 100 * CAMERA_FPS * per_frame / (cell["compress_mb_s"] * 1e6),
                })
                print(f"  {layers:9s} {dtype:8s} {codec.name:26s} ratio {cell['ratio']:.3f}  "
                      f"{cell['compress_mb_s']:7.0f} / {cell['decompress_mb_s']:7.0f} MB/s", file=sys.stderr)
    return rows


def choose(rows: Sequence[dict[str, Any]], max_core_pct: float) -> dict[str, Any]:
    """The wire codec, from the P3,P4,P5 rows: among wire candidates that compress one stream's reply at camera rate
    within ``max_core_pct`` % of a core in every element type, the best geometric mean of the float32, float16 and
    8-bit ratios; within 2 % of it, the one whose costliest element type costs least."""
    cells = {(r["codec"], r["dtype"]): r for r in rows if r["layers"] == "P3,P4,P5"}
    dtypes = sorted({d for _, d in cells})
    names = sorted({r["codec"] for r in rows if r["wire_candidate"]})
    cost = {n: max(cells[n, d]["core_pct_at_camera"] for d in dtypes) for n in names}
    score = {n: float(np.exp(np.mean([np.log(cells[n, d]["ratio"]) for d in dtypes]))) for n in names}
    affordable = [n for n in names if cost[n] <= max_core_pct]
    if not affordable:
        return {"codec": None, "reason": f"no wire candidate stays within {max_core_pct:g} % of a core"}
    best = max(score[n] for n in affordable)
    close = [n for n in affordable if score[n] >= 0.98 * best]
    pick = min(close, key=lambda n: cost[n])
    return {
        "codec": pick,
        "rule": f"best geometric-mean ratio on P3,P4,P5 ({', '.join(dtypes)}) among wire candidates that compress one "
                f"{CAMERA_FPS}-fps stream within {max_core_pct:g} % of a core in every element type; within 2 % of "
                "it, the cheapest",
        "affordable": affordable, "within_2pct": close,
        "geomean_ratio": score, "worst_core_pct_at_camera": cost,
    }


def _bound_ok(x: np.ndarray, decoded: np.ndarray, codes: wire.AffineCodes) -> tuple[bool, float]:
    """Whether every element is within the bound, and the largest |x - decoded| / (scale / 2) (0 when scale is 0)."""
    shape = (-1,) + (1,) * (x.ndim - 1) if codes.axis == 0 else (() if codes.axis is None else (1, -1))
    s = codes.scales.astype(np.float64).reshape(shape)
    o = codes.offsets.astype(np.float64).reshape(shape)
    reduce = tuple(a for a in range(x.ndim) if a != codes.axis)
    magnitude = np.maximum(np.abs(o), np.abs(np.max(x, axis=reduce, keepdims=True)).astype(np.float64))
    err = np.abs(x.astype(np.float64) - decoded.astype(np.float64))
    ok = bool((err <= s / 2 + BOUND_ULPS * magnitude + BOUND_TINY).all())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(s > 0, err / (s / 2), 0.0)
    return ok, float(rel.max())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)))


def _match_fraction(ref: det.Detections, other: det.Detections, iou: float = 0.9) -> tuple[int, int]:
    """(matched, total): reference boxes with an unused box of ``other`` of the same class at IoU >= ``iou``."""
    if len(ref) == 0:
        return 0, 0
    a, b = ref.boxes.double(), other.boxes.double()
    if len(other) == 0:
        return 0, len(ref)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(dim=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(dim=1)
    ious = inter / (area_a[:, None] + area_b[None, :] - inter)
    ious[ref.classes[:, None] != other.classes[None, :]] = 0
    used = torch.zeros(len(other), dtype=torch.bool)
    matched = 0
    for i in range(len(ref)):
        row = ious[i].masked_fill(used, 0)
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            matched += 1
    return matched, len(ref)


def _anchor_match(ref: torch.Tensor, other: torch.Tensor, conf: float = 0.25,
                  iou: float = 0.9) -> tuple[int, int, int, int]:
    """(kept, same class, IoU >= ``iou``, candidates): well-posed decoded rows of ``ref`` (1, rows, 5 + nc), and how
    many of them keep, in ``other``, their best class and a box at IoU >= ``iou`` (both, each alone). Well-posed:
    score above ``conf``, a best class ahead of the second by at least 1e-3 (a tie is decided by rounding alone) and
    both box sides of at least 2 pixels."""
    r, o = ref[0].double(), other[0].double()
    top = (r[:, 5:] * r[:, 4:5]).topk(2, dim=1)
    score, cls = top.values[:, 0], top.indices[:, 0]
    rows = (score > conf) & (top.values[:, 0] - top.values[:, 1] >= 1e-3) & (r[:, 2:4] >= 2).all(dim=1)
    if not rows.any():
        return 0, 0, 0, 0
    a, b = det.xywh_to_xyxy(r[rows, :4]), det.xywh_to_xyxy(o[rows, :4])
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1) - inter
    same = (o[rows, 5:] * o[rows, 4:5]).argmax(dim=1) == cls[rows]
    close = inter / union >= iou
    return int((close & same).sum()), int(same.sum()), int(close.sum()), int(rows.sum())


def quality(features: Sequence[dict[str, np.ndarray]], head: Any) -> dict[str, Any]:
    """The 8-bit codes' fidelity on every tensor of every frame (see the module doc)."""
    from yolostream.server.device import quantize
    layers: dict[str, dict[str, Any]] = {}
    pooled_cos: dict[str, list[float]] = {"avg_codes": [], "max_codes": [], "avg_of_decoded_maps": []}
    det_counts = {"uint8": [0, 0], "float16": [0, 0]}
    anchor_counts = {"uint8": [0, 0, 0, 0], "float16": [0, 0, 0, 0]}
    for frame in features:
        for name, x in frame.items():
            codes = wire.quantize_affine(x)
            decoded = codes.dequantize()
            device = quantize.quantize_maps(torch.from_numpy(x)[None])
            exact = (np.array_equal(device.codes[0].numpy(), codes.codes)
                     and np.array_equal(device.scales[0].numpy().view(np.uint32), codes.scales.view(np.uint32))
                     and np.array_equal(device.offsets[0].numpy().view(np.uint32), codes.offsets.view(np.uint32)))
            ok, worst = _bound_ok(x, decoded, codes)
            rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
            rel_rms = float(np.sqrt(np.mean((x.astype(np.float64) - decoded) ** 2))) / rms
            row = layers.setdefault(name, {"shape": list(x.shape), "tensors": 0, "device_equals_reference": True,
                                           "bound_holds": True, "max_err_over_half_scale": 0.0,
                                           "max_rel_rms_error": 0.0})
            row["tensors"] += 1
            row["device_equals_reference"] &= exact
            row["bound_holds"] &= ok
            row["max_err_over_half_scale"] = max(row["max_err_over_half_scale"], worst)
            row["max_rel_rms_error"] = max(row["max_rel_rms_error"], rel_rms)
            for kind, vec in (("avg", x.mean(axis=(1, 2))), ("max", x.max(axis=(1, 2)))):
                pooled_cos[f"{kind}_codes"].append(_cosine(vec, wire.quantize_affine(vec).dequantize()))
            pooled_cos["avg_of_decoded_maps"].append(_cosine(x.mean(axis=(1, 2)), decoded.mean(axis=(1, 2))))
        with torch.no_grad():
            maps = [torch.from_numpy(frame[n])[None] for n in ("P3", "P4", "P5")]
            ref_pred = det.decode(head, maps)
            ref = det.non_max_suppression(ref_pred)[0]
            for kind, convert in (("uint8", lambda m: wire.quantize_affine(m.numpy()[0]).dequantize()),
                                  ("float16", lambda m: m.numpy()[0].astype(np.float16).astype(np.float32))):
                pred = det.decode(head, [torch.from_numpy(convert(m))[None] for m in maps])
                for counts, found in ((det_counts, _match_fraction(ref, det.non_max_suppression(pred)[0])),
                                      (anchor_counts, _anchor_match(ref_pred, pred))):
                    counts[kind] = [a + b for a, b in zip(counts[kind], found)]
    return {
        "bound": "|x - decoded| <= scale/2 + 6 * 2**-24 * max(|min|, |max|) + 2**-142, per element",
        "layers": layers,
        "pooled_cosine_min": {k: min(v) for k, v in pooled_cos.items()},
        "detections_iou90_same_class": {
            k: {"matched": m, "boxes": n, "fraction": (m / n if n else None)} for k, (m, n) in det_counts.items()},
        "anchor_rows_iou90_same_class": {
            k: {"kept": m, "candidates": n, "fraction": (m / n if n else None),
                "same_class_fraction": (c / n if n else None), "iou90_fraction": (i / n if n else None)}
            for k, (m, c, i, n) in anchor_counts.items()},
    }


COLUMNS = [
    ("layers", "layers", 0), ("dtype", "dtype", 0), ("codec", "codec", 0), ("kB/frame", "kb_frame", 1),
    ("packed kB/frame", "packed_kb_frame", 1), ("ratio", "ratio", 3), ("compress MB/s", "compress_mb_s", 0),
    ("decompress MB/s", "decompress_mb_s", 0), ("compress ms/frame", "compress_ms_frame", 2),
    ("decompress ms/frame", "decompress_ms_frame", 2), (f"% core at {CAMERA_FPS} fps", "core_pct_at_camera", 1),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=REPO.parent / "shared" / "fixtures" / "yolov5n.pt")
    parser.add_argument("--frames", type=int, default=4, help="synthetic 480x640 frames (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per cell; the median counts (default 5)")
    parser.add_argument("--max-core-pct", type=float, default=25.0,
                        help=f"most of a core that compressing one {CAMERA_FPS}-fps stream's P3,P4,P5 reply may take, "
                             "in any element type, for a codec to be chosen (default 25)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON (default bench/results)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = report.machine_info("codec", {"frames": opts.frames, "repeats": opts.repeats, "weights": str(opts.weights)})
    features, head = run_features(opts.weights, opts.frames)
    rows = codec_rows(features, opts.frames, opts.repeats)
    choice = choose(rows, opts.max_core_pct)
    fidelity = quality(features, head)
    print(f"### Codecs on yolov5n replies (480x640 frames, {opts.frames} frames, one core)\n")
    print(report.markdown_table(COLUMNS, rows))
    print(f"\nchosen: {json.dumps(choice)}")
    print(f"\n### 8-bit codes\n\n{json.dumps(fidelity, indent=1)}")
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"codec-{socket.gethostname() or 'host'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": info, "codecs": rows, "choice": choice, "quality": fidelity}, indent=1))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
