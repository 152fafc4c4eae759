"""The one settings schema: every knob of ``yolostream serve``, its flag, YAML key, default and help.

``ServerSettings`` *is* the schema: each field's metadata says its kind, group and help, and ``serve``'s flags,
the ``--config`` YAML keys (dashes or underscores), the defaults and the values ``GetModelInfo`` reports all come
from it. Values come from three places, later ones winning: the defaults, the YAML file, and the flags given on
the command line; the bearer token may also come from ``$YOLOSTREAM_TOKEN``, which beats the file so that secrets
need not be written into it. A default of None means "decided by the device" (batching, front-end count).

Torch-free and grpc-free: the CLI imports it to build its parser, and front-end processes receive it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from yolostream.v1 import vocab

from .errors import UserError, quote

TOKEN_ENV = "YOLOSTREAM_TOKEN"

MIB = 1024 * 1024
#: Most front-end processes one server may run.
MAX_FRONTENDS = 64

GROUPS = {
    "model": "model (default: built-in yolov5n with random weights)",
    "network": "network",
    "processes": "processes and shared memory",
    "batching": "batching and flow control",
    "limits": "frame and message limits",
    "security": "security",
    "process": "shutdown",
}


def _setting(default: Any, kind: str, group: str, help: str, *, choices: tuple[str, ...] | None = None,
             flag: str | None = None, metavar: str | None = None, low: float | None = None) -> Any:
    """A schema field: ``kind`` is str, int, float, bool or layers; ``low`` is the smallest valid value."""
    return field(default=default, metadata={"kind": kind, "group": group, "help": help, "choices": choices,
                                            "flag": flag, "metavar": metavar, "low": low})


@dataclass(frozen=True)
class ServerSettings:
    """Every knob of a server. Build one from flags and YAML with ``resolve_settings``, or directly in code."""

    weights: str | None = _setting(
        None, "str", "model", "official YOLOv5 .pt (path, or a release name like yolov5s.pt to download), or a plain "
        "state_dict file together with --cfg (default: the built-in yolov5n with RANDOM weights)", metavar="W.pt")
    cfg: str | None = _setting(None, "str", "model", "yolov5-format YAML, or a built-in name (yolov5n…x, yolov5n6…x6)",
                               metavar="C.yaml")
    device: str = _setting("auto", "str", "model", "auto | cpu | cuda[:N] (default auto: CUDA when present)")
    half: bool = _setting(False, "bool", "model", "float16 model (CUDA only)")
    backend: str = _setting("auto", "str", "model", "what runs the model: torch, onnxruntime (the same truncated "
                            "graph, exported once per layer set; needs the onnx extra) or auto (onnxruntime on CPU "
                            "when installed, else torch) (default auto)", choices=vocab.BACKENDS)
    fuse: bool = _setting(True, "bool", "model", "keep BatchNorm unfused (for comparisons)", flag="--no-fuse")
    imgsz: int = _setting(640, "int", "model", "default model input size, rounded up to the stride (default 640)",
                          low=32)
    letterbox: str = _setting("auto", "str", "model", "default letterbox policy: auto (minimal stride-multiple "
                              "rectangle) or square (default auto)", choices=tuple(vocab.LETTERBOX_POLICIES))
    layers: tuple[str, ...] = _setting(("backbone",), "layers", "model", "comma list of the layers a request gets "
                                       "when it names none (default backbone)", metavar="L1,L2")
    host: str = _setting("127.0.0.1", "str", "network", "address to listen on (default 127.0.0.1; 0.0.0.0 for every "
                         "interface)")
    port: int = _setting(50051, "int", "network", "port to listen on; 0 picks a free one, printed in the start-up "
                         "line (default 50051)", low=0)
    uds: str | None = _setting(None, "str", "network", "also listen on this Unix domain socket path (clients on the "
                               "same host use the target unix:PATH); served by front-end 0", metavar="PATH")
    metrics_port: int | None = _setting(None, "int", "network", "serve Prometheus metrics at http://HOST:PORT/metrics "
                                        "(0 picks a free port, printed in the start-up line; default off)",
                                        metavar="PORT", low=0)
    frontends: int | None = _setting(None, "int", "processes", "gRPC front-end processes sharing the port (decode, "
                                     "letterbox, replies); default 1 on CPU, 2/5 of the cores the device leaves (1..8) on "
                                     "CUDA; at most 64",
                                     metavar="N", low=1)
    shm_mb: int = _setting(256, "int", "processes", "shared memory per front-end for frames and features in flight, "
                           "in MiB; a frame whose input plus reply exceeds it fails (default 256)", metavar="MIB",
                           low=8)
    allow_client_shm: bool = _setting(False, "bool", "processes", "let clients on this host pass frames and features "
                                      "through shared memory they create (a sealed memfd passed over a Unix socket, "
                                      "mapped for one stream); off by default: such clients then use gRPC only")
    pinned_mb: int = _setting(1024, "int", "processes", "host memory the CUDA path may pin for uploads and "
                              "downloads, in MiB, counted as the allocator rounds blocks (powers of two); a block "
                              "over half of it uses pageable memory, correct but slower (default 1024)",
                              metavar="MIB", low=1)
    max_batch: int | None = _setting(None, "int", "batching", "most frames in one forward (default 32 on CUDA, 8 on "
                                     "CPU)", metavar="N", low=1)
    max_delay_ms: float | None = _setting(None, "float", "batching", "how long a batch may wait for more frames "
                                          "(default 2 on CUDA, 0 on CPU)", metavar="X", low=0)
    queue_capacity: int | None = _setting(None, "int", "batching", "frames a front-end may have waiting for the "
                                          "device (default: device-dependent, at least 4x max-batch)", metavar="N",
                                          low=1)
    max_in_flight: int = _setting(8, "int", "batching", "frames a stream may have inside the server when its config "
                                  "asks for no limit (default 8)", metavar="N", low=1)
    max_in_flight_limit: int = _setting(64, "int", "batching", "largest max_in_flight a stream may ask for (default "
                                        "64)", metavar="N", low=1)
    workers: int | None = _setting(None, "int", "batching", "device workers running batches concurrently (default 1 "
                                   "on CUDA, 2 on CPU, each with cores/workers torch threads)", metavar="N", low=1)
    decode_threads: int | None = _setting(None, "int", "batching", "threads per front-end decoding JPEG/PNG frames "
                                          "(default 4 on CPU; on CUDA the cores the device process leaves, shared "
                                          "over the front-ends, 2..16)", metavar="N", low=1)
    max_pixels: int = _setting(4096 * 4096, "int", "limits", "largest frame, in pixels, before decoding (default "
                               "4096x4096)", metavar="N", low=1)
    max_frame_bytes: int = _setting(64 * MIB, "int", "limits", "largest encoded or raw frame, in bytes (default "
                                    "64 MiB)", metavar="N", low=1)
    max_boxes: int = _setting(1024, "int", "limits", "most boxes a client may attach to one frame (default 1024)",
                              metavar="N", low=1)
    max_message_bytes: int = _setting(128 * MIB, "int", "limits", "largest gRPC message sent or received, in bytes "
                                      "(default 128 MiB)", metavar="N", low=1024)
    tls_cert: str | None = _setting(None, "str", "security", "PEM certificate chain; serve TLS (needs --tls-key)",
                                    metavar="CERT.pem")
    tls_key: str | None = _setting(None, "str", "security", "PEM private key (unencrypted) for --tls-cert",
                                   metavar="KEY.pem")
    token: str | None = _setting(None, "str", "security", f"require 'authorization: Bearer TOKEN' on every call "
                                 f"(prefer ${TOKEN_ENV}: a flag is visible in the process list)")
    max_connection_age: float | None = _setting(
        None, "float", "network", "close each client connection after about S seconds (GOAWAY; its streams "
        "resume on a new connection), so long-lived clients re-resolve DNS and find new replicas (default off)",
        metavar="S", low=0.001)
    max_connection_age_grace: float | None = _setting(
        None, "float", "network", "seconds a connection's streams may still run after its max age (default: "
        "unlimited)", metavar="S", low=0)
    drain_delay: float = _setting(1.0, "float", "process", "seconds between turning health NOT_SERVING and "
                                  "refusing frames on SIGTERM, so health-checking clients move first (default 1)",
                                  metavar="S", low=0)
    grace: float = _setting(30.0, "float", "process", "seconds SIGTERM/SIGINT wait for accepted frames before "
                            "cancelling what is left, after the drain delay (default 30)", metavar="S", low=0)

    def replace(self, **changes: Any) -> "ServerSettings":
        return dataclasses.replace(self, **changes)

    def check(self) -> "ServerSettings":
        """Range and consistency checks; a UserError names the flag and the valid range."""
        for s in SETTINGS:
            value = getattr(self, s.key)
            if s.low is not None and value is not None and value < s.low:
                if s.key.endswith("port"):
                    raise UserError(f"{s.option} {value} is out of range: choose 0..65535 (0 picks a free port)")
                raise UserError(f"{s.option} must be at least {s.low:g}, got {value}")
        for key in ("port", "metrics_port"):
            value = getattr(self, key)
            if value is not None and value > 65535:
                raise UserError(f"{BY_KEY[key].option} {value} is out of range: choose 0..65535 (0 picks a free port)")
        if self.frontends is not None and self.frontends > MAX_FRONTENDS:
            raise UserError(f"--frontends {self.frontends} is over {MAX_FRONTENDS}: each is a process with its own "
                            f"--shm-mb of shared memory")
        if self.max_in_flight > self.max_in_flight_limit:
            raise UserError(f"--max-in-flight {self.max_in_flight} is over --max-in-flight-limit "
                            f"{self.max_in_flight_limit}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UserError("TLS needs both --tls-cert and --tls-key")
        return self

    @property
    def shm_bytes(self) -> int:
        return self.shm_mb * MIB

    @property
    def pinned_bytes(self) -> int:
        return self.pinned_mb * MIB


@dataclass(frozen=True)
class Setting:
    """One knob, as the CLI and the YAML reader see it (derived from a ``ServerSettings`` field)."""

    key: str
    kind: str
    default: Any
    help: str
    group: str
    choices: tuple[str, ...] | None
    flag: str | None
    metavar: str | None
    low: float | None

    @property
    def option(self) -> str:
        return self.flag or "--" + self.key.replace("_", "-")


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, f.metadata["kind"], f.default, f.metadata["help"], f.metadata["group"], f.metadata["choices"],
            f.metadata["flag"], f.metadata["metavar"], f.metadata["low"])
    for f in fields(ServerSettings)
)
BY_KEY = {s.key: s for s in SETTINGS}


def register_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting. Every argparse default is None, so only flags really given override the file."""
    parser.add_argument("--config", metavar="server.yaml",
                        help="YAML file with the same keys as the flags (dashes or underscores); flags override it")
    groups = {name: parser.add_argument_group(title) for name, title in GROUPS.items()}
    types = {"int": int, "float": float, "str": str, "layers": str}
    for s in SETTINGS:
        group = groups[s.group]
        if s.kind == "bool":
            action = "store_false" if s.default else "store_true"
            group.add_argument(s.option, dest=s.key, action=action, default=None, help=s.help)
            continue
        group.add_argument(s.option, dest=s.key, type=types[s.kind], default=None, choices=s.choices,
                           metavar=s.metavar, help=s.help)


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
    ServerSettings(**values).check()
    return values


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a server YAML file into setting values; every error is one line naming the file and the problem."""
    import yaml

    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {where}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not a UTF-8 text file") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: not valid YAML{at}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in BY_KEY:
            raise UserError(f"{where}: unknown key {quote(raw_key)}; valid keys: {', '.join(BY_KEY)}")
        if key in values:
            raise UserError(f"{where}: key {key!r} is given twice (dashes and underscores are the same key)")
        values[key] = None if value is None else _coerce(BY_KEY[key], value, f"{where}: {raw_key}")
    return values


def _coerce(s: Setting, value: Any, where: str) -> Any:
    """Check a value from the file (or a flag) against the setting's kind; errors say what was expected."""
    if s.kind == "layers":
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else None
        if items is None or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in items):
            raise UserError(f"{where}: expected layer names or indices (a list, or a comma-separated string)")
        layers = tuple(str(v).strip() for v in items if str(v).strip())
        if not layers:
            raise UserError(f"{where}: names no layers")
        return layers
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[s.kind]
    if not ok:
        expected = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[s.kind]
        got = f"a {type(value).__name__}" if s.key == "token" else quote(value)  # never echo a secret
        raise UserError(f"{where}: expected {expected}, got {got}")
    if s.choices and value not in s.choices:
        raise UserError(f"{where}: invalid choice {quote(value)}: choose {', '.join(s.choices)}")
    return float(value) if s.kind == "float" else value
