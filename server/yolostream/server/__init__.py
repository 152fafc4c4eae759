"""yolostream server: model, engine, batcher and gRPC service; ``feature_extractor`` for use in your own code.

``feature_extractor`` and ``FeatureExtractor`` are imported on first use, so ``import yolostream.server`` stays
free of torch (the ``yolostream`` command and torch-free client installs import this package).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FeatureExtractor", "feature_extractor"]


def __getattr__(name: str) -> Any:
    """Resolve the public extractor names lazily (PEP 562)."""
    if name in __all__:
        from .offline import extractor

        return getattr(extractor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
