"""Every way the safe loader refuses a weights file, through the real ``serve`` and ``extract`` commands.

The README promises that a start-up error is one line and exit 2. The loader's refusals (a global off the
allow-list, a file that is not a checkpoint, a pickle of the wrong shape, a truncated zip …) used to escape as a
traceback with exit 1, because CheckpointError was not one of the errors the command line catches. Each file
below is refused for a different reason; each must give exit 2, one line naming the file and the reason, no
traceback, and, for the hostile ones, no sign that the payload ran.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from yolostream.server.common.errors import GRPC_AIO_LOGGER, UnparsableRequestFilter, UserError, one_line, quote
from yolostream.server.model.checkpoint import CheckpointError
from yolostream.server.model.config import ConfigError, load_config
from yolostream.server.model.download import WeightsUnavailableError
from yolostream.server.model.loader import WeightsMismatchError

from conftest import assert_one_line_error, run_commands


class _Payload:
    """Pickles as a call of ``func(*args)``: what a tampered checkpoint would run on a plain unpickler."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _DetectionModel(nn.Module):
    """Pickled under upstream's name, so the loader unpickles it into its stand-in and reads its __dict__."""


_DetectionModel.__module__, _DetectionModel.__qualname__ = "models.yolo", "DetectionModel"


def _save_as_upstream(obj: object, path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch:
        module = types.ModuleType("models.yolo")
        module.DetectionModel = _DetectionModel
        patch.setitem(sys.modules, "models", types.ModuleType("models"))
        patch.setitem(sys.modules, "models.yolo", module)
        torch.save(obj, path)


def _stub(**attributes: object) -> _DetectionModel:
    model = _DetectionModel()
    model.__dict__.update(attributes)
    return model


def _write_cases(folder: Path, marker: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name → (extra arguments, words the error line must hold); writes each file into ``folder``."""
    def path(name: str) -> str:
        return str(folder / f"{name}.pt")

    torch.save({"epoch": 0, "model": _Payload(os.system, f"touch {marker}")}, path("system"))
    torch.save({"model": _Payload(getattr, collections.OrderedDict, "fromkeys")}, path("getattr"))
    (folder / "text.pt").write_text("this is not a checkpoint\n")
    (folder / "empty.pt").write_bytes(b"")
    torch.save([1, 2, 3], path("list"))
    torch.save({"model": {"a": 1}}, path("model-dict"))
    torch.save({"conv.weight": torch.zeros(2, 3)}, path("state-dict"))
    whole = (folder / "state-dict.pt").read_bytes()
    (folder / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    with zipfile.ZipFile(path("zip"), "w") as archive:
        archive.writestr("readme.txt", "hello")
    _save_as_upstream({"model": _stub(yaml={"nc": 1}, _modules=5)}, path("broken-modules"))
    _save_as_upstream({"model": _stub(yaml={"nc": 1})}, path("bad-yaml"))
    _save_as_upstream({"model": _stub(yaml=load_config("yolov5n"))}, path("no-weights"))
    torch.save({"w": _Payload(os.system, f"touch {marker}")}, path("evil-state-dict"))
    return {
        "global refused": (["--weights", path("system")], ["system.pt", "refuses global", "system",
                                                           "nothing was executed"]),
        "getattr refused": (["--weights", path("getattr")], ["getattr.pt", "getattr"]),
        "text file": (["--weights", path("text")], ["text.pt", "could not be read as a PyTorch checkpoint"]),
        "empty file": (["--weights", path("empty")], ["empty.pt", "could not be read"]),
        "wrong-shaped pickle": (["--weights", path("list")], ["list.pt", "holds a list"]),
        "model is not a model": (["--weights", path("model-dict")], ["model-dict.pt", "not a model"]),
        "state_dict without --cfg": (["--weights", path("state-dict")], ["state-dict.pt", "--cfg"]),
        "truncated zip": (["--weights", path("truncated")], ["truncated.pt", "could not be read"]),
        "zip without a pickle": (["--weights", path("zip")], ["zip.pt", "not a PyTorch checkpoint"]),
        "malformed model object": (["--weights", path("broken-modules")], ["broken-modules.pt", "could not be read"]),
        "invalid yaml inside": (["--weights", path("bad-yaml")], ["bad-yaml.pt", "config inside it is invalid"]),
        "weights missing": (["--weights", path("no-weights")], ["no-weights.pt", "do not match", "missing keys"]),
        "state_dict of another model": (["--weights", path("state-dict"), "--cfg", "yolov5n"],
                                        ["state-dict.pt", "do not match", "more"]),
        "hostile state_dict": (["--weights", path("evil-state-dict"), "--cfg", "yolov5n"],
                               ["evil-state-dict.pt", "not a plain state_dict", "system"]),
    }


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> tuple[dict, dict, Path]:
    """The cases, and the outcome of each through ``serve`` and ``extract``, run side by side."""
    folder = tmp_path_factory.mktemp("refused")
    marker = folder / "payload-ran"
    cases = _write_cases(folder, marker)
    commands = {}
    for name, (args, _) in cases.items():
        commands[("serve", name)] = ["serve", *args, "--port", "0", "--device", "cpu", "--imgsz", "64"]
        if name in EXTRACT_CASES:
            commands[("extract", name)] = ["extract", *args, "--device", "cpu", "--imgsz", "64", "--out",
                                           str(folder / "out"), str(folder / "image.png")]
    return cases, run_commands(commands, folder, timeout=180), marker


#: ``extract`` loads through the same ``load_model`` as ``serve``; one case of each failing stage keeps the
#: test's process starts (each imports torch) affordable: the unpickler, torch's reader, the object's layout,
#: and building the model.
EXTRACT_CASES = ("global refused", "truncated zip", "wrong-shaped pickle", "malformed model object",
                 "weights missing", "hostile state_dict")


@pytest.mark.parametrize("command", ["serve", "extract"])
def test_every_refused_weights_file_is_one_line_and_exit_2(refused, command):
    cases, outcomes, marker = refused
    names = cases if command == "serve" else EXTRACT_CASES
    for name in names:
        line = assert_one_line_error(name, outcomes[(command, name)], command, cases[name][1])
        assert len(line) < 1000, f"{name}: {len(line)} characters"
    assert not marker.exists(), "a payload ran"


def test_user_errors_share_one_base_that_is_still_a_value_error():
    for kind in (CheckpointError, ConfigError, WeightsMismatchError, WeightsUnavailableError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError), kind
    assert issubclass(WeightsUnavailableError, RuntimeError)  # what it was before the base existed


def test_quote_cuts_client_text_and_keeps_it_on_one_line():
    assert quote("P3") == "'P3'"
    long = "x" * 50_000
    quoted = quote(long)
    assert len(quoted) < 120 and "50,000 characters" in quoted and quoted.startswith("'xxx")
    assert "\n" not in quote("a\nb" * 10) and "\\n" in quote("a\nb")
    assert one_line("first\n  second\tthird") == "first second third"
    assert len(one_line("y" * 5000, 100)) < 130


def test_a_request_that_does_not_parse_is_logged_as_one_line(caplog):
    """What grpc.aio logs for a client's unparsable bytes: one WARNING naming the method, no traceback."""
    from google.protobuf.message import DecodeError

    logger = logging.getLogger(f"{GRPC_AIO_LOGGER}.test")
    logger.addFilter(UnparsableRequestFilter())
    try:
        raise DecodeError("Error parsing message with type 'yolostream.v1.StreamRequest': Wire format was corrupt")
    except DecodeError:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.exception("Unexpected [%s] raised by servicer method [%s]", "DecodeError", "/x.S/M")
            logger.error("an unrelated failure")
    first, second = caplog.records
    assert first.levelno == logging.WARNING and first.exc_info is None
    assert "/x.S/M" in first.getMessage() and "Wire format was corrupt" in first.getMessage()
    assert "Traceback" not in caplog.text and second.levelno == logging.ERROR


def test_a_token_of_the_wrong_type_in_the_config_file_is_not_echoed(tmp_path):
    from yolostream.server.common import settings

    (tmp_path / "server.yaml").write_text("token: 918273645\n")
    with pytest.raises(ValueError, match="token") as err:
        settings.load_config_file(tmp_path / "server.yaml")
    assert "918273645" not in str(err.value)
