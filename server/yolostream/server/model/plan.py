"""Truncated forwards: run only the layers that the requested features depend on.

Upstream runs every layer and keeps the outputs listed in ``save``. A feature request needs far less: the
dependency closure of the requested layers, stopping at the deepest one. Each intermediate output is dropped
as soon as its last consumer has run, so the peak memory of a truncated forward stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn


def layer_inputs(index: int, source: int | Sequence[int]) -> tuple[int, ...]:
    """Absolute indices of the layers whose outputs feed layer ``index``.

    A ``from`` entry of -1 means the previous layer; other negative entries count back from ``index``
    (upstream indexes its list of outputs, which holds exactly ``index`` entries at that point).
    """
    entries = [source] if isinstance(source, int) else list(source)
    return tuple(j if j >= 0 else index + j for j in entries)


@dataclass(frozen=True)
class ForwardPlan:
    """Which layers to run, in order, and when each intermediate output can be released."""

    targets: tuple[int, ...]
    steps: tuple[int, ...]
    release_after: dict[int, tuple[int, ...]]

    @property
    def deepest(self) -> int:
        return self.steps[-1]


def make_plan(layers: nn.Sequential, targets: Iterable[int]) -> ForwardPlan:
    """Plan the smallest forward that produces every layer in ``targets``.

    Raises ValueError for an index out of range or for the Detect head, which is never a feature layer.
    """
    wanted = sorted(set(int(t) for t in targets))
    if not wanted:
        raise ValueError("no layers requested")
    count = len(layers)
    for t in wanted:
        if not 0 <= t < count:
            raise ValueError(f"layer {t} does not exist: valid indices are 0..{count - 1}")
        if type(layers[t]).__name__ in ("Detect", "Segment"):
            raise ValueError(f"layer {t} is the Detect head, which is not a feature layer")

    needed: set[int] = set()
    stack = list(wanted)
    while stack:
        i = stack.pop()
        if i in needed:
            continue
        needed.add(i)
        if i > 0:
            stack.extend(layer_inputs(i, layers[i].f))
    steps = tuple(sorted(needed))

    last_use: dict[int, int] = {}
    for i in steps:
        if i > 0:
            for j in layer_inputs(i, layers[i].f):
                last_use[j] = max(last_use.get(j, i), i)
    keep = set(wanted)
    release: dict[int, list[int]] = {}
    for j, consumer in last_use.items():
        if j not in keep:
            release.setdefault(consumer, []).append(j)
    for i in steps:
        if i not in keep and i not in last_use:
            release.setdefault(i, []).append(i)
    return ForwardPlan(
        targets=tuple(wanted),
        steps=steps,
        release_after={k: tuple(sorted(v)) for k, v in release.items()},
    )


def run_plan(layers: nn.Sequential, x: torch.Tensor, plan: ForwardPlan) -> dict[int, torch.Tensor]:
    """Execute ``plan`` on input ``x``; return the target layers' outputs keyed by layer index."""
    outputs: dict[int, torch.Tensor] = {}
    for i in plan.steps:
        module = layers[i]
        if i == 0:
            value = module(x)
        else:
            sources = layer_inputs(i, module.f)
            if isinstance(module.f, int):
                value = module(outputs[sources[0]])
            else:
                value = module([outputs[j] for j in sources])
        outputs[i] = value
        for j in plan.release_after.get(i, ()):
            del outputs[j]
    return {t: outputs[t] for t in plan.targets}
