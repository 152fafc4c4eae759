"""``yolostream stream`` and ``yolostream info``: the client's subcommands.

``yolostream.server.cli`` finds this module with importlib and calls ``register_stream`` / ``register_info`` on
its subparsers, so the client adds commands without the command line importing torch. Expected failures are
raised as ValueError, OSError or RuntimeError (FeatureServerError is one) with one line of text, which the main
command prints before exiting 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import ExitStack
from dataclasses import asdict
from typing import Any, Sequence

import grpc
import numpy as np

from yolostream.v1 import vocab

from .client import DEFAULT_ADDRESS, FeatureClient
from .options import (COMPRESSIONS, ENCODINGS, LETTERBOXES, POOLINGS, DetectOptions, ObjectFeatureOptions,
                      stream_compression)
from .results import FeatureServerError, ModelInfo
from .resume import ResumePolicy
from .sources import GIVE_UP_AFTER_S, SOURCE_TIMEOUT_S, open_source
from .stats import StatusLine, StreamStats
from .store import FeatureWriter
from .viz import VideoSink, Window, display_problem, render

TOKEN_ENV = "YOLOSTREAM_TOKEN"
SERVER_ENV = "YOLOSTREAM_SERVER"
DTYPES = tuple(vocab.DTYPES)
EXIT_FRAME_ERRORS = 1
EXIT_INTERRUPTED = 130


def _connection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_ADDRESS), metavar="HOST:PORT",
                   help=f"server address, a comma list of IP:PORT replicas, or a gRPC target such as "
                        f"dns:///NAME:PORT (every address NAME resolves to); calls are balanced round-robin over "
                        f"the healthy replicas (default ${SERVER_ENV} or {DEFAULT_ADDRESS})")
    g.add_argument("--token", default=None, help=f"bearer token (default ${TOKEN_ENV}; the variable keeps it out of "
                                                 "the process list)")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--tls-ca", metavar="CA.pem", help="use TLS, trusting these root certificates")
    g.add_argument("--tls-server-name", metavar="NAME", help="name the server certificate must carry, when it "
                                                             "differs from the host in --server")
    g.add_argument("--timeout", type=float, default=30.0, help="deadline of one-shot calls in seconds (default 30)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="end a stream when its server fails instead of resuming it on another replica")
    g.add_argument("--resume-timeout", type=float, default=ResumePolicy.timeout_s, metavar="S",
                   help="give up resuming a stream when no replica has answered for S seconds after its server "
                        f"failed (default {ResumePolicy.timeout_s:g})")


def _client(args: argparse.Namespace) -> FeatureClient:
    if args.tls_ca is not None and not os.path.isfile(args.tls_ca):
        raise FileNotFoundError(f"--tls-ca {args.tls_ca}: no such file")
    if args.resume_timeout <= 0:
        raise ValueError(f"--resume-timeout must be positive, got {args.resume_timeout}")
    return FeatureClient(args.server, token=args.token or os.environ.get(TOKEN_ENV) or None, tls=args.tls,
                         tls_ca=args.tls_ca, tls_server_name=args.tls_server_name, timeout=args.timeout,
                         resume=ResumePolicy(enabled=args.resume, timeout_s=args.resume_timeout))


#: Words of a connect failure and the hint each gets. gRPC says "failed to connect to all addresses; last error: …"
#: under pick_first, and "connections to all backends failing; last error: …" under round_robin (our channels).
_CONNECT_FAILED = ("failed to connect", "connections to all backends failing")
_PLAINTEXT_TO_TLS = ("Socket closed", "Connection reset")
_TLS_TO_PLAINTEXT = ("WRONG_VERSION_NUMBER", "packet length too long", "record layer failure")
_UNTRUSTED = ("CERTIFICATE_VERIFY_FAILED",)


def connect_hint(err: FeatureServerError, tls: bool) -> str | None:
    """What to try when the connection failed in a way that suggests a TLS/plaintext or certificate mistake.

    gRPC reports a plaintext client at a TLS port as "Socket closed" and a TLS client at a plaintext port as a
    handshake error: both true but unhelpful, as the fix is a flag. Other failures (refused, timed out) get none.
    """
    if err.code != grpc.StatusCode.UNAVAILABLE or not any(words in err.details for words in _CONNECT_FAILED):
        return None
    if not tls and any(word in err.details for word in _PLAINTEXT_TO_TLS):
        return "the server may expect TLS: try --tls (or --tls-ca CA.pem for a private certificate authority)"
    if tls and any(word in err.details for word in _UNTRUSTED):
        return ("the server's certificate is not trusted: pass its CA with --tls-ca CA.pem (and --tls-server-name "
                "NAME when the certificate names another host)")
    if tls and any(word in err.details for word in _TLS_TO_PLAINTEXT):
        return "the server may be plaintext: try without --tls and --tls-ca"
    return None


def _model_info(client: FeatureClient, args: argparse.Namespace) -> ModelInfo:
    """The first call of every command, so a wrong TLS choice fails here; adds a hint to such failures."""
    try:
        return client.model_info()
    except FeatureServerError as err:
        hint = connect_hint(err, tls=bool(args.tls or args.tls_ca))
        if hint is None:
            raise
        raise FeatureServerError(err.code, f"{err.details} (hint: {hint})", err.address) from None


def register_info(p: argparse.ArgumentParser) -> None:
    """``yolostream info``: the served model and its layer catalogue."""
    _connection_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = _model_info(client, args)
    if args.json:
        print(json.dumps(asdict(info), indent=2))
        return 0
    print(describe_model(info, args.server))
    print(format_layers(info))
    return 0


def describe_model(info: ModelInfo, address: str) -> str:
    lines = [f"server  {address}",
             f"model   {info.model_name}  ({info.source})",
             f"device  {info.device}  dtype {info.dtype}  backend {info.backend or 'torch'}  default imgsz {info.default_imgsz}  letterbox "
             f"{info.default_letterbox}  stride {info.stride}",
             f"batch   max {info.batching['max_batch']}, wait {info.batching['max_delay_ms']:g} ms, "
             f"{info.batching['max_in_flight']} frames in flight per stream",
             f"limits  {info.limits['max_pixels']:,} pixels, {info.limits['max_frame_bytes']:,} bytes per frame, "
             f"{info.limits['max_message_bytes']:,} bytes per message, {info.limits.get('max_boxes', 0):,} boxes per "
             f"frame"]
    if info.shared_memory["allowed"]:
        lines.append(f"shm     clients on this host may stream through shared memory (--shm), regions up to "
                     f"{info.shared_memory['max_region_bytes'] // 2**20:,} MiB")
    if info.num_classes:
        names = ", ".join(info.class_names[:5]) + (", …" if len(info.class_names) > 5 else "")
        lines.append(f"objects {info.num_classes} classes ({names or 'no names'}); default object vector "
                     f"{info.default_object_feature_dim} values (anchor mode on the Detect inputs)")
    if info.random_weights:
        lines.append("WARNING: RANDOM WEIGHTS - features are for testing only")
    return "\n".join(lines)


def format_layers(info: ModelInfo) -> str:
    """The layer catalogue as a fixed-width table."""
    header = ("idx", "from", "type", "params", "role", "out_ch", "stride", "shape (C,H,W)", "names")
    rows = [header]
    for layer in info.layers:
        rows.append((str(layer.index), ",".join(map(str, layer.inputs)) or "input", layer.type, f"{layer.params:,}",
                     layer.role, str(layer.out_channels), str(layer.stride),
                     "x".join(map(str, layer.output_shape)) or "-", " ".join(layer.aliases)))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip() for row in rows)


def register_stream(p: argparse.ArgumentParser) -> None:
    """``yolostream stream SOURCE``: stream a camera, video, URL or images to a server."""
    p.add_argument("source", metavar="SOURCE",
                   help="camera index (0), video file, RTSP/HTTP URL, image, folder of images, or a glob "
                        "('frames/*.png', quoted)")
    _connection_args(p)
    f = p.add_argument_group("features")
    f.add_argument("--layers", help="comma list of indices or names: backbone, C3..C6, P3..P6, 9 (default: the "
                                    "server's, usually backbone)")
    f.add_argument("--dtype", choices=DTYPES, help="tensor type on the wire (default float32); uint8: 8-bit codes with "
                                                   "a scale and offset per channel, a quarter of float32's bytes, "
                                                   "decoded to float32 (--save keeps the codes)")
    f.add_argument("--compression", choices=tuple(COMPRESSIONS),
                   help="lossless compression of the tensors on the wire: zstd (byte shuffle, then Zstandard; needs "
                        "the zstandard package, the compress extra) or none (default none)")
    f.add_argument("--pool", choices=tuple(POOLINGS), default="none",
                   help="none: (C,H,W) maps; avg/max: one (C,) vector per layer (default none)")
    f.add_argument("--letterbox", choices=tuple(LETTERBOXES), help="server default when omitted (auto)")
    f.add_argument("--imgsz", type=int, help="model input size (default: the server's)")
    s = p.add_argument_group("sending")
    s.add_argument("--encoding", choices=ENCODINGS, default="jpeg",
                   help="jpeg: small, lossy; png: lossless, slow to encode; raw: lossless, large (default jpeg). "
                        "JPEG and PNG image files already in the chosen encoding are sent as they are, unchanged")
    s.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    s.add_argument("--shm", action="store_true",
                   help="send raw frames and receive features through memory shared with the server, not the "
                        "connection (the server on this host, started with --allow-client-shm); --encoding then "
                        "applies only to frames larger than the first")
    s.add_argument("--realtime", action="store_true",
                   help="never hold the source back: the server drops frames it has no time for (answered DROPPED)")
    s.add_argument("--max-in-flight", type=int, help="frames the server holds for this stream (default 8)")
    s.add_argument("--max-frames", type=int, help="stop after N frames")
    c = p.add_argument_group("live sources (cameras, RTSP/HTTP streams)")
    c.add_argument("--give-up-after", type=float, default=GIVE_UP_AFTER_S, metavar="S",
                   help="a camera or stream that stops delivering frames is reopened with backoff, the gRPC stream "
                        "staying open; after S seconds without a frame it ends with an error (0: at the first lost "
                        f"frame; inf: never; default {GIVE_UP_AFTER_S:g})")
    c.add_argument("--source-timeout", type=float, default=SOURCE_TIMEOUT_S, metavar="S",
                   help="seconds an RTSP/HTTP source may take to open and to deliver each frame before that try "
                        f"fails (default {SOURCE_TIMEOUT_S:g})")
    d = p.add_argument_group("objects")
    d.add_argument("--detect", action="store_true", help="detect objects on every frame (upstream detect.py's "
                                                          "decode and NMS, on the server)")
    d.add_argument("--conf", type=float, help="--detect: confidence threshold in (0, 1] (default 0.25)")
    d.add_argument("--iou", type=float, help="--detect: NMS IoU threshold in (0, 1] (default 0.45)")
    d.add_argument("--classes", metavar="C1,C2", help="--detect: keep only these class ids")
    d.add_argument("--agnostic", action="store_true", help="--detect: one NMS over all classes")
    d.add_argument("--multi-label", action="store_true", help="--detect: a box per class above --conf")
    d.add_argument("--max-det", type=int, help="--detect: most boxes per frame (default 300)")
    d.add_argument("--object-features", choices=("anchor", "roi", "none"),
                   help="one vector per box: anchor (the detection's anchor cell; default), roi (RoIAlign) or none")
    d.add_argument("--object-layers", metavar="L1,L2", help="layers object vectors are read from (default P3,P4,P5)")
    d.add_argument("--object-dtype", choices=DTYPES,
                   help="object vector type on the wire (default float32); uint8: 8-bit codes with a scale and offset "
                        "per column, decoded to float32 (--save keeps the codes)")
    d.add_argument("--boxes", metavar="FILE", help="your own boxes, which get vectors instead of detection: CSV "
                                                    "lines 'frame,x1,y1,x2,y2[,id]' (frame = 0-based index in "
                                                    "SOURCE, pixels of the frame)")
    d.add_argument("--track", action="store_true", help="track the boxes (--detect or --boxes) on the server: a "
                                                        "stable id per object, drawn by --viz and saved by --save")
    o = p.add_argument_group("output")
    o.add_argument("--save", metavar="DIR", help="write features as they arrive: one .npy per layer, objects.*.npy "
                                                 "for boxes, frames.jsonl and meta.json (read with "
                                                 "yolostream.client.load_features)")
    o.add_argument("--viz", metavar="OUT.mp4", help="write the video with a heatmap of --viz-layer over it, and "
                                                    "the boxes with class and score (.mp4 or .avi)")
    o.add_argument("--show", action="store_true", help="show the heatmap video in a window (needs a display)")
    o.add_argument("--viz-layer", metavar="NAME", help="layer drawn by --viz/--show (default: the first of --layers)")
    o.add_argument("-q", "--quiet", action="store_true", help="no live status line")
    p.set_defaults(func=cmd_stream)


def _layers(args: argparse.Namespace) -> list[str]:
    layers = [s.strip() for s in (args.layers or "").split(",") if s.strip()]
    drawing = bool(args.viz or args.show)
    if args.viz_layer and not drawing:
        raise ValueError("--viz-layer chooses what --viz or --show draw; give one of them")
    if drawing and args.pool != "none":
        raise ValueError(f"--viz/--show draw feature maps, which --pool {args.pool} reduces to vectors; "
                         "use --pool none")
    if args.viz_layer:
        if not layers:
            layers = [args.viz_layer]
        elif args.viz_layer not in layers:
            raise ValueError(f"--viz-layer {args.viz_layer} is not one of --layers {','.join(layers)}")
    return layers


def _check_numbers(args: argparse.Namespace) -> None:
    if not 1 <= args.quality <= 100:
        raise ValueError(f"--quality must be 1..100, got {args.quality}")
    if args.max_frames is not None and args.max_frames < 0:
        raise ValueError(f"--max-frames must be >= 0, got {args.max_frames}")
    if args.max_in_flight is not None and args.max_in_flight < 1:
        raise ValueError(f"--max-in-flight must be >= 1, got {args.max_in_flight}")
    if args.imgsz is not None and args.imgsz < 32:
        raise ValueError(f"--imgsz must be at least 32 (or left out for the server's default), got {args.imgsz}")
    if not args.give_up_after >= 0:
        raise ValueError(f"--give-up-after must be >= 0 seconds (inf: never), got {args.give_up_after}")
    if not 0 < args.source_timeout < float("inf"):
        raise ValueError(f"--source-timeout must be a positive number of seconds, got {args.source_timeout}")


def _objects(args: argparse.Namespace) -> tuple[DetectOptions | None, ObjectFeatureOptions | None]:
    """The stream's detection and object-vector options from the flags; ValueError for flags that need others."""
    detect = None
    if args.detect:
        classes = None
        if args.classes:
            try:
                classes = [int(c) for c in args.classes.split(",") if c.strip()]
            except ValueError:
                raise ValueError(f"--classes takes comma-separated class ids, got {args.classes[:80]!r}") from None
        detect = DetectOptions(conf=args.conf, iou=args.iou, classes=classes, agnostic=args.agnostic,
                               multi_label=args.multi_label, max_det=args.max_det)
        detect.to_proto()  # check the numbers before connecting
    else:
        given = [flag for flag, value in (("--conf", args.conf), ("--iou", args.iou), ("--classes", args.classes),
                                           ("--agnostic", args.agnostic), ("--multi-label", args.multi_label),
                                           ("--max-det", args.max_det)) if value is not None and value is not False]
        if given:
            raise ValueError(f"{', '.join(given)} set detection options: add --detect")
    if args.track and not (args.detect or args.boxes):
        raise ValueError("--track follows boxes: add --detect or --boxes FILE")
    objects = None
    if args.object_features or args.object_layers or args.object_dtype:
        if not (args.detect or args.boxes):
            raise ValueError("--object-features, --object-layers and --object-dtype apply to boxes: add --detect or "
                             "--boxes FILE")
        objects = ObjectFeatureOptions(mode=args.object_features or "anchor", layers=args.object_layers,
                                       dtype=args.object_dtype)
    return detect, objects


