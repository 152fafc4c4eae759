"""YOLOv5-format YAML configs: find, read, validate, and resolve them into layer specs.

Resolution reproduces upstream's parse_model rules (UPSTREAM_FACTS §4): depth and width multiples, the
argument rewriting per module kind and the channel bookkeeping. Layer indices, resolved arguments and hence
state_dict keys therefore line up with upstream checkpoints built from the same YAML.

Upstream ``eval``s every string in a YAML. Nothing here executes YAML text: module names go through an explicit
table, string arguments through a small AST walker that knows constants, a few names (``nc``, ``anchors`` …) and
plain arithmetic, and ``activation:`` through a parser for ``nn.Name(literal args)`` over an allow-list.
"""

from __future__ import annotations

import ast
import copy
import functools
import math
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..common.errors import UserError
from . import modules as M
from .modules import ActivationFactory


class ConfigError(UserError):
    """A model config that cannot be used: not found, not YAML, or not a valid yolov5 architecture."""


CONFIG_DIR = Path(__file__).resolve().with_name("configs")
REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")
DEFAULT_CHANNEL_MULTIPLE = 8

_OWN_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        M.Conv, M.DWConv, M.Bottleneck, M.C3, M.SPPF, M.SPP, M.Concat, M.Focus, M.BottleneckCSP, M.C3SPP, M.C3x,
        M.GhostConv, M.GhostBottleneck, M.C3Ghost, M.CrossConv, M.C3TR, M.Detect,
    )
}
_TORCH_MODULES: dict[str, type[nn.Module]] = {
    "nn." + cls.__name__: cls for cls in (nn.Upsample, nn.BatchNorm2d, nn.ZeroPad2d, nn.MaxPool2d)
}

# Modules whose first argument is an output width (scaled by width_multiple) and whose input width is prepended.
WIDTH_SCALED = frozenset({
    "Conv", "GhostConv", "Bottleneck", "GhostBottleneck", "SPP", "SPPF", "DWConv", "Focus", "CrossConv",
    "BottleneckCSP", "C3", "C3TR", "C3SPP", "C3Ghost", "C3x",
})
# Modules that take the repeat count as their third argument instead of being repeated as a Sequential.
REPEATS_INSIDE = frozenset({"BottleneckCSP", "C3", "C3TR", "C3Ghost", "C3x"})

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.GELU, nn.ELU,
        nn.CELU, nn.SELU, nn.Sigmoid, nn.Tanh, nn.Identity,
    )
}

_ARITHMETIC = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
}


@dataclass(frozen=True)
class LayerSpec:
    """One resolved YAML row: what to build at ``index`` and where its input comes from.

    ``n`` is the repeat count after the depth multiple (for C3-like modules it is also ``args[2]``).
    ``channels`` is the output width (for Detect: the width of each level's output conv, na·(nc+5)).
    ``params`` is None in a spec fresh from ``parse_model``; ``build_model`` fills it in from the built module.
    """

    index: int
    from_: int | list[int]
    n: int
    module: str
    type: str
    args: list[Any]
    section: str
    channels: int
    params: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A validated config resolved into layers, plus the model-level facts the graph needs."""

    yaml: dict
    layers: tuple[LayerSpec, ...]
    save: list[int]
    nc: int
    ch: int
    activation: ActivationFactory
    inplace: bool
    backbone_len: int


def builtin_configs() -> list[str]:
    """Names of the configs shipped in ``configs/`` (``yolov5s``, ``yolov5s6`` …)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(source: str | Path | dict) -> dict:
    """Return a validated config dict from a dict (deep-copied), a YAML path, or a built-in name like ``yolov5s``."""
    if isinstance(source, dict):
        cfg = copy.deepcopy(source)
    elif isinstance(source, (str, Path)):
        cfg = _read_yaml(_locate(source))
    else:
        raise ConfigError(f"a config is a dict, a YAML path or a built-in name, not {type(source).__name__}")
    validate_config(cfg)
    return cfg


