"""``yolostream serve``: settings, the cheap start-up checks, then the supervisor that runs the processes.

Settings come from the one schema in ``settings``. The cheap checks (config file, TLS files, port) run before any
process starts or the model is loaded, so a typo fails in milliseconds rather than after a large checkpoint has been
read; they also keep grpc's own multi-line C-core error logs off stderr. Start-up problems are ``UserError`` (or
OSError) with one line of text, which ``cli.main`` prints before exiting 2. This module must import quickly (``cli``
imports it to build its parser), so torch and grpc are never imported here.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import ssl
from pathlib import Path

from ..common.errors import UserError
from ..common.settings import TOKEN_ENV, ServerSettings, register_flags, resolve_settings

__all__ = ["TOKEN_ENV", "cmd_serve", "register_serve", "resolve_settings"]


def register_serve(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags (one per setting of the schema)."""
    parser.description = ("Serve YOLOv5 features over gRPC. Settings come from the built-in defaults, then "
                          "--config, then the flags given.")
    register_flags(parser)
    parser.set_defaults(func=cmd_serve)


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
            raise UserError(f"{option} {path} is not a PEM file with a {marker.decode().strip('-')} block")

    def no_passphrase() -> str:
        raise UserError(f"--tls-key {key} is encrypted: grpc needs an unencrypted PEM key")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as err:
        raise UserError(f"--tls-cert {cert} and --tls-key {key} are not a usable certificate and private key "
                         f"pair ({err.reason or err})") from err


def check_uds(path: str | None) -> None:
    """The Unix socket's folder must exist; grpc replaces a stale socket file but not a regular file."""
    if not path:
        return
    target = Path(path)
    if not target.parent.is_dir():
        raise UserError(f"--uds {path}: folder {target.parent} does not exist")
    if target.exists() and not target.is_socket():
        raise UserError(f"--uds {path}: exists and is not a socket")


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the settings, then run the device and front-end processes until SIGTERM/SIGINT; the exit code."""
    settings = ServerSettings(**resolve_settings(args))
    for module in ("torch", "yaml"):  # the device process needs them: say so now, not from a child process
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
    check_tls(settings.tls_cert, settings.tls_key)
    check_port(settings.host, settings.port)
    if settings.metrics_port:
        check_port(settings.host, settings.metrics_port)
    check_uds(settings.uds)

    from .supervisor import Supervisor

    return Supervisor(settings.replace(host=grpc_host(settings.host))).run()
