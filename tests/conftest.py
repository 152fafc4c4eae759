"""Shared test fixtures: the upstream reference data lives in ../shared/fixtures beside the repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    """Path of a shared fixture, skipping the test with a clear reason when the folder is absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent (tests read ../shared/fixtures beside the repo)")
    return path


@pytest.fixture(scope="session")
def layers_json() -> dict:
    return json.loads(fixture_path("yolov5n.layers.json").read_text())


@pytest.fixture(scope="session")
def fixture_weights() -> Path:
    return fixture_path("yolov5n.pt")
