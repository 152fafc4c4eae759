"""One entry point from what the user names (weights, a state_dict plus a YAML, or a YAML alone) to a model.

The architecture always comes from a YAML: the pickled model's own ``yaml`` for official files, the user's
``--cfg`` otherwise. Weights are copied key-for-key into our modules; any mismatch is reported in full rather
than half-loaded, because a silently partial load gives plausible-looking but wrong features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..common.errors import UserError, one_line
from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_file
from .config import load_config
from .download import resolve_weights
from .graph import YoloModel, build_model

log = logging.getLogger(__name__)

DEFAULT_CFG = "yolov5n"
RANDOM_WEIGHTS_WARNING = "RANDOM WEIGHTS: no checkpoint given; features are for testing only, not meaningful"


class WeightsMismatchError(UserError):
    """The checkpoint's keys or shapes do not fit the architecture built from its YAML."""

#: Keys of each kind a mismatch message lists; the count says how many more there are.
LISTED_KEYS = 8


@dataclass
class LoadedModel:
    """A built model plus where it came from, so every output can say whether its weights are real.

    ``class_names`` are the names the checkpoint (or its YAML) carries, index = class id; empty when it carries
    none, so a server reports names only when they are real.
    """

    model: YoloModel
    name: str
    source: str
    random_weights: bool
    info: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)


def load_model(
    weights: str | Path | None = None,
    cfg: str | Path | dict | None = None,
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Build a model from ``weights`` and/or ``cfg``; neither gives the built-in default with seeded random weights.

    - official ``.pt`` (release or mid-training; ``ema`` preferred): architecture from the pickle's ``yaml``;
    - plain state_dict file plus ``cfg``;
    - ``cfg`` alone: seeded random weights (flagged ``random_weights``).
    """
    if weights is None:
        config = load_config(cfg if cfg is not None else DEFAULT_CFG)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(config)
            _randomise(model)
        log.warning(RANDOM_WEIGHTS_WARNING)
        name = _name_of(cfg if cfg is not None else DEFAULT_CFG, config)
        return LoadedModel(model.eval(), name, f"cfg:{name} (random weights, seed {seed})", True, {"seed": seed},
                           _yaml_names(model))

    path = resolve_weights(str(weights), cache_dir=cache_dir, progress=progress)
    if cfg is not None:
        config = load_config(cfg)
        model = build_model(config)
        _load_weights(model, load_state_dict_file(path), path)
        return LoadedModel(model.eval(), _name_of(cfg, config), str(path), False, {"format": "state_dict"},
                           _yaml_names(model))

    ckpt = load_checkpoint(path)
    if not ckpt.yaml:
        raise CheckpointError(f"{path} holds a model without its architecture (no 'yaml' attribute): "
                              "pass the matching --cfg and a state_dict instead")
    try:
        model = build_model(ckpt.yaml)
        _load_weights(model, ckpt.state_dict, path)
        _install_activations(model, ckpt.activations, path)
    except WeightsMismatchError:
        raise
    except UserError as err:  # the YAML inside the file is invalid
        raise CheckpointError(f"{path}: the model config inside it is invalid: {err}") from err
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError) as err:
        # Everything here comes from the file (its YAML, tensors and activations): a surprise is the file's fault.
        raise CheckpointError(f"{path}: the model it describes cannot be built "
                              f"({type(err).__name__}: {one_line(str(err), 300)})") from err
    if ckpt.names:
        model.names = list(ckpt.names)
    info = dict(ckpt.info)
    info["weights_from"] = ckpt.source_key
    names = list(ckpt.names) if ckpt.names_given else _yaml_names(model)
    return LoadedModel(model.eval(), Path(path).stem, str(path), False, info, names)


def _yaml_names(model: YoloModel) -> list[str]:
    """Class names from the model's YAML ``names`` (a list, or a dict of id → name, one per class), else []."""
    names = model.yaml.get("names") if isinstance(model.yaml, dict) else None
    if isinstance(names, (list, dict)) and len(names) == model.nc:
        return [model.names[i] for i in range(model.nc)]
    return []


def _randomise(model: nn.Module) -> None:
    """He-normal conv weights and BN statistics calibrated on one seeded random batch.

    With PyTorch's default init a random yolov5n's deep features shrink to ~1e-6: useless for a demo and below
    float16's normal range in tests. Each BN's statistics are set, in forward order during one eval-mode pass, from
    the input it actually sees, so every layer is normalised given its already-calibrated predecessors and
    activations stay O(1), as with trained weights.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def calibrate(bn: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].double()
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    threads = torch.get_num_threads()
    try:
        # One thread: parallel reductions sum in an order that depends on the thread count, and "seeded" must
        # mean the same weights in every process (a server and an offline extract are compared bit for bit).
        torch.set_num_threads(1)
        model.eval()
        with torch.no_grad():
            model(torch.rand(2, 3, 256, 256))
    finally:
        torch.set_num_threads(threads)
        for hook in hooks:
            hook.remove()


def _name_of(cfg: str | Path | dict, config: dict) -> str:
    if isinstance(cfg, dict):
        return str(config.get("yaml_file", "custom")).rsplit("/", 1)[-1].removesuffix(".yaml")
    return Path(str(cfg)).name.removesuffix(".yaml")


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every tensor in; refuse (listing every key) if the names or shapes differ."""
    own = model.state_dict()
    incoming = {k: v for k, v in state_dict.items() if not k.endswith(".anchor_grid")}
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    wrong_shape = sorted(
        f"{k}: file {tuple(incoming[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(incoming)
        if tuple(own[k].shape) != tuple(incoming[k].shape)
    )
    if missing or unexpected or wrong_shape:
        parts = [f"weights in {path} do not match the architecture"]
        for what, keys, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                                ("shape mismatches", wrong_shape, "; ")):
            if keys:
                more = f"{sep}… {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else ""
                parts.append(f"{what} ({len(keys)}): {sep.join(keys[:LISTED_KEYS])}{more}")
        raise WeightsMismatchError(" | ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    model.float()


def _install_activations(model: nn.Module, activations: dict[str, nn.Module], path: Path) -> None:
    """Use the activation each module was pickled with (LeakyReLU in v2, Hardswish in v3, SiLU later)."""
    for dotted, act in activations.items():
        parent_name, _, attr = dotted.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError as err:
            raise WeightsMismatchError(f"{path}: activation {dotted} has no matching module in the model") from err
        if not hasattr(parent, attr):
            raise WeightsMismatchError(f"{path}: activation {dotted} has no matching module in the model")
        setattr(parent, attr, _fresh_activation(act, dotted, path))


def _fresh_activation(act: nn.Module, dotted: str, path: Path) -> nn.Module:
    """A new activation of the pickled kind: files from torch 1.x lack attributes newer torch reads (``inplace``)."""
    kind = type(act).__name__
    if kind == "LeakyReLU":
        return nn.LeakyReLU(float(getattr(act, "negative_slope", 0.01)))
    if kind in ("SiLU", "Hardswish", "ReLU", "ReLU6", "Identity", "Sigmoid", "Mish", "GELU", "Tanh"):
        return getattr(nn, kind)()
    raise WeightsMismatchError(f"{path}: activation {dotted} is {kind}, which yolostream does not support")