def read_boxes(path: str) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """``--boxes FILE``: frame index → ((N, 4) float32 boxes, (N,) uint64 ids or None), from CSV lines
    ``frame,x1,y1,x2,y2[,id]`` (blank lines and lines starting with # are skipped). A frame's boxes either all
    have ids or none do. ValueError names the line of a malformed one."""
    rows: dict[int, list[list[float]]] = {}
    ids: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            cells = [c.strip() for c in text.split(",")]
            try:
                if len(cells) not in (5, 6):
                    raise ValueError
                frame = int(cells[0])
                box = [float(c) for c in cells[1:5]]
                box_id = int(cells[5]) if len(cells) == 6 else None
                if frame < 0 or (box_id is not None and not 0 <= box_id < 2**64):
                    raise ValueError
            except ValueError:
                raise ValueError(f"--boxes {path} line {number}: expected 'frame,x1,y1,x2,y2[,id]' with a "
                                 f"frame index >= 0 (and an id in 0..2**64-1), got {text[:80]!r}") from None
            rows.setdefault(frame, []).append(box)
            if box_id is not None:
                ids.setdefault(frame, []).append(box_id)
            if frame in ids and len(ids[frame]) != len(rows[frame]):
                raise ValueError(f"--boxes {path} line {number}: the boxes of frame {frame} must all have an id "
                                 "or none")
    return {frame: (np.asarray(boxes, np.float32), np.asarray(ids[frame], np.uint64) if frame in ids else None)
            for frame, boxes in rows.items()}


