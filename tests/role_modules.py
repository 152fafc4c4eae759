"""Import the new role-package modules (``yolostream.server.device.quantize``, ``...frontend.compression``) by name.

While ``server/yolostream/server/device.py`` and ``frontend.py`` still exist, those modules shadow the ``device/`` and
``frontend/`` folders (a module wins over a namespace package), so ``import yolostream.server.device.quantize``
fails with "is not a package". Until the move into role packages lands, the file is loaded from its path under its
dotted name; afterwards the plain import is used.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SERVER_ROOT = Path(__file__).resolve().parents[1] / "server"


def role_module(dotted: str) -> ModuleType:
    """The module ``dotted`` (e.g. ``"yolostream.server.device.quantize"``), imported or loaded from its file."""
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if "is not a package" not in str(exc):
            raise
    if dotted in sys.modules:
        return sys.modules[dotted]
    path = SERVER_ROOT.joinpath(*dotted.split(".")).with_suffix(".py")
    spec = importlib.util.spec_from_file_location(dotted, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[dotted] = module
    spec.loader.exec_module(module)
    return module
