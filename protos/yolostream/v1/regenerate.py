"""Regenerate the committed Python stubs from feature_service.proto (``python -m yolostream.v1.regenerate``).

The stubs are committed so that installs need no protoc; ``--check`` regenerates into a temporary
directory and fails when the committed files differ, which keeps them from going stale.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from pathlib import Path

#: The ``protos/`` directory: the import root of the .proto files and of the generated modules.
PROTO_ROOT = Path(__file__).resolve().parents[2]

#: .proto files to compile, relative to PROTO_ROOT.
PROTO_FILES = ("yolostream/v1/feature_service.proto",)


def generated_files() -> list[str]:
    """Paths (relative to PROTO_ROOT) of every file protoc writes for PROTO_FILES."""
    out = []
    for proto in PROTO_FILES:
        stem = proto[: -len(".proto")]
        out += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"]
    return out


def generate(out_dir: Path) -> None:
    """Run grpc_tools' bundled protoc on PROTO_FILES, writing stubs under ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # grpcio-tools is a dev dependency only
        raise SystemExit("grpcio-tools is needed to regenerate the stubs: pip install grpcio-tools") from exc
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def stale_files() -> list[str]:
    """Generated files whose committed copy differs from a fresh generation (missing ones included)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return [
            rel
            for rel in generated_files()
            if not (PROTO_ROOT / rel).is_file()
            or (PROTO_ROOT / rel).read_bytes() != (Path(tmp) / rel).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolostream.v1.regenerate", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="only compare with a fresh generation; exit 1 if stale"
    )
    opts = parser.parse_args(argv)
    if opts.check:
        stale = stale_files()
        for rel in stale:
            print(f"stale: {PROTO_ROOT / rel}", file=sys.stderr)
        if stale:
            print("run `make protos` to regenerate", file=sys.stderr)
        return 1 if stale else 0
    generate(PROTO_ROOT)
    for rel in generated_files():
        print(f"wrote {PROTO_ROOT / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
