"""``yolostream serve``: the process around the gRPC server — flags and YAML config, start-up checks, signals.

Settings come from three places, later ones winning: built-in defaults, the ``--config`` YAML file (same keys as
the flags, with dashes or underscores), and the flags given on the command line. The bearer token can also come
from ``$YOLOSTREAM_TOKEN``, which beats the file, so that secrets need not be written into it.

Start-up problems are raised as ValueError or OSError with one line of text, which ``cli.main`` prints before
exiting 2. The cheap checks (config file, TLS files, port) run before the model is loaded, so a typo fails in
milliseconds rather than after a large checkpoint has been read; they also keep grpc's own multi-line C-core
error logs off stderr. This module must import quickly (``cli`` imports it to build its parser), so torch and
grpc are imported only inside ``cmd_serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOKEN_ENV = "YOLOSTREAM_TOKEN"


@dataclass(frozen=True)
class Setting:
    """One knob: its YAML key (dashes become underscores), flag, value kind and built-in default.

    A default of None means "the server decides" (device-dependent batching, the built-in frame limits).
    """

    key: str
    kind: str  # "str" | "int" | "float" | "bool" | "layers"
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None = None
    flag: str | None = None
    metavar: str | None = None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("weights", "str", None, "official YOLOv5 .pt (path, or a release name like yolov5s.pt to download), or a "
            "plain state_dict file together with --cfg (default: the built-in yolov5n with RANDOM weights)", "model",
            metavar="W.pt"),
    Setting("cfg", "str", None, "yolov5-format YAML, or a built-in name (yolov5n…x, yolov5n6…x6)", "model",
            metavar="C.yaml"),
    Setting("device", "str", "auto", "auto | cpu | cuda[:N] (default auto: CUDA when present)", "model"),
    Setting("half", "bool", False, "float16 model (CUDA only)", "model"),
    Setting("fuse", "bool", True, "keep BatchNorm unfused (for comparisons)", "model", flag="--no-fuse"),
    Setting("imgsz", "int", 640, "default model input size, rounded up to the stride (default 640)", "model"),
    Setting("letterbox", "str", "auto", "default letterbox policy: auto (minimal stride-multiple rectangle) or "
            "square (default auto)", "model", choices=("auto", "square")),
    Setting("layers", "layers", ("backbone",), "comma list of the layers a request gets when it names none "
            "(default backbone)", "model", metavar="L1,L2"),
    Setting("host", "str", "127.0.0.1", "address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)",
            "network"),
    Setting("port", "int", 50051, "port to listen on; 0 picks a free one, printed in the start-up line "
            "(default 50051)", "network"),
    Setting("metrics_port", "int", None, "serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free "
            "port, printed in the start-up line; default off)", "network", metavar="PORT"),
    Setting("max_batch", "int", None, "most frames in one forward (default 32 on CUDA, 8 on CPU)", "batching",
            metavar="N"),
    Setting("max_delay_ms", "float", None, "how long a batch may wait for more frames (default 2 on CUDA, 0 on CPU)",
            "batching", metavar="X"),
    Setting("queue_capacity", "int", None, "frames waiting for the device, over all streams (default: "
            "device-dependent, at least 4x max-batch)", "batching", metavar="N"),
    Setting("max_in_flight", "int", 8, "frames a stream may have inside the server when its config asks for no "
            "limit (default 8)", "batching", metavar="N"),
    Setting("max_in_flight_limit", "int", 64, "largest max_in_flight a stream may ask for (default 64)", "batching",
            metavar="N"),
    Setting("workers", "int", None, "device workers running batches concurrently (default 1 on CUDA, 2 on CPU, "
            "each with cores/workers torch threads)", "batching", metavar="N"),
    Setting("decode_threads", "int", 4, "threads decoding JPEG/PNG frames (default 4)", "batching", metavar="N"),
    Setting("max_pixels", "int", None, "largest frame, in pixels, before decoding (default 4096x4096)", "limits",
            metavar="N"),
    Setting("max_frame_bytes", "int", None, "largest encoded or raw frame, in bytes (default 64 MiB)", "limits",
            metavar="N"),
    Setting("max_message_bytes", "int", None, "largest gRPC message sent or received, in bytes (default 128 MiB)",
            "limits", metavar="N"),
    Setting("tls_cert", "str", None, "PEM certificate chain; serve TLS (needs --tls-key)", "security",
            metavar="CERT.pem"),
    Setting("tls_key", "str", None, "PEM private key (unencrypted) for --tls-cert", "security", metavar="KEY.pem"),
    Setting("token", "str", None, f"require 'authorization: Bearer TOKEN' on every call (prefer ${TOKEN_ENV}: "
            "a flag is visible in the process list)", "security"),
    Setting("grace", "float", 30.0, "seconds SIGTERM/SIGINT wait for accepted frames before cancelling what is left "
            "(default 30)", "process", metavar="S"),
)
BY_KEY = {s.key: s for s in SETTINGS}

_GROUPS = {
    "model": "model (default: built-in yolov5n with random weights)",
    "network": "network",
    "batching": "batching and flow control",
    "limits": "frame and message limits",
    "security": "security",
    "process": "process",
}

RANDOM_WEIGHTS_BANNER = """\
################################################################################
##  WARNING: RANDOM WEIGHTS
##  No --weights given: serving {name} with seeded random weights.
##  The features it returns are meaningless; use them for testing only.
##  Serve a trained model with --weights yolov5n.pt (or a path to a .pt file).
################################################################################"""


