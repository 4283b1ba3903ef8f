"""orthopatch: project a refusal direction out of a safetensors or GGUF model, streaming."""

__version__ = "0.1.0"
