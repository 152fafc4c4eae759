"""The wire contract: committed stubs are fresh, and the proto follows the buf style rules we adopted."""

from __future__ import annotations

import importlib.resources
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from google.protobuf import descriptor_pb2

from yolostream.v1 import feature_service_pb2 as pb
from yolostream.v1 import regenerate

PROTO = regenerate.PROTO_ROOT / "yolostream" / "v1" / "feature_service.proto"


def _require_protoc():
    return pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) is not installed")


def test_committed_stubs_are_fresh():
    _require_protoc()
    stale = regenerate.stale_files()
    assert stale == [], f"stale generated stubs {stale}: run `make protos`"


def test_check_reports_a_stale_stub(tmp_path, monkeypatch, capsys):
    _require_protoc()
    root = tmp_path / "protos"
    shutil.copytree(regenerate.PROTO_ROOT / "yolostream", root / "yolostream")
    monkeypatch.setattr(regenerate, "PROTO_ROOT", root)
    assert regenerate.main(["--check"]) == 0
    victim = root / "yolostream" / "v1" / "feature_service_pb2.pyi"
    victim.write_bytes(victim.read_bytes() + b"\n")
    (root / "yolostream" / "v1" / "feature_service_pb2_grpc.py").unlink()
    assert regenerate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "feature_service_pb2.pyi" in err and "feature_service_pb2_grpc.py" in err
    assert "feature_service_pb2.py\n" not in err
    assert regenerate.main([]) == 0
    assert regenerate.stale_files() == []


def test_generated_imports_use_the_package_path():
    grpc_src = (regenerate.PROTO_ROOT / "yolostream" / "v1" / "feature_service_pb2_grpc.py").read_text()
    assert "from yolostream.v1 import feature_service_pb2 as" in grpc_src


def test_package_name():
    assert pb.DESCRIPTOR.package == "yolostream.v1"
    assert re.search(r"^package yolostream\.v1;$", PROTO.read_text(), re.MULTILINE)
    assert re.search(r'^syntax = "proto3";$', PROTO.read_text(), re.MULTILINE)


def _all_enums():
    def nested(msg):
        yield from msg.enum_types
        for sub in msg.nested_types:
            yield from nested(sub)

    yield from pb.DESCRIPTOR.enum_types_by_name.values()
    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        yield from nested(msg)


def _screaming_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_enums_have_unspecified_zero_and_prefixed_values():
    enums = list(_all_enums())
    assert {e.name for e in enums} >= {"Dtype", "Pooling", "LetterboxPolicy", "PixelFormat", "FrameStatus"}
    for enum in enums:
        prefix = _screaming_snake(enum.name) + "_"
        zero = enum.values_by_number[0]
        assert zero.name == prefix + "UNSPECIFIED", enum.name
        for value in enum.values:
            assert value.name.startswith(prefix), value.name


def test_field_and_message_naming():
    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]*", msg.name), msg.name
        for field in msg.fields:
            assert re.fullmatch(r"[a-z][a-z0-9_]*", field.name), f"{msg.name}.{field.name}"


def test_service_shape():
    service = pb.DESCRIPTOR.services_by_name["FeatureService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"StreamFeatures", "Extract", "GetModelInfo"}
    stream = methods["StreamFeatures"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.input_type.name == "StreamRequest" and stream.output_type.name == "StreamResponse"
    assert not methods["Extract"].client_streaming and not methods["Extract"].server_streaming
    assert methods["Extract"].output_type.name == "FrameResult"
    assert methods["GetModelInfo"].output_type.name == "ModelInfo"
    request = pb.StreamRequest.DESCRIPTOR
    assert [f.name for f in request.oneofs_by_name["payload"].fields] == ["config", "frame"]
    assert [f.name for f in pb.Frame.DESCRIPTOR.oneofs_by_name["data"].fields] == ["encoded", "raw"]


def test_stubs_are_importable():
    grpc_stubs = pytest.importorskip("yolostream.v1.feature_service_pb2_grpc")
    assert hasattr(grpc_stubs, "FeatureServiceStub")
    assert hasattr(grpc_stubs, "add_FeatureServiceServicer_to_server")


_FIELD_LINE = re.compile(r"^\s*(repeated\s+)?[A-Za-z_][\w.]*\s+[a-z_]\w*\s*=\s*\d+\s*;")


def test_every_field_line_follows_a_comment_line():
    lines = PROTO.read_text().splitlines()
    fields = [i for i, line in enumerate(lines) if _FIELD_LINE.match(line)]
    assert len(fields) > 50
    undocumented = [lines[i].strip() for i in fields if not lines[i - 1].strip().startswith("//")]
    assert undocumented == []


def _source_comments() -> tuple[dict[tuple[int, ...], str], descriptor_pb2.FileDescriptorProto]:
    """Compile the proto with source info; map each element path to its leading comment."""
    protoc = _require_protoc()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.bin"
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{regenerate.PROTO_ROOT}",
            f"-I{importlib.resources.files('grpc_tools') / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *regenerate.PROTO_FILES,
        ])
        assert rc == 0
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file,) = fds.file
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    return comments, file


def test_every_element_has_a_leading_comment():
    comments, file = _source_comments()
    # Field numbers in descriptor.proto: FileDescriptorProto.message_type=4, enum_type=5, service=6;
    # DescriptorProto.field=2, nested_type=3, enum_type=4, oneof_decl=8; EnumDescriptorProto.value=2;
    # ServiceDescriptorProto.method=2.
    paths: list[tuple[tuple[int, ...], str]] = []

    def enum_paths(prefix, enum):
        paths.append((prefix, enum.name))
        paths.extend(((*prefix, 2, i), v.name) for i, v in enumerate(enum.value))

    def message_paths(prefix, msg):
        paths.append((prefix, msg.name))
        paths.extend(((*prefix, 2, i), f"{msg.name}.{f.name}") for i, f in enumerate(msg.field))
        # A proto3 ``optional`` field makes a synthetic oneof (named after it): it is not written, so not documented.
        synthetic = {f.oneof_index for f in msg.field if f.proto3_optional}
        paths.extend(((*prefix, 8, i), f"{msg.name}.{o.name}") for i, o in enumerate(msg.oneof_decl)
                     if i not in synthetic)
        for i, sub in enumerate(msg.nested_type):
            message_paths((*prefix, 3, i), sub)
        for i, enum in enumerate(msg.enum_type):
            enum_paths((*prefix, 4, i), enum)

    for i, msg in enumerate(file.message_type):
        message_paths((4, i), msg)
    for i, enum in enumerate(file.enum_type):
        enum_paths((5, i), enum)
    for i, svc in enumerate(file.service):
        paths.append(((6, i), svc.name))
        paths.extend(((6, i, 2, j), f"{svc.name}.{m.name}") for j, m in enumerate(svc.method))

    assert len(paths) > 100
    undocumented = [name for path, name in paths if not comments.get(path)]
    assert undocumented == []
