"""orthopatch: project a refusal direction out of a safetensors checkpoint, streaming."""

__version__ = "0.1.0"
