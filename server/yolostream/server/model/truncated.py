"""A truncated forward as an ``nn.Module``: the one object that the library API, ``export`` and the server run.

``make_plan``/``run_plan`` (plan.py) decide and execute which layers run; this module packages one plan with the
layers it needs so that it can be trained, hooked, compiled, traced and exported like any other network:

- it holds exactly the layers of the dependency closure (other slots up to the deepest layer are empty
  ``nn.Identity`` placeholders), so ``parameters()`` is what the requested features depend on, an optimizer sees
  nothing else, and nothing past the deepest requested layer (never Detect) exists in it;
- its ``state_dict`` keys are upstream's (``model.<i>.…``), so a checkpoint's state_dict loads into it with
  ``strict=False`` and its own keys are a subset of the full model's;
- ``forward`` is straight-line code over a fixed plan: ``torch.compile(fullgraph=True)``, ``torch.jit.trace``
  and ``torch.export`` all capture it as one graph with no Python control flow depending on the data.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Mapping

import torch
from torch import nn

from .plan import ForwardPlan, make_plan, run_plan


class TruncatedModel(nn.Module):
    """The layers that ``outputs`` depend on, run as one truncated forward.

    Args:
        layers: the model's layer list (``YoloModel.model``); its modules are shared, not copied, so fusing,
            moving or training them here changes them there too.
        outputs: the outputs to return, in order: a mapping of output key → layer index (several keys may share
            one layer, e.g. ``backbone`` and ``C5``; an int key stays an int, any other key becomes a str), or layer
            indices (named by their decimal string).

    Raises ValueError for an empty request, an index out of range or the Detect head (see ``make_plan``).
    """

    def __init__(self, layers: nn.Sequential, outputs: Mapping[str | int, int] | Iterable[int]) -> None:
        super().__init__()
        if isinstance(outputs, Mapping):
            named = {_output_key(name): int(index) for name, index in outputs.items()}
        else:
            named = {str(int(index)): int(index) for index in outputs}
        plan = make_plan(layers, named.values())
        needed = set(plan.steps)
        self.model = nn.Sequential(*(layers[i] if i in needed else nn.Identity() for i in range(plan.deepest + 1)))
        self.plan: ForwardPlan = plan
        self.output_names: tuple[str | int, ...] = tuple(named)
        self.output_indices: tuple[int, ...] = tuple(named.values())

    def forward(self, x: torch.Tensor) -> dict[str | int, torch.Tensor]:
        """Run the closure on ``x`` (N, 3, H, W) in the model's dtype; return key → output, in requested order."""
        by_index = run_plan(self.model, x, self.plan)
        return {name: by_index[i] for name, i in zip(self.output_names, self.output_indices)}

    def by_index(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """The same forward, keyed by layer index (each layer once): what the server's device runner consumes."""
        return run_plan(self.model, x, self.plan)

    def export(self, example: torch.Tensor, dynamic_batch: bool = True) -> torch.export.ExportedProgram:
        """Capture this forward with ``torch.export`` for an input shaped like ``example`` (N, 3, H, W).

        Args:
            example: an input of the shape (and dtype, device) to specialise on; with ``dynamic_batch`` its batch
                size must be at least 2, because export specialises dimensions of size 0 or 1.
            dynamic_batch: leave the batch dimension symbolic, so the program accepts any batch size.
        """
        if dynamic_batch and example.shape[0] < 2:
            raise ValueError("export with a dynamic batch needs an example batch of at least 2 (export "
                             f"specialises a batch of 1), got shape {tuple(example.shape)}")
        shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
        return torch.export.export(self, (example,), dynamic_shapes=shapes)


def _output_key(name: object) -> str | int:
    """An output's key: ints (``numbers.Integral``, not bool) stay ints, so ``out[9]`` works; the rest are str."""
    if isinstance(name, numbers.Integral) and not isinstance(name, bool):
        return int(name)
    return str(name)
