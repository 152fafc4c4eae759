"""The building blocks of YOLOv5 graphs, re-implemented from the published architecture.

Class names and attribute names are an interface: they must equal upstream's so that a checkpoint's
state_dict keys (``model.2.cv1.bn.running_var`` …) map 1:1 onto these modules. The arithmetic follows the
module semantics recorded in shared/UPSTREAM_FACTS.md §3.

Conv's default activation is not a class attribute (upstream's ``Conv.default_act`` leaks a YAML's
``activation:`` into every later build in the process). It lives in a ContextVar that ``build_model`` sets for
the duration of one build only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.03

ActivationFactory = Callable[[], nn.Module]
Size = int | Sequence[int]

_default_activation: ContextVar[ActivationFactory] = ContextVar("yolostream_default_activation", default=nn.SiLU)


@contextmanager
def default_activation(factory: ActivationFactory) -> Iterator[None]:
    """Make ``factory`` the activation of every ``Conv(act=True)`` created inside the block (this context only)."""
    token = _default_activation.set(factory)
    try:
        yield
    finally:
        _default_activation.reset(token)


def _activation(act: bool | nn.Module) -> nn.Module:
    if act is True:
        return _default_activation.get()()
    if isinstance(act, nn.Module):
        return act
    return nn.Identity()


def _pair(value: Size) -> int | list[int]:
    return value if isinstance(value, int) else list(value)


def autopad(k: Size, p: Size | None = None, d: int = 1) -> int | list[int]:
    """'Same' padding for odd kernels: half the effective (dilated) kernel, per dimension for tuple kernels."""
    if p is not None:
        return _pair(p)
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    return k // 2 if isinstance(k, int) else [x // 2 for x in k]


def batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with YOLOv5's eps and momentum; torch's default eps (1e-5) gives visibly wrong features."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class Conv(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → activation; after ``fuse()`` the BN lives in the conv's weight and bias."""

    def __init__(self, c1: int, c2: int, k: Size = 1, s: Size = 1, p: Size | None = None, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = batchnorm(c2)
        self.act = _activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @property
    def fused(self) -> bool:
        return not isinstance(self.bn, nn.BatchNorm2d)

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the BN (inference statistics) into the conv; the BN is replaced by Identity (no state_dict keys)."""
        if self.fused:
            return
        self.conv = fold_batchnorm(self.conv, self.bn)
        self.bn = nn.Identity()


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias computing ``bn(conv(x))`` in eval mode; the arithmetic runs in float64 to lose nothing."""
    weight = conv.weight.detach()
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    bias = torch.zeros_like(bn.running_mean, dtype=torch.float64) if conv.bias is None else conv.bias.detach().double()
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
        padding_mode=conv.padding_mode, device=weight.device, dtype=weight.dtype,
    )
    fused.weight.copy_((weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype))
    fused.bias.copy_(((bias - bn.running_mean.double()) * scale + bn.bias.detach().double()).to(weight.dtype))
    fused.requires_grad_(conv.weight.requires_grad)
    return fused


def fuse_model(model: nn.Module) -> nn.Module:
    """Fuse every Conv/DWConv in the tree in place (BottleneckCSP's standalone BN stays, as upstream); returns it."""
    for module in model.modules():
        if isinstance(module, Conv):
            module.fuse()
    return model