def _with_boxes(source: Any, boxes: dict[int, tuple[np.ndarray, np.ndarray | None]]) -> Any:
    """The source's frames, with the boxes of ``--boxes`` attached to the frames they name."""
    for index, (image, timestamp) in enumerate(source):
        if index in boxes:
            yield (image, timestamp, *boxes[index])
        else:
            yield image, timestamp


def _save_info(args: argparse.Namespace, info: ModelInfo, source_description: str, layers: Sequence[str]) -> dict:
    return {"model": {"name": info.model_name, "source": info.source, "random_weights": info.random_weights,
                      "device": info.device},
            "server": args.server, "source": source_description,
            "options": {"layers": list(layers), "dtype": args.dtype, "compression": args.compression,
                        "pooling": args.pool, "letterbox": args.letterbox,
                        "imgsz": args.imgsz, "encoding": args.encoding, "quality": args.quality,
                        "realtime": args.realtime, "shared_memory": args.shm, "detect": args.detect,
                        "conf": args.conf, "iou": args.iou,
                        "classes": args.classes, "agnostic": args.agnostic, "multi_label": args.multi_label,
                        "max_det": args.max_det, "object_features": args.object_features,
                        "object_layers": args.object_layers, "object_dtype": args.object_dtype, "boxes": args.boxes,
                        "track": args.track},
            "class_names": list(info.class_names)}


