"""Open official YOLOv5 ``.pt`` files without upstream code and without running anything they contain.

YOLOv5 checkpoints are full pickles of upstream's module tree, so ``torch.load(weights_only=True)`` refuses
them and a plain ``weights_only=False`` load would execute whatever a tampered file asks for. We unpickle
with an allow-list instead: torch's tensor machinery, a few container, path and numpy types, the
``torch.nn`` classes YOLOv5 uses, and, for upstream's own ``models.*`` classes, empty ``nn.Module``
stand-ins that merely restore the pickled state. Any other global (``os.system``, ``builtins.eval``...) is
refused before it can be called. The stand-in tree still answers ``state_dict()``, which is all we need.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import reprlib
import threading
import types
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from ..common.errors import UserError, one_line

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "StubAttribute",
    "UnsafeCheckpointError",
    "load_checkpoint",
    "load_state_dict_file",
    "stub_class",
]

# Upstream modules whose classes we replace by stand-ins; their code never runs here.
_UPSTREAM_MODULES = frozenset({"models.common", "models.yolo", "models.experimental"})

# torch.nn classes found in YOLOv5 pickles (defaults, custom yamls, classification and segmentation heads).
_TORCH_NN_NAMES = (
    "Conv2d", "ConvTranspose2d", "BatchNorm2d", "MaxPool2d", "AdaptiveAvgPool2d", "Upsample", "ZeroPad2d",
    "Sequential", "ModuleList", "Identity", "Linear", "NonDynamicallyQuantizableLinear",
    "MultiheadAttention", "Dropout", "Flatten",
    "SiLU", "Hardswish", "LeakyReLU", "ReLU", "ReLU6", "Sigmoid", "Tanh", "GELU", "Mish", "ELU", "Hardsigmoid",
)

# torch's own tensor-rebuild helpers, as written by torch.save (zip and legacy formats).
_TORCH_REBUILD_FUNCTIONS = (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
    "_rebuild_parameter", "_rebuild_parameter_with_state",
)

# numpy writes these for arrays and scalars (``best_fitness``); numpy 2 uses ``numpy._core``.
_NUMPY_NAMES = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("multiarray", "scalar"),
}

# Only what numpy's pickles need from ``_codecs.encode``: turning a latin-1 str back into bytes.
_SAFE_ENCODINGS = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "ascii", "utf-8", "utf8"})

# dtypes appear as globals when a module keeps one as an attribute; looked up by name, never via getattr(torch, ...).
_DTYPE_NAMES = (
    "float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "bool",
    "complex64", "complex128",
)

_ACTIVATION_MODULE = "torch.nn.modules.activation"
#: Most classes for which default names ("0", "1", …) are made up; a tampered ``nc`` must not exhaust memory.
MAX_CLASSES = 100_000
_NOT_ACTIVATIONS = frozenset({"MultiheadAttention"})


class CheckpointError(UserError):
    """The file cannot be used as a YOLOv5 checkpoint (not a torch file, wrong layout, ...).

    A UserError: the command line shows it as one line and exits 2, because the fix is another file.
    """


class UnsafeCheckpointError(CheckpointError):
    """The pickle asks for a global outside the allow-list; nothing it references was called."""


@dataclass
class Checkpoint:
    """What the model builder needs from an official file, with upstream's classes already stripped away."""

    path: Path
    yaml: dict
    state_dict: dict[str, torch.Tensor]
    activations: dict[str, nn.Module]
    source_key: str
    names: list[str]
    nc: int | None
    info: dict = field(default_factory=dict)
    #: Whether the file carried ``names``; when it did not, ``names`` are the ids as strings.
    names_given: bool = False


# ---------------------------------------------------------------------------------------------------------
# Stand-ins for upstream classes


class _StubModule(nn.Module):
    """Base of the stand-ins: restores any pickled ``__dict__``, filling fields older torch did not write."""

    upstream_name: str = ""

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        nn.Module.__init__(self)
        if isinstance(state, dict):
            self.__dict__.update(state)
        if isinstance(slots, dict):
            self.__dict__.update(slots)


