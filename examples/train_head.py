"""Train a small segmentation head on frozen YOLOv5 P3-P5 features (or fine-tune the backbone with --finetune).

    python examples/train_head.py --weights yolov5s.pt --steps 200

The data here is synthetic, so the script runs anywhere: random RGB images in [0, 1] whose per-pixel label is the
brightness band of the pixel. Replace ``synthetic_batch`` with your DataLoader (RGB float in [0, 1], (N, 3, H, W),
H and W multiples of 32) and your labels. The head and the layers it was trained on are saved to ``--out``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from yolostream.server import feature_extractor


class SegmentationHead(nn.Module):
    """Per-pixel class logits from a feature pyramid: a 1x1 conv per level, summed on the finest grid, upsampled."""

    def __init__(self, channels: list[int], classes: int, finest_stride: int, width: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.classify = nn.Sequential(nn.SiLU(), nn.Conv2d(width, classes, 3, padding=1))
        self.finest_stride = finest_stride

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        levels = list(features.values())
        size = levels[0].shape[-2:]
        fused = sum(F.interpolate(conv(f), size=size, mode="nearest") for conv, f in zip(self.lateral, levels))
        return F.interpolate(self.classify(fused), scale_factor=self.finest_stride, mode="bilinear")


def synthetic_batch(generator: torch.Generator, batch: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and a learnable per-pixel label: the brightness band (of ``classes``) of a blurred image."""
    images = F.avg_pool2d(torch.rand(batch, 3, size, size, generator=generator), 9, stride=1, padding=4)
    images = (images - images.amin()) / (images.amax() - images.amin())
    labels = (images.mean(1) * classes).long().clamp(max=classes - 1)
    return images, labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="yolov5s.pt", help="official YOLOv5 .pt (downloaded if a release name)")
    parser.add_argument("--layers", default="P3,P4,P5", help="feature layers, finest first")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--finetune", action="store_true", help="train the backbone too, at a tenth of the lr")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="head.pt")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    backbone = feature_extractor(weights=args.weights, layers=args.layers.split(","), trainable=args.finetune)
    info = backbone.feature_info
    print("features:", ", ".join(f"{f.name}=layer {f.index} ({f.channels} ch, stride {f.stride})" for f in info))
    head = SegmentationHead(info.channels(), args.classes, info.strides()[0])
    groups = [{"params": head.parameters(), "lr": args.lr}]
    if args.finetune:
        groups.append({"params": backbone.parameters(), "lr": args.lr / 10})
    optimizer = torch.optim.AdamW(groups)

    data = torch.Generator().manual_seed(args.seed)
    backbone.train()  # BatchNorm trains only when fine-tuning; a frozen extractor stays in eval mode
    for step in range(1, args.steps + 1):
        images, labels = synthetic_batch(data, args.batch, args.imgsz, args.classes)
        with torch.set_grad_enabled(args.finetune):
            features = backbone(images)
        loss = F.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}/{args.steps}  loss {loss.item():.4f}")

    torch.save({"head": head.state_dict(), "feature_info": [asdict(f) for f in info], "weights": args.weights,
                "backbone": backbone.state_dict() if args.finetune else None}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