def cmd_stream(args: argparse.Namespace) -> int:
    _check_numbers(args)
    layers = _layers(args)
    detect, objects = _objects(args)
    try:  # before opening anything: the codec's package is missing here
        stream_compression(args.compression)
    except ImportError as err:
        raise RuntimeError(f"--compression {args.compression}: {err}") from None
    boxes = read_boxes(args.boxes) if args.boxes else None
    if args.show and (problem := display_problem()):
        raise RuntimeError(problem)
    source = open_source(args.source, max_frames=args.max_frames, give_up_after=args.give_up_after,
                         timeout=args.source_timeout)
    with source, _client(args) as client:
        info = _model_info(client, args)
        known = f"{source.frame_count} frames" if source.frame_count is not None else "length unknown"
        rate = f"{source.fps:g} fps, " if source.fps else ""
        print(f"streaming {source.description} ({rate}{known}) to {args.server}: {info.model_name} on {info.device}, "
              f"layers {','.join(layers) or 'server default'}, "
              + ("raw frames through shared memory" if args.shm else args.encoding)
              + (", realtime" if args.realtime else ""), file=sys.stderr)
        if info.random_weights:
            print("WARNING: RANDOM WEIGHTS - features are for testing only", file=sys.stderr)
        return _run_stream(args, client, source, layers, info, detect, objects, boxes)


