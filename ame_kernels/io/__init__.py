"""Checkpoint IO: lazy safetensors reading, weights-only torch loading, planned shard writing, atomic folders.

Nothing here imports torch unless a ``.bin``/``.pt`` file is opened.
"""

from .atomic import AtomicDir, Terminated, check_target, terminate_as_exception
from .checkpoint import AUX_FILES, Checkpoint, open_checkpoint
from .safetensors import (
    DTYPES,
    KERNEL_DTYPES,
    MERGE_DTYPES,
    SafetensorsFile,
    ShardWriter,
    TensorInfo,
    itemsize,
    np_dtype,
    read_header,
)

__all__ = [
    "AUX_FILES",
    "AtomicDir",
    "Checkpoint",
    "DTYPES",
    "KERNEL_DTYPES",
    "MERGE_DTYPES",
    "SafetensorsFile",
    "ShardWriter",
    "TensorInfo",
    "Terminated",
    "check_target",
    "itemsize",
    "np_dtype",
    "open_checkpoint",
    "read_header",
    "terminate_as_exception",
]