def _locate(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if isinstance(source, str) and path.parent == Path(".") and (CONFIG_DIR / f"{stem}.yaml").is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    raise ConfigError(
        f"config {str(source)!r} is neither a YAML file nor a built-in name; "
        f"built-in configs: {', '.join(builtin_configs())}"
    )


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a YAML mapping, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(cfg: dict) -> None:
    """Raise ValueError naming the first problem: missing keys, bad multiples or anchors, malformed rows."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"model config lacks required key(s) {', '.join(missing)} (needs {', '.join(REQUIRED_KEYS)})")
    if not _is_int(cfg["nc"]) or cfg["nc"] < 1:
        raise ConfigError(f"nc must be a positive integer (number of classes), got {cfg['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if not _is_number(cfg[key]) or cfg[key] <= 0:
            raise ConfigError(f"{key} must be a positive number, got {cfg[key]!r}")
    _validate_anchors(cfg["anchors"])
    for key in ("channel_multiple", "ch"):
        if cfg.get(key) is not None and (not _is_int(cfg[key]) or cfg[key] < 1):
            raise ConfigError(f"{key} must be a positive integer, got {cfg[key]!r}")
    if cfg.get("activation") is not None and not isinstance(cfg["activation"], str):
        raise ConfigError(f"activation must be a string like 'nn.SiLU()', got {cfg['activation']!r}")
    for key in ("backbone", "head"):
        if not isinstance(cfg[key], list):
            kind = type(cfg[key]).__name__
            raise ConfigError(f"{key} must be a list of [from, number, module, args] rows, got {kind}")
    if not cfg["backbone"]:
        raise ConfigError("backbone has no layers")
    for i, row in enumerate(cfg["backbone"] + cfg["head"]):
        _validate_row(i, row, _where(cfg, i))


def _where(cfg: dict, i: int) -> str:
    nb = len(cfg["backbone"])
    return f"layer {i} (backbone row {i})" if i < nb else f"layer {i} (head row {i - nb})"


def _validate_anchors(anchors: Any) -> None:
    if _is_int(anchors):
        if anchors < 1:
            raise ConfigError(f"anchors as a count must be positive, got {anchors}")
        return
    ok = isinstance(anchors, list) and anchors and all(
        isinstance(level, list) and level and len(level) % 2 == 0 and all(_is_number(v) for v in level)
        for level in anchors
    )
    if not ok or len({len(level) for level in anchors}) != 1:
        raise ConfigError(
            "anchors must be a count or a list of levels, each a flat list of w,h pixel pairs "
            f"with the same number of anchors per level; got {anchors!r}"
        )


def _validate_row(i: int, row: Any, where: str) -> None:
    if not isinstance(row, (list, tuple)) or len(row) != 4:
        raise ConfigError(f"{where}: a row is [from, number, module, args], got {row!r}")
    f, n, module, args = row
    froms = [f] if _is_int(f) else f
    if not isinstance(froms, list) or not froms or not all(_is_int(x) for x in froms):
        raise ConfigError(f"{where}: 'from' must be an integer or a list of integers, got {f!r}")
    for x in froms:
        if not (x == -1 or 0 <= x < i or (i > 0 and -i <= x < -1)):
            raise ConfigError(f"{where}: 'from' entry {x} does not name an earlier layer")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"{where}: 'number' must be a positive integer, got {n!r}")
    if not isinstance(module, str):
        raise ConfigError(f"{where}: module must be a name like 'C3' or 'nn.Upsample', got {module!r}")
    if not isinstance(args, list):
        raise ConfigError(f"{where}: args must be a list, got {args!r}")


def supported_modules() -> list[str]:
    """Module names a YAML may use (``torch.nn.X`` is accepted for every ``nn.X``)."""
    return sorted(_OWN_MODULES) + sorted(_TORCH_MODULES)


def canonical_module_name(name: str) -> str:
    """``'C3'`` → ``'C3'``, ``'torch.nn.Upsample'`` → ``'nn.Upsample'``; unknown names raise ValueError."""
    text = name.strip()
    if text.startswith("torch.nn."):
        text = text[len("torch."):]
    if text in _OWN_MODULES or text in _TORCH_MODULES:
        return text
    raise ConfigError(f"unknown module {name!r}; supported: {', '.join(supported_modules())}")


def module_class(name: str) -> type[nn.Module]:
    """The class behind a canonical module name."""
    canonical = canonical_module_name(name)
    return _OWN_MODULES.get(canonical) or _TORCH_MODULES[canonical]


def upstream_type(cls: type[nn.Module]) -> str:
    """The dotted name upstream shows for a layer (``models.common.C3``, ``torch.nn.modules.upsampling.Upsample``)."""
    if cls is M.Detect:
        return "models.yolo.Detect"
    if _OWN_MODULES.get(cls.__name__) is cls:
        return f"models.common.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def scale_depth(n: int, depth_multiple: float) -> int:
    """Repeat count after the depth multiple: Python (banker's) rounding, never below 1; n=1 is kept."""
    return max(round(n * depth_multiple), 1) if n > 1 else n


def scale_width(channels: int, width_multiple: float, divisor: int = DEFAULT_CHANNEL_MULTIPLE) -> int:
    """Output width after the width multiple, rounded up to a multiple of ``divisor``."""
    return math.ceil(channels * width_multiple / divisor) * divisor


def parse_activation(text: str) -> ActivationFactory:
    """Turn ``'nn.LeakyReLU(0.1)'`` into a factory of fresh modules, without evaluating the text.

    Accepts ``nn.Name(...)`` / ``torch.nn.Name(...)`` for allow-listed activations with literal number or
    boolean arguments; anything else raises ValueError.
    """
    allowed = ", ".join(f"nn.{name}()" for name in sorted(_ACTIVATIONS))
    problem = f"activation {text!r} is not supported; use one of {allowed} (numeric arguments allowed)"
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        raise ConfigError(problem) from err
    if not isinstance(node, ast.Call) or any(k.arg is None for k in node.keywords):
        raise ConfigError(problem)
    dotted = _dotted_name(node.func)
    name = dotted.removeprefix("torch.").removeprefix("nn.") if dotted.startswith(("nn.", "torch.nn.")) else None
    if name not in _ACTIVATIONS:
        raise ConfigError(problem)
    try:
        args = [_literal_number(a) for a in node.args]
        kwargs = {k.arg: _literal_number(k.value) for k in node.keywords}
        factory = functools.partial(_ACTIVATIONS[name], *args, **kwargs)
        factory()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{problem}: {err}") from err
    return factory


def _dotted_name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted_name(node.value)}.{node.attr}"
    return ""


def _literal_number(node: ast.AST) -> int | float | bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal_number(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
        return node.value
    raise ConfigError(f"argument {ast.unparse(node)!r} is not a literal number")


class _Unresolved(Exception):
    """A string argument that is not a known name or literal: upstream keeps such strings as they are."""


def resolve_arg(value: Any, names: dict[str, Any]) -> Any:
    """Interpret one YAML argument the way upstream's ``eval`` would for the cases YAMLs use, safely.

    Strings that are literals (``'None'``, ``'1e-3'``), known names (``'nc'``, ``'anchors'``) or arithmetic on
    those are evaluated; any other string (``'nearest'``) is returned unchanged. Non-strings pass through.
    """
    if not isinstance(value, str):
        return value
    try:
        return _evaluate(ast.parse(value.strip(), mode="eval").body, names)
    except (SyntaxError, _Unresolved, ArithmeticError):
        return value


def _evaluate(node: ast.AST, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, str, type(None))):
        return node.value
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        items = [_evaluate(e, names) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_evaluate(node.operand, names))
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _number(_evaluate(node.left, names)), _number(_evaluate(node.right, names))
        return _ARITHMETIC[type(node.op)](left, right)
    raise _Unresolved


def _number(value: Any) -> int | float:
    if not _is_number(value):
        raise _Unresolved
    return value


def parse_model(cfg: dict, ch: int | None = None) -> ModelSpec:
    """Resolve a validated config into layer specs, as upstream's parse_model interprets it.

    ``ch`` (input channels) defaults to the config's ``ch`` key, else 3; the returned ``yaml`` records it.
    """
    validate_config(cfg)
    cfg = copy.deepcopy(cfg)
    ch_in = ch if ch is not None else cfg.get("ch") or 3
    cfg["ch"] = ch_in
    nc, gd, gw, anchors = cfg["nc"], cfg["depth_multiple"], cfg["width_multiple"], cfg["anchors"]
    divisor = cfg.get("channel_multiple") or DEFAULT_CHANNEL_MULTIPLE
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors, "na": na, "no": no}
    activation = parse_activation(cfg["activation"]) if cfg.get("activation") is not None else nn.SiLU

    backbone_len = len(cfg["backbone"])
    channels = [ch_in]
    layers: list[LayerSpec] = []
    save: list[int] = []
    for i, (f, n, module, raw_args) in enumerate(cfg["backbone"] + cfg["head"]):
        where = _where(cfg, i)
        try:
            name = canonical_module_name(module)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
        froms = [f] if isinstance(f, int) else list(f)
        args = [resolve_arg(a, names) for a in raw_args]
        n = scale_depth(n, gd)
        if name in WIDTH_SCALED:
            if not isinstance(f, int):
                raise ConfigError(f"{where}: {name} takes one input, got from={f!r}")
            if not args or not _is_int(args[0]):
                raise ConfigError(f"{where}: {name} needs its output channels as the first argument, got {raw_args!r}")
            c1, c2 = channels[f], args[0]
            if c2 != no:
                c2 = scale_width(c2, gw, divisor)
            args = [c1, c2, *args[1:]]
            if name in REPEATS_INSIDE:
                args.insert(2, n)
        elif name == "Concat":
            c2 = sum(channels[x] for x in froms)
        elif name == "Detect":
            args = _detect_args(args, froms, channels, where)
            c2 = len(args[1][0]) // 2 * (args[0] + 5)
        elif isinstance(f, int):
            c2 = channels[f]
            if name == "nn.BatchNorm2d":
                args = [c2]
        else:
            raise ConfigError(f"{where}: {name} takes one input, got from={f!r}")
        layers.append(LayerSpec(
            index=i, from_=f, n=n, module=name,
            type=upstream_type(module_class(name)), args=args,
            section="backbone" if i < backbone_len else "head", channels=c2,
        ))
        save.extend(x % i for x in froms if x != -1)
        if i == 0:
            channels = []
        channels.append(c2)
    return ModelSpec(
        yaml=cfg, layers=tuple(layers), save=sorted(save), nc=nc, ch=ch_in, activation=activation,
        inplace=bool(cfg.get("inplace", True)), backbone_len=backbone_len,
    )


def _detect_args(args: list[Any], froms: list[int], channels: list[int], where: str) -> list[Any]:
    """Detect gets [nc, anchors, input widths]; an anchor count becomes placeholder pairs, as upstream."""
    if len(args) < 2 or not _is_int(args[0]) or args[0] < 1:
        raise ConfigError(f"{where}: Detect args are [nc, anchors], got {args!r}")
    args = list(args)
    if _is_int(args[1]):
        args[1] = [list(range(args[1] * 2))] * len(froms)
    _validate_anchors(args[1])
    if len(args[1]) != len(froms):
        raise ConfigError(f"{where}: Detect has {len(args[1])} anchor levels but {len(froms)} inputs {froms}")
    args.append([channels[x] for x in froms])
    return args