def _run_stream(args: argparse.Namespace, client: FeatureClient, source: Any, layers: list[str],
                info: ModelInfo, detect: DetectOptions | None = None, objects: ObjectFeatureOptions | None = None,
                boxes: dict | None = None) -> int:
    with ExitStack() as outputs:
        writer = sink = window = None
        if args.save:
            writer = outputs.enter_context(FeatureWriter(args.save, _save_info(args, info, source.description, layers)))
        if args.viz:
            sink = VideoSink(args.viz, fps=source.fps or 25.0)
            outputs.callback(sink.close)
        if args.show:
            window = Window(f"yolostream {args.source}")
            outputs.callback(window.close)
        viz_layer = args.viz_layer or (layers[0] if layers else None)
        stats = StreamStats(total=source.frame_count)
        status = StatusLine(enabled=not args.quiet)
        interrupted = False
        try:
            frames = _with_boxes(source, boxes) if boxes is not None else source
            with client.stream(frames, layers=layers or None, dtype=args.dtype, pooling=args.pool,
                               letterbox=args.letterbox, imgsz=args.imgsz, realtime=args.realtime,
                               max_in_flight=args.max_in_flight, encoding=args.encoding, quality=args.quality,
                               keep_images=bool(sink or window), detect=detect, objects=objects,
                               compression=args.compression, track=args.track,
                               shared_memory=args.shm) as results:
                for result in results:
                    stats.update(result)
                    if writer is not None:
                        label = source.label(result.frame_id)
                        writer.append(result, **({"file": label} if label else {}))
                    if sink is not None or window is not None:
                        if viz_layer is None and result.ok:
                            viz_layer = next(iter(result.features))
                        frame = render(result, viz_layer or "", result.image)
                        if sink is not None:
                            sink.write(frame)
                        if window is not None and not window.show(frame):
                            break
                    status.update(stats.status_line)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            status.finish(stats.status_line)
            outputs.close()  # finalise the save and the video before saying they are there
            print(stats.summary())
            if getattr(source, "reconnects", 0) or getattr(source, "gap_s", 0.0):
                print(f"source   {source.reconnects} reconnect(s), {source.gap_s:.1f} s without frames")
            if writer is not None:
                print(f"saved    {writer.rows} feature row(s) of {writer.frames} frame(s) to {args.save} "
                      "(read with yolostream.client.load_features)")
            if sink is not None:
                print(f"heatmap  {sink.frames} frame(s) of layer {viz_layer} to {args.viz}")
            sys.stdout.flush()
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FRAME_ERRORS if stats.errors else 0
