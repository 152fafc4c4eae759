from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_UINT8_AFFINE: _ClassVar[Dtype]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_UNSPECIFIED: _ClassVar[Compression]
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_SHUFFLE_ZSTD: _ClassVar[Compression]

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_GLOBAL_AVG: _ClassVar[Pooling]
    POOLING_GLOBAL_MAX: _ClassVar[Pooling]

class LetterboxPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LETTERBOX_POLICY_UNSPECIFIED: _ClassVar[LetterboxPolicy]
    LETTERBOX_POLICY_AUTO: _ClassVar[LetterboxPolicy]
    LETTERBOX_POLICY_SQUARE: _ClassVar[LetterboxPolicy]

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_BGR: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB: _ClassVar[PixelFormat]
    PIXEL_FORMAT_GRAY: _ClassVar[PixelFormat]

class FrameStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_STATUS_UNSPECIFIED: _ClassVar[FrameStatus]
    FRAME_STATUS_OK: _ClassVar[FrameStatus]
    FRAME_STATUS_ERROR: _ClassVar[FrameStatus]
    FRAME_STATUS_DROPPED: _ClassVar[FrameStatus]

class LayerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LAYER_ROLE_UNSPECIFIED: _ClassVar[LayerRole]
    LAYER_ROLE_BACKBONE: _ClassVar[LayerRole]
    LAYER_ROLE_NECK: _ClassVar[LayerRole]
    LAYER_ROLE_DETECT: _ClassVar[LayerRole]

class ObjectFeatureMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECT_FEATURE_MODE_UNSPECIFIED: _ClassVar[ObjectFeatureMode]
    OBJECT_FEATURE_MODE_NONE: _ClassVar[ObjectFeatureMode]
    OBJECT_FEATURE_MODE_ANCHOR: _ClassVar[ObjectFeatureMode]
    OBJECT_FEATURE_MODE_ROI: _ClassVar[ObjectFeatureMode]

class BoxSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BOX_SOURCE_UNSPECIFIED: _ClassVar[BoxSource]
    BOX_SOURCE_DETECTOR: _ClassVar[BoxSource]
    BOX_SOURCE_CLIENT: _ClassVar[BoxSource]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_UINT8_AFFINE: Dtype
COMPRESSION_UNSPECIFIED: Compression
COMPRESSION_NONE: Compression
COMPRESSION_SHUFFLE_ZSTD: Compression
POOLING_UNSPECIFIED: Pooling
POOLING_NONE: Pooling
POOLING_GLOBAL_AVG: Pooling
POOLING_GLOBAL_MAX: Pooling
LETTERBOX_POLICY_UNSPECIFIED: LetterboxPolicy
LETTERBOX_POLICY_AUTO: LetterboxPolicy
LETTERBOX_POLICY_SQUARE: LetterboxPolicy
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_BGR: PixelFormat
PIXEL_FORMAT_RGB: PixelFormat
PIXEL_FORMAT_GRAY: PixelFormat
FRAME_STATUS_UNSPECIFIED: FrameStatus
FRAME_STATUS_OK: FrameStatus
FRAME_STATUS_ERROR: FrameStatus
FRAME_STATUS_DROPPED: FrameStatus
LAYER_ROLE_UNSPECIFIED: LayerRole
LAYER_ROLE_BACKBONE: LayerRole
LAYER_ROLE_NECK: LayerRole
LAYER_ROLE_DETECT: LayerRole
OBJECT_FEATURE_MODE_UNSPECIFIED: ObjectFeatureMode
OBJECT_FEATURE_MODE_NONE: ObjectFeatureMode
OBJECT_FEATURE_MODE_ANCHOR: ObjectFeatureMode
OBJECT_FEATURE_MODE_ROI: ObjectFeatureMode
BOX_SOURCE_UNSPECIFIED: BoxSource
BOX_SOURCE_DETECTOR: BoxSource
BOX_SOURCE_CLIENT: BoxSource

