"""The model card: everything about the served model that is data, not torch.

The device process builds the model and derives this card from it once; front-end processes, ``GetModelInfo``
and the CLI read only the card. It holds the model's identity (name, source, random-weights flag), where and how
it runs (device, dtype), its geometry (stride, default input size and letterbox policy) and the layer catalogue
with the names a request may use. It crosses processes as a plain dict, so front-ends never import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from yolostream.v1 import vocab

from .errors import quote
from .preprocess import input_shape

ROLES = tuple(vocab.ROLES)


@dataclass(frozen=True)
class LayerInfo:
    """One row of the catalogue: what a client needs to ask for a layer and interpret its tensor."""

    index: int
    type: str
    source: tuple[int, ...]
    params: int
    role: str
    out_channels: int
    stride: int
    shape: tuple[int, ...]
    aliases: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "type": self.type,
            "from": list(self.source),
            "params": self.params,
            "role": self.role,
            "out_channels": self.out_channels,
            "stride": self.stride,
            "shape": list(self.shape),
            "aliases": list(self.aliases),
        }


@dataclass(frozen=True)
class ResolvedLayer:
    """A requested name bound to its layer: tensors go back under the name the client used."""

    name: str
    index: int
    stride: int


def alias_table(catalogue: Sequence[LayerInfo]) -> dict[str, int]:
    """Map every alias (``backbone``, ``C4``, ``P3`` …) to its layer index."""
    return {alias: row.index for row in catalogue for alias in row.aliases}


def resolve_layers(catalogue: Sequence[LayerInfo], requested: Iterable[str | int]) -> list[ResolvedLayer]:
    """Bind requested names to layers; ``all`` expands to every layer except Detect, keyed by index.

    Unknown names raise ValueError that lists the valid choices, because a typo in a stream config must end that
    stream with a message the user can act on.
    """
    by_alias = {k.lower(): v for k, v in alias_table(catalogue).items()}
    by_index = {row.index: row for row in catalogue}
    features = [row for row in catalogue if row.role != "detect"]
    resolved: list[ResolvedLayer] = []
    seen: set[str] = set()
    items = list(requested)
    if not items:
        raise ValueError("no layers requested: " + _choices(catalogue))
    for item in items:
        text = str(item).strip()
        if text.lower() == "all":
            group = [ResolvedLayer(str(r.index), r.index, r.stride) for r in features]
        else:
            index = _parse_index(text, by_alias, len(catalogue))
            if index is None:
                raise ValueError(f"unknown layer {quote(text)}: " + _choices(catalogue))
            row = by_index[index]
            if row.role == "detect":
                raise ValueError(f"layer {index} is the Detect head, not a feature layer: " + _choices(catalogue))
            group = [ResolvedLayer(text, index, row.stride)]
        for layer in group:
            if layer.name not in seen:
                seen.add(layer.name)
                resolved.append(layer)
    return resolved


def _parse_index(text: str, by_alias: dict[str, int], count: int) -> int | None:
    if text.lower() in by_alias:
        return by_alias[text.lower()]
    try:
        index = int(text)
    except ValueError:
        return None
    return index if 0 <= index < count else None


def _choices(catalogue: Sequence[LayerInfo]) -> str:
    features = [row.index for row in catalogue if row.role != "detect"]
    names = sorted(alias_table(catalogue), key=lambda a: (a != "backbone", a))
    return f"valid layers are indices {features[0]}..{features[-1]}, 'all', or names {', '.join(names)}"


@dataclass(frozen=True)
class ModelCard:
    """The served model as data. ``catalogue`` is described for the default input size ``imgsz``."""

    name: str
    source: str
    random_weights: bool
    device: str
    dtype: str
    stride: int
    imgsz: int
    letterbox: str
    catalogue: tuple[LayerInfo, ...]
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    backend: str = "torch"
    #: What the start-up check measured (``device.self_check``), e.g. the worst relative error against the reference.
    startup_check: str = ""

    def input_hw(self, imgsz: int | None = None) -> tuple[int, int]:
        """The square model input for ``imgsz`` (default: the card's), rounded up to the stride as upstream."""
        return input_shape(imgsz or self.imgsz, self.stride)

    def resolve(self, names: Iterable[str | int]) -> list[ResolvedLayer]:
        """Requested names → layers; ValueError lists the valid names (see ``resolve_layers``)."""
        return resolve_layers(self.catalogue, names)

    def channels(self, index: int) -> int:
        """Output channels of layer ``index`` (independent of the input size)."""
        return self.catalogue[index].out_channels

    @property
    def detect_inputs(self) -> tuple[int, ...]:
        """Indices of the layers feeding Detect (P3, P4, P5[, P6]) in level order; empty without a Detect head."""
        return next((row.source for row in self.catalogue if row.role == "detect"), ())

    def default_object_layers(self) -> list[ResolvedLayer]:
        """The layers object vectors are read from by default: Detect's inputs, named P<log2 stride>."""
        rows = [self.catalogue[j] for j in self.detect_inputs]
        return [ResolvedLayer(f"P{row.stride.bit_length() - 1}", row.index, row.stride) for row in rows]

    @property
    def deepest_feature(self) -> int:
        """Index of the last layer that is not the Detect head (what warm-up runs to)."""
        return max(row.index for row in self.catalogue if row.role != "detect")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, numbers, strings) that crosses a process boundary or becomes JSON."""
        out = asdict(self)
        out["catalogue"] = [row.as_dict() for row in self.catalogue]
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "ModelCard":
        rows = tuple(
            LayerInfo(index=r["index"], type=r["type"], source=tuple(r["from"]), params=r["params"], role=r["role"],
                      out_channels=r["out_channels"], stride=r["stride"], shape=tuple(r["shape"]),
                      aliases=tuple(r["aliases"]))
            for r in data["catalogue"]
        )
        fields = {k: v for k, v in data.items() if k not in ("catalogue", "class_names")}
        return ModelCard(**fields, catalogue=rows, class_names=tuple(data.get("class_names", ())))
