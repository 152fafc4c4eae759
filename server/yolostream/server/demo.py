"""``make demo``: the main job on the built-in default, with nothing to download.

Generates a test image of coloured shapes, prints the layer catalogue of the built-in yolov5n (random weights),
extracts ``backbone`` and ``P3,P4,P5`` features offline and prints each tensor's shape and statistics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from . import cli

OUT = Path("demo-out")


def make_image(path: Path, height: int = 480, width: int = 640) -> Path:
    """A deterministic picture of shapes on a gradient, so the demo needs no files."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 96)], axis=-1).astype(np.uint8)
    cv2.circle(img, (180, 200), 90, (40, 200, 240), -1)
    cv2.rectangle(img, (360, 120), (560, 330), (220, 60, 60), -1)
    cv2.line(img, (40, 440), (600, 380), (255, 255, 255), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path


def main() -> int:
    image = make_image(OUT / "shapes.png")
    print(f"== layer catalogue: yolostream layers --imgsz 320\n", flush=True)
    if cli.main(["layers", "--imgsz", "320"]):
        return 1
    print(f"\n== offline extract: yolostream extract --layers backbone,P3,P4,P5 {image}\n", flush=True)
    if cli.main(["extract", "--imgsz", "320", "--device", "cpu", "--layers", "backbone,P3,P4,P5",
                 "--out", str(OUT / "features"), str(image)]):
        return 1
    with np.load(OUT / "features" / "shapes.npz") as data:
        print(f"\n{OUT / 'features' / 'shapes.npz'}:")
        for key in data.files:
            a = data[key]
            if key.startswith("meta_"):
                print(f"  {key:<20} {a.tolist()}")
            else:
                print(f"  {key:<20} {str(a.shape):<16} mean {a.mean():+.4f}  std {a.std():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