class DWConv(Conv):
    """Depth-wise convolution: a Conv whose groups are gcd(c1, c2)."""

    def __init__(self, c1: int, c2: int, k: Size = 1, s: Size = 1, d: int = 1, act: bool | nn.Module = True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class Bottleneck(nn.Module):
    """1×1 squeeze then 3×3 conv, with the input added back when the shapes allow it."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: cv3(cat(m(cv1(x)), cv2(x))); subclasses swap the inner ``m``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class CrossConv(nn.Module):
    """A k×k conv factorised into 1×k then k×1, with an optional residual."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1, g: int = 1, e: float = 1.0, shortcut: bool = False):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, (1, k), (1, s))
        self.cv2 = Conv(c_, c2, (k, 1), (s, 1), g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3x(C3):
    """C3 with CrossConv blocks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(CrossConv(c_, c_, 3, 1, g, 1.0, shortcut) for _ in range(n)))


class SPP(nn.Module):
    """Spatial pyramid pooling (v5 and earlier): parallel max-pools of several sizes on one reduced map."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13)):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [pool(x) for pool in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: one max-pool applied three times in sequence (receptive fields k, 2k-1, 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        p1 = self.m(x)
        p2 = self.m(p1)
        return self.cv2(torch.cat((x, p1, p2, self.m(p2)), 1))


class C3SPP(C3):
    """C3 with an SPP as its inner block."""

    def __init__(self, c1: int, c2: int, k: Sequence[int] = (5, 9, 13), n: int = 1, shortcut: bool = True,
                 g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = SPP(c_, c_, k)


class Focus(nn.Module):
    """Space-to-depth stem (v5 and earlier): four pixel phases stacked on channels, then a Conv."""

    def __init__(self, c1: int, c2: int, k: Size = 1, s: Size = 1, p: Size | None = None, g: int = 1,
                 act: bool | nn.Module = True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phases = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(torch.cat(phases, 1))


class BottleneckCSP(nn.Module):
    """The original CSP bottleneck (v2–v3): bare 1×1 convs, one standalone BN over the concatenation."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = nn.Conv2d(c1, c_, 1, 1, bias=False)
        self.cv3 = nn.Conv2d(c_, c_, 1, 1, bias=False)
        self.cv4 = Conv(2 * c_, c2, 1, 1)
        self.bn = batchnorm(2 * c_)
        self.act = nn.SiLU()
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.cv3(self.m(self.cv1(x)))
        y2 = self.cv2(x)
        return self.cv4(self.act(self.bn(torch.cat((y1, y2), 1))))


class GhostConv(nn.Module):
    """Half the channels from a regular conv, the other half from a cheap 5×5 depth-wise conv on those."""

    def __init__(self, c1: int, c2: int, k: Size = 1, s: Size = 1, g: int = 1, act: bool | nn.Module = True):
        super().__init__()
        c_ = c2 // 2
        self.cv1 = Conv(c1, c_, k, s, None, g, act=act)
        self.cv2 = Conv(c_, c_, 5, 1, None, c_, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


class GhostBottleneck(nn.Module):
    """Ghost conv → (strided depth-wise conv) → ghost conv, plus an identity or strided shortcut."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__()
        c_ = c2 // 2
        self.conv = nn.Sequential(
            GhostConv(c1, c_, 1, 1),
            DWConv(c_, c_, k, s, act=False) if s == 2 else nn.Identity(),
            GhostConv(c_, c2, 1, 1, act=False),
        )
        self.shortcut = (
            nn.Sequential(DWConv(c1, c1, k, s, act=False), Conv(c1, c2, 1, 1, act=False)) if s == 2 else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shortcut(x)


class C3Ghost(C3):
    """C3 with GhostBottlenecks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = nn.Sequential(*(GhostBottleneck(c_, c_) for _ in range(n)))


class TransformerLayer(nn.Module):
    """Self-attention and a two-layer linear block, each with a residual; no layer norms."""

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
        return self.fc2(self.fc1(x)) + x


class TransformerBlock(nn.Module):
    """Treat every pixel as a token: optional channel-matching Conv, learnable position term, transformer layers."""

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int):
        super().__init__()
        self.conv = Conv(c1, c2) if c1 != c2 else None
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        b, _, w, h = x.shape
        p = x.flatten(2).permute(2, 0, 1)
        return self.tr(p + self.linear(p)).permute(1, 2, 0).reshape(b, self.c2, w, h)


class C3TR(C3):
    """C3 with a 4-head TransformerBlock of n layers as its inner block."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__(c1, c2, n, shortcut, g, e)
        c_ = int(c2 * e)
        self.m = TransformerBlock(c_, c_, 4, n)


class Concat(nn.Module):
    """Concatenate the inputs in the order the YAML's ``from`` lists them."""

    def __init__(self, dimension: int = 1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Detect(nn.Module):
    """Per-level 1×1 output convs plus the box decode.

    ``anchors`` is a buffer in grid units (pixels / stride) once ``build_model`` has set ``stride``. The grid is
    rebuilt for every input size: the ``grid``/``anchor_grid`` caches found in checkpoints are stale by design.
    Training mode returns the raw maps only; eval returns ``(decoded, raw)``.
    """

    def __init__(self, nc: int = 80, anchors: Sequence[Sequence[float]] = (), ch: Sequence[int] = (),
                 inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        # Not persistent: upstream keeps stride out of the state_dict; a buffer still follows .to()/.half().
        self.register_buffer("stride", torch.zeros(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        raw: list[torch.Tensor] = []
        decoded: list[torch.Tensor] = []
        for i in range(self.nl):
            t = self.m[i](x[i])
            bs, _, ny, nx = t.shape
            t = t.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(t)
            if not self.training:
                grid, anchor_grid = self._make_grid(nx, ny, i)
                xy, wh, conf = t.sigmoid().split((2, 2, self.nc + 1), 4)
                xy = (xy * 2 + grid) * self.stride[i]
                wh = (wh * 2) ** 2 * anchor_grid
                decoded.append(torch.cat((xy, wh, conf), 4).view(bs, self.na * ny * nx, self.no))
        if self.training:
            return raw
        return torch.cat(decoded, 1), raw

    def _make_grid(self, nx: int, ny: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell offsets (x, y) − 0.5 and the level's anchors in pixels, both broadcast to (1, na, ny, nx, 2)."""
        device, dtype = self.anchors.device, self.anchors.dtype
        shape = (1, self.na, ny, nx, 2)
        yv, xv = torch.meshgrid(
            torch.arange(ny, device=device, dtype=dtype), torch.arange(nx, device=device, dtype=dtype), indexing="ij"
        )
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # v2–v5 files registered the pixel-anchor cache as a buffer; it is derived data, so drop it.
        state_dict.pop(prefix + "anchor_grid", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
