"""``ApplyOptions``: everything a conversion is asked to do, whatever the format of the model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orthopatch.io.checkpoint import model_folder
from orthopatch.patch.record import Method


@dataclass(frozen=True)
class ApplyOptions:
    """Everything ``apply`` needs; the CLI only builds one of these."""

    model: Path
    direction: Path
    out: Path | None = None
    device: str = "auto"
    dry_run: bool = False
    overwrite: bool = False
    quiet: bool = False
    method: Method = field(default_factory=Method)
    #: How the model card names the source and the direction (default: folder and file names).
    base_model: str | None = None
    direction_name: str | None = None
    #: Rewrite the patched tensors inside ``model``'s own shards (see :mod:`orthopatch.patch.inplace`).
    in_place: bool = False
    #: Convert even when the tensors look already abliterated along the direction (``--force``).
    force: bool = False
    #: llama.cpp's importance matrix for requantizing a GGUF's quantized targets (``--imatrix``); GGUF only.
    imatrix: Path | None = None

    @property
    def out_path(self) -> Path:
        if self.in_place:
            return model_folder(self.model)
        if self.out is not None:
            return self.out
        model = Path(os.path.abspath(model_folder(self.model)))  # a symlinked model folder keeps its name
        return model.with_name(model.name + "-abliterated")

    @property
    def is_gguf(self) -> bool:
        """MODEL is a GGUF file (or the first part of a split one)."""
        return self.model.suffix == ".gguf"
