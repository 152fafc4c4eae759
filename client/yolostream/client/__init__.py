"""The yolostream client: stream video to a feature server and get numpy arrays back.

Needs grpcio, protobuf, numpy and OpenCV only — never torch — so it runs on a small camera-side computer::

    from yolostream.client import FeatureClient, open_source

    with FeatureClient("127.0.0.1:50051") as client, open_source("0") as camera:
        for result in client.stream(camera, layers="P3,P4,P5", realtime=True):
            p3 = result.features["P3"]  # (C, H, W) float32, a zero-copy view of the reply

Several replicas: ``FeatureClient(["10.0.0.5:50051", "10.0.0.6:50051"])`` or ``FeatureClient("dns:///name:50051")``
balances streams over the healthy ones and moves a stream to another when its replica fails (``ResumePolicy``).

Same host: ``FeatureClient("unix:///run/ys.sock", shared_memory=True)`` sends raw frames and gets the features
through memory shared with the server (started with ``--allow-client-shm``); results are views of that memory.
"""

from .client import FeatureClient
from .options import DetectOptions, ObjectFeatureOptions, TrackOptions
from .results import Detections, FeatureResult, FeatureServerError, FrameError, LayerInfo, ModelInfo, TensorInfo
from .stream import FeatureStream
from .resume import ResumePolicy
from .sources import ImageFile, Source, SourceError, open_source
from .store import CodedRows, FeatureWriter, SavedFeatures, load_features

__all__ = [
    "CodedRows",
    "DetectOptions",
    "Detections",
    "FeatureClient",
    "FeatureResult",
    "FeatureServerError",
    "FeatureStream",
    "FeatureWriter",
    "FrameError",
    "ImageFile",
    "LayerInfo",
    "ModelInfo",
    "ObjectFeatureOptions",
    "ResumePolicy",
    "SavedFeatures",
    "Source",
    "SourceError",
    "TensorInfo",
    "TrackOptions",
    "load_features",
    "open_source",
]