def register_serve(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags; every default is None so that only flags really given override the YAML file."""
    parser.description = ("Serve YOLOv5 features over gRPC. Settings come from the built-in defaults, then "
                          "--config, then the flags given.")
    parser.add_argument("--config", metavar="server.yaml",
                        help="YAML file with the same keys as the flags (dashes or underscores); flags override it")
    groups = {name: parser.add_argument_group(title) for name, title in _GROUPS.items()}
    for s in SETTINGS:
        group = groups[s.group]
        if s.kind == "bool":
            action = "store_false" if s.default else "store_true"
            group.add_argument(s.option, dest=s.key, action=action, default=None, help=s.help)
            continue
        types = {"int": int, "float": float, "str": str, "layers": str}
        group.add_argument(s.option, dest=s.key, type=types[s.kind], default=None, choices=s.choices,
                           metavar=s.metavar, help=s.help)
    parser.set_defaults(func=cmd_serve)


def resolve_settings(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``$YOLOSTREAM_TOKEN``, then the flags given; checked for range errors."""
    environ = os.environ if environ is None else environ
    values = {s.key: s.default for s in SETTINGS}
    if getattr(args, "config", None):
        values.update({k: v for k, v in load_config_file(args.config).items() if v is not None})
    if environ.get(TOKEN_ENV):
        values["token"] = environ[TOKEN_ENV]
    for s in SETTINGS:
        given = getattr(args, s.key, None)
        if given is not None:
            values[s.key] = _coerce(s, given, s.option)
    _check_ranges(values)
    return values


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a server YAML file into setting values; every error is one line naming the file and the problem."""
    import yaml

    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise OSError(f"cannot read {where}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not a UTF-8 text file") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML{at}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in BY_KEY:
            raise ValueError(f"{where}: unknown key {str(raw_key)!r}; valid keys: {', '.join(BY_KEY)}")
        if key in values:
            raise ValueError(f"{where}: key {key!r} is given twice (dashes and underscores are the same key)")
        values[key] = None if value is None else _coerce(BY_KEY[key], value, f"{where}: {raw_key}")
    return values


def _coerce(s: Setting, value: Any, where: str) -> Any:
    """Check a value from the file (or a flag) against the setting's kind; errors say what was expected."""
    if s.kind == "layers":
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
        if items is None or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{where}: expected layer names or indices (a list, or a comma-separated string)")
        layers = tuple(str(v).strip() for v in items if str(v).strip())
        if not layers:
            raise ValueError(f"{where}: names no layers")
        return layers
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[s.kind]
    if not ok:
        expected = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[s.kind]
        raise ValueError(f"{where}: expected {expected}, got {value!r}")
    if s.choices and value not in s.choices:
        raise ValueError(f"{where}: invalid choice {value!r}: choose {', '.join(s.choices)}")
    return float(value) if s.kind == "float" else value


def _check_ranges(values: dict[str, Any]) -> None:
    for key in ("port", "metrics_port"):
        if values[key] is not None and not 0 <= values[key] <= 65535:
            raise ValueError(f"{BY_KEY[key].option} {values[key]} is out of range: choose 0..65535 (0 picks a free port)")
    for key, low in (("imgsz", 32), ("max_batch", 1), ("queue_capacity", 1), ("max_in_flight", 1),
                     ("max_in_flight_limit", 1), ("workers", 1), ("decode_threads", 1), ("max_pixels", 1), ("max_frame_bytes", 1),
                     ("max_message_bytes", 1024)):
        if values[key] is not None and values[key] < low:
            raise ValueError(f"{BY_KEY[key].option} must be at least {low}, got {values[key]}")
    for key in ("max_delay_ms", "grace"):
        if values[key] is not None and values[key] < 0:
            raise ValueError(f"{BY_KEY[key].option} must be non-negative, got {values[key]}")
    if values["max_in_flight"] > values["max_in_flight_limit"]:
        raise ValueError(f"--max-in-flight {values['max_in_flight']} is over --max-in-flight-limit "
                         f"{values['max_in_flight_limit']}")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ValueError("TLS needs both --tls-cert and --tls-key")


def grpc_host(host: str) -> str:
    """IPv6 literals need brackets in a gRPC address (``[::1]:50051``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def check_port(host: str, port: int) -> None:
    """Fail fast, before loading a model, when ``host:port`` cannot be listened on (grpc re-checks when binding)."""
    if port == 0:
        return
    bare = host.strip("[]")
    address = f"{grpc_host(host)}:{port}"
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(f"cannot listen on {address}: unknown host ({err.strerror})") from err
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
            try:
                sock.bind(sockaddr)
            except OSError as err:
                raise OSError(f"cannot listen on {address}: address in use or not available "
                              f"({err.strerror or err})") from err


def check_tls(cert: str | None, key: str | None) -> None:
    """Both files readable, PEM, and a matching pair; grpc would otherwise only log C-core errors."""
    if not cert and not key:
        return
    for option, path, marker in (("--tls-cert", cert, b"-----BEGIN CERTIFICATE-----"),
                                 ("--tls-key", key, b"PRIVATE KEY-----")):
        try:
            pem = Path(path).read_bytes()
        except OSError as err:
            raise OSError(f"cannot read {option} {path}: {err.strerror or err}") from err
        if marker not in pem:
            raise ValueError(f"{option} {path} is not a PEM file with a {marker.decode().strip('-')} block")

    def no_passphrase() -> str:
        raise ValueError(f"--tls-key {key} is encrypted: grpc needs an unencrypted PEM key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as err:
        raise ValueError(f"--tls-cert {cert} and --tls-key {key} are not a usable certificate and private key "
                         f"pair ({err.reason or err})") from err


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT, drain, and return 0."""
    values = resolve_settings(args)
    check_tls(values["tls_cert"], values["tls_key"])
    check_port(values["host"], values["port"])
    if values["metrics_port"]:
        check_port(values["host"], values["metrics_port"])

    from .engine import Engine
    from .grpc_server import ServerSettings
    from .model.loader import load_model

    loaded = load_model(values["weights"], values["cfg"])
    engine = Engine(loaded, device=values["device"], half=values["half"], fuse=values["fuse"],
                    imgsz=values["imgsz"], letterbox=values["letterbox"])
    try:
        engine.resolve(values["layers"])
    except ValueError as err:
        raise ValueError(f"--layers: {err}") from err
    if engine.random_weights:
        print(RANDOM_WEIGHTS_BANNER.format(name=engine.name), file=sys.stderr, flush=True)

    passed = {
        "host": grpc_host(values["host"]), "port": values["port"], "default_layers": values["layers"],
        "grace_s": values["grace"],
        **{key: values[key] for key in ("max_batch", "max_delay_ms", "queue_capacity", "workers", "max_in_flight",
                                        "max_in_flight_limit", "decode_threads", "max_pixels", "max_frame_bytes",
                                        "max_message_bytes", "tls_cert", "tls_key", "token", "metrics_port")},
    }
    settings = ServerSettings(**{k: v for k, v in passed.items() if v is not None})
    return asyncio.run(_serve(engine, settings))


async def _serve(engine: Any, settings: Any) -> int:
    """Start, announce on stdout, wait for a signal, drain. A second signal cancels the streams still open."""
    from .grpc_server import FeatureServer

    server = FeatureServer(engine, settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        signals.append(signum)
        if len(signals) == 1:
            stop.set()
        elif server.server is not None:
            print("yolostream: second signal: cancelling the streams still open", file=sys.stderr, flush=True)
            loop.create_task(server.server.stop(0))

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
        except NotImplementedError:  # Windows: no loop signal handlers
            signal.signal(signum, lambda n, _frame: loop.call_soon_threadsafe(on_signal, n))
    try:
        port = await server.start()
    except BaseException:
        await server.stop(0)
        raise
    print(f"yolostream serving {engine.name} on {settings.host}:{port} "
          f"({_describe(engine, settings, server.metrics_port)})", flush=True)
    await stop.wait()
    name = signal.Signals(signals[0]).name
    print(f"yolostream: {name}: draining (health NOT_SERVING; answering accepted frames, up to {settings.grace_s:g} s)",
          file=sys.stderr, flush=True)
    await server.stop(settings.grace_s)
    print("yolostream: stopped", file=sys.stderr, flush=True)
    return 0


def _describe(engine: Any, settings: Any, metrics_port: int | None) -> str:
    parts = [str(engine.device), str(engine.dtype).removeprefix("torch."),
             "RANDOM WEIGHTS" if engine.random_weights else f"weights {engine.loaded.source}"]
    if settings.tls_cert:
        parts.append("TLS")
    if settings.token:
        parts.append("bearer token")
    if metrics_port is not None:
        parts.append(f"metrics on :{metrics_port}/metrics")
    return ", ".join(parts)
