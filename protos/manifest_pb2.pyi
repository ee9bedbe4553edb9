from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FileEntry(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class EmulatorManifest(_message.Message):
    __slots__ = ("format_version", "backbone_id", "num_layers", "bottom", "middle_kept", "top", "quantization", "distilled", "files", "model_type", "dtype", "emulator_params", "adapter_params", "emulator_bytes", "backbone_params", "backbone_bytes", "signer_key_id", "weights_file", "fill", "slots")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    MIDDLE_KEPT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    DISTILLED_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    EMULATOR_PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_PARAMS_FIELD_NUMBER: _ClassVar[int]
    EMULATOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_PARAMS_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FILE_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    format_version: str
    backbone_id: str
    num_layers: int
    bottom: _containers.RepeatedScalarFieldContainer[int]
    middle_kept: _containers.RepeatedScalarFieldContainer[int]
    top: _containers.RepeatedScalarFieldContainer[int]
    quantization: str
    distilled: bool
    files: _containers.RepeatedCompositeFieldContainer[FileEntry]
    model_type: str
    dtype: str
    emulator_params: int
    adapter_params: int
    emulator_bytes: int
    backbone_params: int
    backbone_bytes: int
    signer_key_id: str
    weights_file: str
    fill: str
    slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, format_version: _Optional[str] = ..., backbone_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., bottom: _Optional[_Iterable[int]] = ..., middle_kept: _Optional[_Iterable[int]] = ..., top: _Optional[_Iterable[int]] = ..., quantization: _Optional[str] = ..., distilled: _Optional[bool] = ..., files: _Optional[_Iterable[_Union[FileEntry, _Mapping]]] = ..., model_type: _Optional[str] = ..., dtype: _Optional[str] = ..., emulator_params: _Optional[int] = ..., adapter_params: _Optional[int] = ..., emulator_bytes: _Optional[int] = ..., backbone_params: _Optional[int] = ..., backbone_bytes: _Optional[int] = ..., signer_key_id: _Optional[str] = ..., weights_file: _Optional[str] = ..., fill: _Optional[str] = ..., slots: _Optional[_Iterable[int]] = ...) -> None: ...
