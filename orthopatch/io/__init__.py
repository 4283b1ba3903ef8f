"""Bytes and files: safetensors headers, small files, model folders, shard readers and writers, byte-range copies."""
