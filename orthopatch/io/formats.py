"""Facts of the formats orthopatch reads and writes: file names and safetensors dtypes, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# --- a Hugging Face model folder -------------------------------------------------------------------

#: The index of a sharded checkpoint: ``{"metadata": {"total_size": N}, "weight_map": {tensor: shard}}``.
INDEX_NAME = "model.safetensors.index.json"
#: The one file of an unsharded checkpoint.
SINGLE_SHARD_NAME = "model.safetensors"
#: Shard files end with this.
SHARD_SUFFIX = ".safetensors"
CONFIG_NAME = "config.json"
#: Generation defaults transformers saves beside the config (end-of-sequence tokens among them).
GENERATION_CONFIG_NAME = "generation_config.json"
#: The model card (a Hugging Face ``README.md`` with YAML front matter).
CARD_NAME = "README.md"

# --- what orthopatch leaves in an output folder ----------------------------------------------------

#: The record of a finished conversion; its presence marks the output complete.
RECORD_NAME = "orthopatch.json"
#: Hidden marker of a run in progress, holding the run's fingerprint.
PARTIAL_NAME = ".orthopatch-partial.json"
#: Files are written under ``.NAME`` + this suffix and renamed into place when complete.
TMP_SUFFIX = ".orthopatch-tmp"
#: The journal folder inside a model while ``apply --in-place`` is unfinished, and its state file
#: (written before any shard is touched: its presence means the conversion has begun).
INPLACE_JOURNAL_DIR = ".orthopatch-inplace"
INPLACE_STATE_NAME = "state.json"

#: Versions of the JSON files orthopatch writes: the conversion record (``orthopatch.json``), the record
#: beside a measured direction, and the report of ``evaluate``.
CONVERSION_RECORD_FORMAT = 2
DIRECTION_RECORD_FORMAT = 1
EVALUATION_REPORT_FORMAT = 1

# --- safetensors ---------------------------------------------------------------------------------

#: Bits per element of every dtype the safetensors format defines.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
#: The floating-point dtypes the projection can rewrite (torch's names for them: :func:`torch_dtype`).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: The ``__metadata__`` transformers requires (it refuses shards of another ``format``).
PT_METADATA = {"format": "pt"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors float dtype name (``BF16`` → ``torch.bfloat16``); torch is imported
    only here, so reading a header does not load it."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch float dtype (``torch.bfloat16`` → ``BF16``)."""
    return {torch_dtype(name): name for name in FLOAT_DTYPES}[dtype]


def itemsize(name: str) -> int:
    """Bytes per element of a safetensors dtype with a whole number of bytes."""
    return DTYPE_BITS[name] // 8
