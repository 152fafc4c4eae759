"""The ``yolostream`` command. Subcommands import torch lazily, so ``yolostream --help`` stays instant.

Every expected failure (missing weights, bad YAML, unknown layer, unreadable input, a checkpoint the safe loader
refuses) exits 2 with one clear line, not a traceback; ``--verbose`` shows the traceback for bug reports. Such
failures are raised as :class:`~yolostream.server.common.errors.UserError` (the one base for them) or, in older code and
in the client, as ValueError, OSError or RuntimeError; library messages that span lines are flattened to one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from yolostream.v1 import vocab

from .common.errors import UserError, one_line, quote
from .common.preprocess import MAX_IMGSZ

EXIT_USAGE = 2
#: Most values (batch × 3 × H × W) of an export's example input: 1 GiB of float32, run several times by the check.
MAX_EXPORT_INPUT_VALUES = 1 << 28
#: Top-level modules of the ``server`` extra: a client-only install lacks them.
SERVER_MODULES = {"torch", "yaml", "tqdm", "grpc_health", "grpc_reflection", "prometheus_client"}


def _model_args(p: argparse.ArgumentParser, *, device: bool = True, rect: bool = False) -> None:
    src = p.add_argument_group("model (default: built-in yolov5n with random weights)")
    src.add_argument("--weights", help="official YOLOv5 .pt (local path, or a release name like yolov5s.pt to download), "
                                       "or a plain state_dict file together with --cfg")
    src.add_argument("--cfg", help="yolov5-format YAML, or a built-in name (yolov5n…x, yolov5n6…x6)")
    if rect:
        src.add_argument("--imgsz", type=input_size, default=640,
                         help="model input size N or H,W, rounded up to the stride (default 640)")
    else:
        src.add_argument("--imgsz", type=int, default=640,
                         help="model input size, rounded up to the stride (default 640)")
    if device:
        src.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: CUDA when present)")
        src.add_argument("--half", action="store_true", help="float16 model (CUDA only)")
    src.add_argument("--no-fuse", dest="fuse", action="store_false", help="keep BatchNorm unfused (for comparisons)")


def _load_engine(args: argparse.Namespace, device: str | None = None, imgsz: int | None = None):
    from .device.engine import DeviceRunner
    from .model.loader import load_model

    loaded = load_model(args.weights, args.cfg)
    return DeviceRunner(
        loaded,
        device=device or getattr(args, "device", "cpu"),
        half=getattr(args, "half", False),
        fuse=args.fuse,
        imgsz=imgsz or args.imgsz,
        letterbox=getattr(args, "letterbox", None) or "auto",
        backend=getattr(args, "backend", "torch"),
    )


def cmd_layers(args: argparse.Namespace) -> int:
    engine = _load_engine(args, device="cpu")
    rows = engine.catalogue()
    h, w = engine.input_hw()
    if args.json:
        doc = {
            "model": engine.name,
            "source": engine.loaded.source,
            "random_weights": engine.random_weights,
            "imgsz": args.imgsz,
            "input_hw": [h, w],
            "stride": engine.stride,
            "layers": [r.as_dict() for r in rows],
        }
        print(json.dumps(doc, indent=2))
        return 0
    print(f"model {engine.name}  source {engine.loaded.source}  input {h}x{w}  stride {engine.stride}")
    if engine.random_weights:
        print("WARNING: RANDOM WEIGHTS - features are for testing only")
    print(format_catalogue([r.as_dict() for r in rows]))
    return 0


def format_catalogue(rows: Sequence[dict]) -> str:
    """A fixed-width table of catalogue rows (dicts as ``LayerInfo.as_dict`` gives them)."""
    header = ("idx", "from", "type", "params", "role", "out_ch", "stride", "shape (C,H,W)", "names")
    lines = [header]
    for r in rows:
        source = ",".join(str(j) for j in r["from"]) or "input"
        shape = "x".join(str(d) for d in r["shape"]) or "-"
        lines.append((str(r["index"]), source, r["type"], f"{r['params']:,}", r["role"], str(r["out_channels"]),
                      str(r["stride"]), shape, " ".join(r["aliases"])))
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(line)).rstrip() for line in lines)


def cmd_extract(args: argparse.Namespace) -> int:
    """The ``extract`` command: the library's ``FeatureExtractor`` on the chosen device, written by ``run_extract``."""
    import torch

    from .model.placement import check_half, resolve_device
    from .model.onnx_io import auto_backend, require
    from .offline.extract import onnxruntime_forward, run_extract
    from .offline.extractor import feature_extractor

    device = resolve_device(args.device)
    check_half(device, args.half)
    layers = [s for s in args.layers.split(",") if s.strip()]
    backend = auto_backend(device) if args.backend == "auto" else args.backend
    if backend == "onnxruntime":
        require("onnxruntime", "--backend onnxruntime")
    extractor = feature_extractor(args.weights, args.cfg, layers, fuse=args.fuse, imgsz=args.imgsz, device=device)
    if args.half:
        extractor.half()
    if device.type == "cuda" and backend == "torch":
        extractor.to(memory_format=torch.channels_last)
    forward = onnxruntime_forward(extractor, device) if backend == "onnxruntime" else None
    if extractor.random_weights:
        print("WARNING: RANDOM WEIGHTS - features are for testing only", file=sys.stderr)
    written = run_extract(extractor, args.inputs, Path(args.out), policy=args.letterbox, max_frames=args.max_frames,
                          batch=args.batch, forward=forward)
    print(f"wrote {len(written)} file(s) to {args.out}" + (" (RANDOM WEIGHTS)" if extractor.random_weights else ""))
    return 0


