"""The import contracts of ``.importlinter`` (run by ``make test`` before pytest) hold, and they bite: a copy of the
tree where a front-end module imports torch, or the device imports the front-end, or two modules import each other,
fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
SOURCES = ("server", "client", "protos")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (the dev extra has it)")


def lint(root: Path) -> subprocess.CompletedProcess:
    """Run the contracts over the tree at ``root`` (its packages first on the path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(root / part) for part in SOURCES)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / ".importlinter")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the sources and the contracts, to break on purpose."""
    for part in SOURCES:
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def add_import(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest)


def test_the_contracts_hold_on_this_tree():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("frontend/frames.py", "import torch", "front-end processes never import torch"),
    ("frontend/pipeline.py", "from ..device import engine", "front-end processes never import torch"),
    ("device/batcher.py", "from ..frontend import link", "the device process never imports front-end"),
    ("common/card.py", "import grpc", "common/ and ipc/ are shared vocabulary"),
    ("ipc/messages.py", "from ..frontend import metrics", "common/ and ipc/ are shared vocabulary"),
    ("offline/extractor.py", "from ..device import staging", "offline tools run in the user's process"),
    ("common/errors.py", "from . import settings", "no two modules or packages import each other"),
    ("frontend/client_shm.py", "from ..ipc import shm as arenas", "client_shm never touches the device link"),
])
def test_breaking_a_rule_fails_the_contracts(tree, module, line, contract):
    add_import(tree / "server" / "yolostream" / "server" / module, line)
    result = lint(tree)
    assert result.returncode != 0
    broken = result.stdout[result.stdout.index("Broken contracts"):]
    assert contract in broken