class DetectionOptions(_message.Message):
    __slots__ = ("enabled", "conf_thres", "iou_thres", "classes", "agnostic", "multi_label", "max_det")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CONF_THRES_FIELD_NUMBER: _ClassVar[int]
    IOU_THRES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    AGNOSTIC_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    MAX_DET_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    conf_thres: float
    iou_thres: float
    classes: _containers.RepeatedScalarFieldContainer[int]
    agnostic: bool
    multi_label: bool
    max_det: int
    def __init__(self, enabled: _Optional[bool] = ..., conf_thres: _Optional[float] = ..., iou_thres: _Optional[float] = ..., classes: _Optional[_Iterable[int]] = ..., agnostic: _Optional[bool] = ..., multi_label: _Optional[bool] = ..., max_det: _Optional[int] = ...) -> None: ...

class ObjectFeatureOptions(_message.Message):
    __slots__ = ("mode", "layers", "normalize", "dtype", "roi_size", "flatten")
    MODE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROI_SIZE_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    mode: ObjectFeatureMode
    layers: _containers.RepeatedScalarFieldContainer[str]
    normalize: bool
    dtype: Dtype
    roi_size: int
    flatten: bool
    def __init__(self, mode: _Optional[_Union[ObjectFeatureMode, str]] = ..., layers: _Optional[_Iterable[str]] = ..., normalize: _Optional[bool] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., roi_size: _Optional[int] = ..., flatten: _Optional[bool] = ...) -> None: ...

