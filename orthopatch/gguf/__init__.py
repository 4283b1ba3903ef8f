"""GGUF files: llama.cpp's container, read, patched and written tensor by tensor."""