_STUBS: dict[tuple[str, str], type[_StubModule]] = {}
_STUBS_LOCK = threading.Lock()


def stub_class(module: str, name: str) -> type[_StubModule]:
    """The (cached) stand-in class for upstream's ``module.name``; it carries upstream's module and name."""
    key = (module, name)
    with _STUBS_LOCK:
        cls = _STUBS.get(key)
        if cls is None:
            cls = types.new_class(name, (_StubModule,))
            cls.__module__ = module
            cls.__qualname__ = name
            cls.upstream_name = f"{module}.{name}"
            _STUBS[key] = cls
        return cls


def _is_stub_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, _StubModule) and obj is not _StubModule


@dataclass(frozen=True)
class StubAttribute:
    """What ``getattr(<upstream class>, name)`` unpickles to (``Segment.detect = Detect.forward``): a label only.

    It is deliberately not callable, so a pickle cannot use it to run anything.
    """

    owner: str
    name: str


def _safe_getattr(obj: Any, name: Any, *default: Any) -> StubAttribute:
    if not _is_stub_class(obj) or not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise UnsafeCheckpointError(
            f"refuses getattr({reprlib.repr(obj)}, {reprlib.repr(name)}): "
            "getattr is only allowed on upstream YOLOv5 classes"
        )
    return StubAttribute(obj.upstream_name, name)


def _safe_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(obj, str) or str(encoding).lower() not in _SAFE_ENCODINGS:
        raise UnsafeCheckpointError(f"refuses _codecs.encode(..., {encoding!r})")
    return obj.encode(encoding, errors)


# ---------------------------------------------------------------------------------------------------------
# The allow-list


