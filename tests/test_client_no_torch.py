"""The client runs where torch cannot be imported (a camera-side computer): API, and the ``yolostream`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import in_process_server

REPO = Path(__file__).resolve().parents[1]

# Makes every import of torch fail, as on a machine where it is not installed.
BLOCK_TORCH = """
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch' (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""

API_SCRIPT = BLOCK_TORCH + """
import numpy as np
import yolostream.client
import yolostream.client.cli
from yolostream.client import FeatureClient
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable")
address = sys.argv[1]
with FeatureClient(address) as client:
    assert client.model_info().model_name == "yolov5n"
    image = np.full((48, 80, 3), 128, np.uint8)
    results = list(client.stream([image] * 3, layers="P3"))
    assert [r.status for r in results] == ["ok"] * 3 and results[0].features["P3"].shape == (64, 8, 8)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "yolostream.server")))
print("LOADED", loaded)
"""

CLI_SCRIPT = BLOCK_TORCH + """
from yolostream.server import cli
code = cli.main(sys.argv[1:])
print("LOADED", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
sys.exit(code)
"""


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("protos", "server", "client"))}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def server():
    with in_process_server() as running:
        yield running


def test_the_blocker_really_blocks_torch():
    proc = run(BLOCK_TORCH + "import torch\n")
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_import_and_stream_without_torch(server):
    proc = run(API_SCRIPT, server.address)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_the_stream_command_runs_without_torch(server, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 48))
    for i in range(4):
        writer.write(np.full((48, 80, 3), 30 * i, np.uint8))
    writer.release()
    proc = run(CLI_SCRIPT, "stream", str(video), "--server", server.address, "--layers", "P3",
               "--save", str(tmp_path / "save"), "--viz", str(tmp_path / "heat.avi"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "4 answered" in proc.stdout and "LOADED []" in proc.stdout
    proc = run(CLI_SCRIPT, "info", "--server", server.address)
    assert proc.returncode == 0 and "SPPF" in proc.stdout, proc.stderr


@pytest.mark.parametrize("command", [["layers"], ["serve", "--port", "0"], ["extract", "--out", "o", "x.png"]])
def test_server_commands_without_torch_say_what_to_install(command):
    proc = run(CLI_SCRIPT, *command)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith(f"yolostream {command[0]}: error: this command needs the server extra")
    assert "pip install 'yolostream[server]'" in lines[-1] and "'torch'" in lines[-1]
