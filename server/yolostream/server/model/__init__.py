"""Pure-PyTorch YOLOv5 graphs: YAML configs, modules under upstream's names, and the layer graph."""

from .config import load_config
from .graph import YoloModel, build_model

__all__ = ["YoloModel", "build_model", "load_config"]