def input_size(text: str) -> int | tuple[int, int]:
    """``--imgsz`` of ``export``: ``N`` (a square) or ``H,W``."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected N or H,W (positive integers), got {quote(text)}")
    if max(values) > MAX_IMGSZ:
        raise argparse.ArgumentTypeError(f"{quote(text)} is over the largest input size, {MAX_IMGSZ} per side")
    return values[0] if len(values) == 1 else (values[0], values[1])


def cmd_export(args: argparse.Namespace) -> int:
    """The ``export`` command: the served truncated graph as an ONNX or TorchScript file, checked against the engine."""
    from .offline.export import ExportRequest, export_model
    from .common.preprocess import input_shape

    if args.dynamic != "shape" and args.letterbox == "auto":
        raise UserError("--letterbox auto gives inputs of varying shape, which needs --dynamic shape; a fixed-size "
                        "file takes the full input (--letterbox square)")
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    size = args.imgsz if isinstance(args.imgsz, tuple) else (args.imgsz, args.imgsz)
    if args.batch * size[0] * size[1] * 3 > MAX_EXPORT_INPUT_VALUES:
        raise UserError(f"--batch {args.batch} at {size[0]}x{size[1]} is an input of over {MAX_EXPORT_INPUT_VALUES:,} "
                        "values, which the parity check would run several times: export with --dynamic and a small "
                        "--batch (a dynamic batch runs at any size)")
    if Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a directory: give the path of the file to write")
    engine = _load_engine(args, device=args.device, imgsz=max(size))
    names = [s.strip() for s in args.layers.split(",") if s.strip()]
    try:
        layers = engine.resolve(names)
    except ValueError as err:
        hint = " (--detect adds Detect's decoded output)" if "Detect head" in str(err) else ""
        raise UserError(f"--layers: {err}{hint}") from err
    request = ExportRequest(
        layers=tuple(layers), detect=args.detect, fmt=args.format, input_hw=input_shape(size, engine.stride),
        batch=args.batch, dynamic=args.dynamic, letterbox=args.letterbox or ("auto" if args.dynamic == "shape"
                                                                            else "square"),
        imgsz=max(size), out=Path(args.out))
    if engine.random_weights:
        print("WARNING: RANDOM WEIGHTS - features are for testing only", file=sys.stderr)
    export_model(engine, request)
    outputs = [layer.name for layer in layers] + (["detect"] if args.detect else [])
    h, w = request.input_hw
    print(f"wrote {args.out} ({args.format}, {engine.name}, input images {'N' if args.dynamic else args.batch}x3x"
          f"{'H' if args.dynamic == 'shape' else h}x{'W' if args.dynamic == 'shape' else w} {engine.card().dtype}, outputs "
          f"{', '.join(outputs)})" + (" (RANDOM WEIGHTS)" if engine.random_weights else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yolostream", description="YOLOv5 feature server, client and tools.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("layers", help="print a model's layer catalogue")
    _model_args(p, device=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("extract", help="extract features offline (no server) into one .npz per image/frame")
    _model_args(p)
    p.add_argument("--letterbox", choices=("auto", "square"), default="auto",
                   help="auto: minimal stride-multiple rectangle (upstream detect.py); square: full imgsz square")
    p.add_argument("--layers", default="backbone", help="comma list of indices or names: all, backbone, C3..C6, P3..P6")
    p.add_argument("--max-frames", type=int, default=None, help="stop each video after N frames")
    p.add_argument("--batch", type=int, default=8, help="images or video frames per forward (default 8)")
    p.add_argument("--backend", choices=vocab.BACKENDS, default="auto",
                   help="what runs the model: torch, onnxruntime (needs the onnx extra) or auto (onnxruntime on CPU "
                        "when installed, else torch) (default auto)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_VIDEO", help="image files, image folders or video files")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("export", help="write the served truncated graph as an ONNX or TorchScript file")
    _model_args(p, rect=True)
    p.add_argument("--layers", default="backbone", help="comma list of the outputs, named as when serving: indices, "
                   "all, backbone, C3..C6, P3..P6 (default backbone)")
    p.add_argument("--detect", action="store_true", help="also run Detect and add its decoded output 'detect'")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format (default onnx)")
    p.add_argument("--dynamic", nargs="?", const="batch", choices=("batch", "shape"), default=None,
                   help="symbolic batch (--dynamic or --dynamic batch), or batch, height and width (--dynamic shape)")
    p.add_argument("--batch", type=int, default=1, help="batch size of a file without --dynamic (default 1)")
    p.add_argument("--letterbox", choices=("auto", "square"), default=None,
                   help="letterbox policy recorded for consumers (default: auto with --dynamic shape, else square)")
    p.add_argument("--out", required=True, help="the file to write")
    p.set_defaults(func=cmd_export)

    for name, register in _extra_commands():
        register(sub.add_parser(name, help=_EXTRA_HELP[name]))
    return parser


_EXTRA_HELP = {"serve": "run the gRPC feature server", "stream": "stream a video source to a server",
               "info": "print a server's model and layer catalogue"}


def _extra_commands() -> list[tuple[str, Callable[[argparse.ArgumentParser], None]]]:
    """Subcommands from the service and client packages, when they are installed."""
    import importlib
    import importlib.util

    found = []
    for name, module in (("serve", "yolostream.server.serve.command"), ("stream", "yolostream.client.cli"),
                         ("info", "yolostream.client.cli")):
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except ModuleNotFoundError:  # the parent package (e.g. the client) is not installed
            continue
        register = getattr(importlib.import_module(module), f"register_{name}", None)
        if register is not None:
            found.append((name, register))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in SERVER_MODULES or args.verbose:
            raise
        print(f"yolostream {args.command}: error: this command needs the server extra, which is not installed "
              f"(no module named {err.name!r}): pip install 'yolostream[server]'", file=sys.stderr)
        return EXIT_USAGE
    except (UserError, ValueError, OSError, RuntimeError, KeyError) as err:
        if args.verbose:
            raise
        print(f"yolostream {args.command}: error: {one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