class FeatureOptions(_message.Message):
    __slots__ = ("layers", "dtype", "pooling", "letterbox", "imgsz", "detection", "object_features")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LETTERBOX_FIELD_NUMBER: _ClassVar[int]
    IMGSZ_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedScalarFieldContainer[str]
    dtype: Dtype
    pooling: Pooling
    letterbox: LetterboxPolicy
    imgsz: int
    detection: DetectionOptions
    object_features: ObjectFeatureOptions
    def __init__(self, layers: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., letterbox: _Optional[_Union[LetterboxPolicy, str]] = ..., imgsz: _Optional[int] = ..., detection: _Optional[_Union[DetectionOptions, _Mapping]] = ..., object_features: _Optional[_Union[ObjectFeatureOptions, _Mapping]] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("options", "max_in_flight", "realtime", "compression", "tracking", "shared_memory")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REALTIME_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TRACKING_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    options: FeatureOptions
    max_in_flight: int
    realtime: bool
    compression: Compression
    tracking: TrackingOptions
    shared_memory: SharedMemoryOptions
    def __init__(self, options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., max_in_flight: _Optional[int] = ..., realtime: _Optional[bool] = ..., compression: _Optional[_Union[Compression, str]] = ..., tracking: _Optional[_Union[TrackingOptions, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryOptions, _Mapping]] = ...) -> None: ...

class SharedMemoryOptions(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SharedMemoryFrame(_message.Message):
    __slots__ = ("image", "output_offset", "output_length")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    image: SharedMemoryImage
    output_offset: int
    output_length: int
    def __init__(self, image: _Optional[_Union[SharedMemoryImage, _Mapping]] = ..., output_offset: _Optional[int] = ..., output_length: _Optional[int] = ...) -> None: ...

class SharedMemoryImage(_message.Message):
    __slots__ = ("offset", "length", "height", "width", "channels", "format")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    height: int
    width: int
    channels: int
    format: PixelFormat
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ...) -> None: ...

class SharedMemoryRange(_message.Message):
    __slots__ = ("offset", "length")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class SharedMemoryInfo(_message.Message):
    __slots__ = ("allowed", "max_region_bytes")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    MAX_REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    max_region_bytes: int
    def __init__(self, allowed: _Optional[bool] = ..., max_region_bytes: _Optional[int] = ...) -> None: ...

class TrackingOptions(_message.Message):
    __slots__ = ("enabled", "high_score", "low_score", "new_track_score", "match_iou", "appearance_threshold", "appearance_weight", "max_lost", "vector_smoothing", "max_tracks", "return_vectors", "previous_epoch")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    HIGH_SCORE_FIELD_NUMBER: _ClassVar[int]
    LOW_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEW_TRACK_SCORE_FIELD_NUMBER: _ClassVar[int]
    MATCH_IOU_FIELD_NUMBER: _ClassVar[int]
    APPEARANCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    APPEARANCE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_LOST_FIELD_NUMBER: _ClassVar[int]
    VECTOR_SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    MAX_TRACKS_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_EPOCH_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    high_score: float
    low_score: float
    new_track_score: float
    match_iou: float
    appearance_threshold: float
    appearance_weight: float
    max_lost: int
    vector_smoothing: float
    max_tracks: int
    return_vectors: bool
    previous_epoch: int
    def __init__(self, enabled: _Optional[bool] = ..., high_score: _Optional[float] = ..., low_score: _Optional[float] = ..., new_track_score: _Optional[float] = ..., match_iou: _Optional[float] = ..., appearance_threshold: _Optional[float] = ..., appearance_weight: _Optional[float] = ..., max_lost: _Optional[int] = ..., vector_smoothing: _Optional[float] = ..., max_tracks: _Optional[int] = ..., return_vectors: _Optional[bool] = ..., previous_epoch: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "frame")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    frame: Frame
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: FrameResult
    def __init__(self, result: _Optional[_Union[FrameResult, _Mapping]] = ...) -> None: ...

class ExtractRequest(_message.Message):
    __slots__ = ("options", "frame")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    options: FeatureOptions
    frame: Frame
    def __init__(self, options: _Optional[_Union[FeatureOptions, _Mapping]] = ..., frame: _Optional[_Union[Frame, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Frame(_message.Message):
    __slots__ = ("frame_id", "capture_timestamp_us", "encoded", "raw", "boxes", "box_ids", "box_scores", "shared_memory")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    BOX_IDS_FIELD_NUMBER: _ClassVar[int]
    BOX_SCORES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    capture_timestamp_us: int
    encoded: bytes
    raw: RawImage
    boxes: _containers.RepeatedScalarFieldContainer[float]
    box_ids: _containers.RepeatedScalarFieldContainer[int]
    box_scores: _containers.RepeatedScalarFieldContainer[float]
    shared_memory: SharedMemoryFrame
    def __init__(self, frame_id: _Optional[int] = ..., capture_timestamp_us: _Optional[int] = ..., encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., boxes: _Optional[_Iterable[float]] = ..., box_ids: _Optional[_Iterable[int]] = ..., box_scores: _Optional[_Iterable[float]] = ..., shared_memory: _Optional[_Union[SharedMemoryFrame, _Mapping]] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels", "format")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    format: PixelFormat
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "layer_index", "stride", "dtype", "shape", "data", "affine_scales", "affine_offsets", "compression", "uncompressed_size", "shared_memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    AFFINE_SCALES_FIELD_NUMBER: _ClassVar[int]
    AFFINE_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UNCOMPRESSED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer_index: int
    stride: int
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    affine_scales: _containers.RepeatedScalarFieldContainer[float]
    affine_offsets: _containers.RepeatedScalarFieldContainer[float]
    compression: Compression
    uncompressed_size: int
    shared_memory: SharedMemoryRange
    def __init__(self, name: _Optional[str] = ..., layer_index: _Optional[int] = ..., stride: _Optional[int] = ..., dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., affine_scales: _Optional[_Iterable[float]] = ..., affine_offsets: _Optional[_Iterable[float]] = ..., compression: _Optional[_Union[Compression, str]] = ..., uncompressed_size: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemoryRange, _Mapping]] = ...) -> None: ...

class LetterboxInfo(_message.Message):
    __slots__ = ("original_height", "original_width", "input_height", "input_width", "resized_height", "resized_width", "ratio_w", "ratio_h", "pad_left", "pad_top", "pad_right", "pad_bottom")
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIZED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RATIO_W_FIELD_NUMBER: _ClassVar[int]
    RATIO_H_FIELD_NUMBER: _ClassVar[int]
    PAD_LEFT_FIELD_NUMBER: _ClassVar[int]
    PAD_TOP_FIELD_NUMBER: _ClassVar[int]
    PAD_RIGHT_FIELD_NUMBER: _ClassVar[int]
    PAD_BOTTOM_FIELD_NUMBER: _ClassVar[int]
    original_height: int
    original_width: int
    input_height: int
    input_width: int
    resized_height: int
    resized_width: int
    ratio_w: float
    ratio_h: float
    pad_left: int
    pad_top: int
    pad_right: int
    pad_bottom: int
    def __init__(self, original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., resized_height: _Optional[int] = ..., resized_width: _Optional[int] = ..., ratio_w: _Optional[float] = ..., ratio_h: _Optional[float] = ..., pad_left: _Optional[int] = ..., pad_top: _Optional[int] = ..., pad_right: _Optional[int] = ..., pad_bottom: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_us", "preprocess_us", "compute_us", "encode_us")
    QUEUED_US_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_US_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    ENCODE_US_FIELD_NUMBER: _ClassVar[int]
    queued_us: int
    preprocess_us: int
    compute_us: int
    encode_us: int
    def __init__(self, queued_us: _Optional[int] = ..., preprocess_us: _Optional[int] = ..., compute_us: _Optional[int] = ..., encode_us: _Optional[int] = ...) -> None: ...

class FrameResult(_message.Message):
    __slots__ = ("frame_id", "capture_timestamp_us", "status", "error_message", "letterbox", "tensors", "timings", "batch_size", "box_source", "boxes", "scores", "classes", "box_ids", "object_features", "object_feature_slices", "anchor_levels", "anchor_rows", "anchor_cols", "anchor_indices", "track_ids", "track_new", "track_epoch", "track_features")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_TIMESTAMP_US_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LETTERBOX_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BOX_SOURCE_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    BOX_IDS_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FEATURE_SLICES_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_LEVELS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_ROWS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_COLS_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_INDICES_FIELD_NUMBER: _ClassVar[int]
    TRACK_IDS_FIELD_NUMBER: _ClassVar[int]
    TRACK_NEW_FIELD_NUMBER: _ClassVar[int]
    TRACK_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRACK_FEATURES_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    capture_timestamp_us: int
    status: FrameStatus
    error_message: str
    letterbox: LetterboxInfo
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    timings: Timings
    batch_size: int
    box_source: BoxSource
    boxes: _containers.RepeatedScalarFieldContainer[float]
    scores: _containers.RepeatedScalarFieldContainer[float]
    classes: _containers.RepeatedScalarFieldContainer[int]
    box_ids: _containers.RepeatedScalarFieldContainer[int]
    object_features: Tensor
    object_feature_slices: _containers.RepeatedCompositeFieldContainer[ObjectFeatureSlice]
    anchor_levels: _containers.RepeatedScalarFieldContainer[int]
    anchor_rows: _containers.RepeatedScalarFieldContainer[int]
    anchor_cols: _containers.RepeatedScalarFieldContainer[int]
    anchor_indices: _containers.RepeatedScalarFieldContainer[int]
    track_ids: _containers.RepeatedScalarFieldContainer[int]
    track_new: _containers.RepeatedScalarFieldContainer[bool]
    track_epoch: int
    track_features: Tensor
    def __init__(self, frame_id: _Optional[int] = ..., capture_timestamp_us: _Optional[int] = ..., status: _Optional[_Union[FrameStatus, str]] = ..., error_message: _Optional[str] = ..., letterbox: _Optional[_Union[LetterboxInfo, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., batch_size: _Optional[int] = ..., box_source: _Optional[_Union[BoxSource, str]] = ..., boxes: _Optional[_Iterable[float]] = ..., scores: _Optional[_Iterable[float]] = ..., classes: _Optional[_Iterable[int]] = ..., box_ids: _Optional[_Iterable[int]] = ..., object_features: _Optional[_Union[Tensor, _Mapping]] = ..., object_feature_slices: _Optional[_Iterable[_Union[ObjectFeatureSlice, _Mapping]]] = ..., anchor_levels: _Optional[_Iterable[int]] = ..., anchor_rows: _Optional[_Iterable[int]] = ..., anchor_cols: _Optional[_Iterable[int]] = ..., anchor_indices: _Optional[_Iterable[int]] = ..., track_ids: _Optional[_Iterable[int]] = ..., track_new: _Optional[_Iterable[bool]] = ..., track_epoch: _Optional[int] = ..., track_features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ObjectFeatureSlice(_message.Message):
    __slots__ = ("name", "layer_index", "stride", "start", "stop")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer_index: int
    stride: int
    start: int
    stop: int
    def __init__(self, name: _Optional[str] = ..., layer_index: _Optional[int] = ..., stride: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_name", "source", "random_weights", "device", "dtype", "default_letterbox", "default_imgsz", "stride", "layers", "batching", "limits", "num_classes", "class_names", "default_detection", "default_object_feature_dim", "backend", "startup_check", "shared_memory")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LETTERBOX_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_IMGSZ_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DETECTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OBJECT_FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STARTUP_CHECK_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    source: str
    random_weights: bool
    device: str
    dtype: str
    default_letterbox: LetterboxPolicy
    default_imgsz: int
    stride: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    batching: BatchingInfo
    limits: Limits
    num_classes: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    default_detection: DetectionOptions
    default_object_feature_dim: int
    backend: str
    startup_check: str
    shared_memory: SharedMemoryInfo
    def __init__(self, model_name: _Optional[str] = ..., source: _Optional[str] = ..., random_weights: _Optional[bool] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., default_letterbox: _Optional[_Union[LetterboxPolicy, str]] = ..., default_imgsz: _Optional[int] = ..., stride: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., num_classes: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., default_detection: _Optional[_Union[DetectionOptions, _Mapping]] = ..., default_object_feature_dim: _Optional[int] = ..., backend: _Optional[str] = ..., startup_check: _Optional[str] = ..., shared_memory: _Optional[_Union[SharedMemoryInfo, _Mapping]] = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("index", "type", "inputs", "params", "role", "out_channels", "stride", "output_shape", "aliases")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    index: int
    type: str
    inputs: _containers.RepeatedScalarFieldContainer[int]
    params: int
    role: LayerRole
    out_channels: int
    stride: int
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., type: _Optional[str] = ..., inputs: _Optional[_Iterable[int]] = ..., params: _Optional[int] = ..., role: _Optional[_Union[LayerRole, str]] = ..., out_channels: _Optional[int] = ..., stride: _Optional[int] = ..., output_shape: _Optional[_Iterable[int]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch", "max_delay_ms", "max_in_flight", "queue_capacity", "workers")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_delay_ms: float
    max_in_flight: int
    queue_capacity: int
    workers: int
    def __init__(self, max_batch: _Optional[int] = ..., max_delay_ms: _Optional[float] = ..., max_in_flight: _Optional[int] = ..., queue_capacity: _Optional[int] = ..., workers: _Optional[int] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_pixels", "max_frame_bytes", "max_message_bytes", "max_boxes")
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BOXES_FIELD_NUMBER: _ClassVar[int]
    max_pixels: int
    max_frame_bytes: int
    max_message_bytes: int
    max_boxes: int
    def __init__(self, max_pixels: _Optional[int] = ..., max_frame_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_boxes: _Optional[int] = ...) -> None: ...