def _static_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("_codecs", "encode"): _safe_encode,
        # Files hold paths from the OS that wrote them; pure paths open on any OS and touch no filesystem.
        ("pathlib", "PosixPath"): PurePosixPath,
        ("pathlib", "PurePosixPath"): PurePosixPath,
        ("pathlib", "WindowsPath"): PureWindowsPath,
        ("pathlib", "PureWindowsPath"): PureWindowsPath,
    }
    for builtins_module in ("__builtin__", "builtins"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("complex", complex)):
            allowed[(builtins_module, name)] = obj
        allowed[(builtins_module, "getattr")] = _safe_getattr
    for name in _DTYPE_NAMES:
        allowed[("torch", name)] = getattr(torch, name)
    for name in _TORCH_REBUILD_FUNCTIONS:
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            allowed[("torch._utils", name)] = fn
    for name in _TORCH_NN_NAMES:
        cls = getattr(nn, name, None) or getattr(nn.modules.linear, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            allowed[(cls.__module__, name)] = cls
    return allowed


_ALLOWED = _static_globals()
_TORCH_NN_BY_NAME = {name: obj for (mod, name), obj in _ALLOWED.items() if mod.startswith("torch.nn.modules.")}


def _numpy_global(module: str, name: str) -> Any:
    where, attr = _NUMPY_NAMES[(module, name)]
    import numpy

    if where == "numpy":
        return getattr(numpy, attr)
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        multiarray = importlib.import_module("numpy.core.multiarray")
    return getattr(multiarray, attr)


def _resolve_global(module: str, name: str) -> Any:
    """The object a pickle GLOBAL may name, or None when it is not on the allow-list."""
    found = _ALLOWED.get((module, name))
    if found is not None:
        return found
    if module in _UPSTREAM_MODULES:
        parts = name.split(".")
        if all(p.isidentifier() and not p.startswith("_") for p in parts):
            if len(parts) == 1:
                return stub_class(module, name)
            if len(parts) == 2:  # protocol 4+ writes ``Detect.forward`` as one dotted name
                return StubAttribute(f"{module}.{parts[0]}", parts[1])
    if module.startswith("torch.nn.modules.") and name in _TORCH_NN_BY_NAME:
        return _TORCH_NN_BY_NAME[name]  # the class lived in another submodule in some torch release
    if module == "torch" and name.endswith("Storage") and name.isidentifier():
        try:
            return torch.serialization.StorageType(name)
        except KeyError:
            return None
    if (module, name) in _NUMPY_NAMES:
        return _numpy_global(module, name)
    return None


def _make_pickle_module(source: str) -> types.SimpleNamespace:
    """A ``pickle``-like namespace for ``torch.load(pickle_module=...)``, naming ``source`` in its errors."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            found = _resolve_global(module, name)
            if found is None:
                raise UnsafeCheckpointError(
                    f"{source}: the checkpoint loader refuses global '{module}.{name}' "
                    "(not on the allow-list for YOLOv5 checkpoints; nothing was executed)"
                )
            return found

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    def loads(data: bytes, **kwargs: Any) -> Any:
        return load(io.BytesIO(data), **kwargs)

    return types.SimpleNamespace(
        __name__="yolostream_restricted_pickle",
        Unpickler=RestrictedUnpickler,
        UnpicklingError=pickle.UnpicklingError,
        load=load,
        loads=loads,
    )


# ---------------------------------------------------------------------------------------------------------
# Loading


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.split("/", 1)[-1] == "constants.pkl" for n in names):
            raise CheckpointError(f"{path} is a TorchScript archive, not a YOLOv5 checkpoint (.pt from train.py)")
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip file but not a PyTorch checkpoint (no data.pkl inside)")


def _restricted_load(path: Path) -> Any:
    _check_readable(path)
    with warnings.catch_warnings():
        # Legacy (torch<1.6) files make torch look for our stand-ins' source code; that check is moot here.
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        try:
            return torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_make_pickle_module(str(path))
            )
        except UnsafeCheckpointError as err:
            if str(path) in str(err):
                raise
            raise UnsafeCheckpointError(f"{path}: the checkpoint loader {err}") from None
        except (CheckpointError, FileNotFoundError):
            raise
        except Exception as err:
            raise CheckpointError(
                f"{path} could not be read as a PyTorch checkpoint ({type(err).__name__}: {one_line(str(err), 300)})"
            ) from err


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _pick_model(obj: Any, path: Path) -> tuple[nn.Module, str, dict]:
    """Upstream's choice: ``ema`` when present and not None, else ``model``; or the object itself."""
    if isinstance(obj, nn.Module):
        return obj, "model", {}
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a YOLOv5 checkpoint dict or model")
    if _is_tensor_mapping(obj) or _is_tensor_mapping(obj.get("state_dict")) or _is_tensor_mapping(obj.get("model")):
        raise CheckpointError(
            f"{path} looks like a plain state_dict (tensors only, no model or YAML): pass --cfg too"
        )
    for key in ("ema", "model"):
        candidate = obj.get(key)
        if candidate is None:
            continue
        if not isinstance(candidate, nn.Module):
            raise CheckpointError(f"{path}: ckpt[{key!r}] is a {type(candidate).__name__}, not a model")
        return candidate, key, obj
    raise CheckpointError(f"{path} has no model: top-level keys are {sorted(map(str, obj))}")


def _normalise_names(names: Any) -> list[str]:
    if isinstance(names, dict):
        try:
            order = sorted(names, key=int)
        except (TypeError, ValueError):
            order = list(names)
        return [str(names[k]) for k in order]
    if isinstance(names, (list, tuple)):
        return [str(n) for n in names]
    return []


def _find_nc(model: nn.Module, yaml_cfg: dict) -> int | None:
    for candidate in (getattr(model, "nc", None), yaml_cfg.get("nc")):
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return candidate
    return None


def _activations(model: nn.Module) -> dict[str, nn.Module]:
    """Every activation module by dotted path, shared instances (v7's class-level ``default_act``) included."""
    found: dict[str, nn.Module] = {}
    for dotted, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        is_activation = cls.__module__ == _ACTIVATION_MODULE and cls.__name__ not in _NOT_ACTIVATIONS
        if is_activation or (isinstance(module, nn.Identity) and dotted.rpartition(".")[2] == "act"):
            if is_activation and not hasattr(module, "inplace"):
                module.inplace = False  # torch 1.x Hardswish/SiLU pickles predate the attribute
            found[dotted] = module
    return found


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar for ``info`` (best_fitness may be a numpy array)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    try:
        return float(value.reshape(-1)[0]) if hasattr(value, "reshape") else float(value)
    except (TypeError, ValueError, IndexError):
        return str(value)


def _info(ckpt: dict, model: nn.Module, is_dict: bool) -> dict:
    if not is_dict:
        kind = "bare-model"
    elif ckpt.get("optimizer") is not None:
        kind = "training"
    else:
        kind = "release"
    git = ckpt.get("git") if isinstance(ckpt.get("git"), dict) else {}
    upstream_type = getattr(type(model), "upstream_name", "") or f"{type(model).__module__}.{type(model).__name__}"
    return {
        "kind": kind,
        "model_type": upstream_type,
        "epoch": _plain(ckpt.get("epoch")),
        "date": _plain(ckpt.get("date")),
        "git_commit": _plain(git.get("commit")),
        "best_fitness": _plain(ckpt.get("best_fitness")),
        "updates": _plain(ckpt.get("updates")),
        "keys": [str(k) for k in ckpt],
    }


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read an official YOLOv5 checkpoint (release, mid-training, any version) safely.

    Tensors keep their stored dtype (fp16 in release files); casting is the builder's job.
    """
    path = Path(path)
    obj = _restricted_load(path)
    try:
        return _interpret(obj, path)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, KeyError, IndexError, ValueError, RuntimeError) as err:
        # The allow-list guarantees that nothing ran, not that the objects have the shapes upstream writes: a
        # tampered or corrupted file can put anything into a stand-in's __dict__.
        raise CheckpointError(f"{path} is not a usable YOLOv5 checkpoint: its pickled objects are malformed "
                              f"({type(err).__name__}: {one_line(str(err), 300)})") from err


def _interpret(obj: Any, path: Path) -> Checkpoint:
    """The Checkpoint in an unpickled object; any surprise in its layout raises (see ``load_checkpoint``)."""
    model, source_key, ckpt = _pick_model(obj, path)
    yaml_cfg = getattr(model, "yaml", None)
    yaml_cfg = yaml_cfg if isinstance(yaml_cfg, dict) else {}
    try:
        state_dict = dict(model.state_dict())
    except Exception as err:
        raise CheckpointError(f"{path}: the pickled model's state_dict could not be read "
                              f"({one_line(str(err), 300)})") from err
    nc = _find_nc(model, yaml_cfg)
    given = _normalise_names(getattr(model, "names", None))
    names = given or ([str(i) for i in range(nc)] if nc is not None and 0 < nc <= MAX_CLASSES else [])
    return Checkpoint(
        path=path,
        yaml=yaml_cfg,
        state_dict=state_dict,
        activations=_activations(model),
        source_key=source_key,
        names=names,
        nc=nc,
        info=_info(ckpt, model, isinstance(obj, dict)),
        names_given=bool(given),
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a plain state_dict file (also ``{'state_dict': sd}`` / ``{'model': sd}`` wrappers)."""
    path = Path(path)
    _check_readable(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"it references {found.group(1)}" if found else "it pickles Python objects"
        raise CheckpointError(
            f"{path} is not a plain state_dict ({what}); a full YOLOv5 checkpoint loads without --cfg"
        ) from err
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be read as a PyTorch file ({type(err).__name__}: {one_line(str(err), 300)})"
        ) from err
    for candidate in (obj, *(obj.get(k) for k in ("state_dict", "model") if isinstance(obj, dict))):
        if _is_tensor_mapping(candidate):
            return {str(k): v for k, v in candidate.items()}
    raise CheckpointError(f"{path} holds no mapping of names to tensors")

