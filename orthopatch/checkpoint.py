"""A safetensors checkpoint folder: its config, index and shard headers, cross-checked.

Nothing here reads tensor data; everything is decided from headers and small JSON files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OrthopatchError
from .formats import CONFIG_NAME, INDEX_NAME, SHARD_SUFFIX, SINGLE_SHARD_NAME
from .safetensors_header import ShardHeader, TensorEntry, read_header


@dataclass(frozen=True)
class Checkpoint:
    """A model folder: shard headers in file-name order, plus where each tensor lives."""

    root: Path
    config: dict[str, Any]
    shards: dict[str, ShardHeader]  # shard file name -> header
    weight_map: dict[str, str]  # tensor name -> shard file name
    index_path: Path | None

    def entry(self, name: str) -> TensorEntry:
        return self.shards[self.weight_map[name]].entry(name)

    @property
    def total_bytes(self) -> int:
        return sum(h.file_size for h in self.shards.values())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OrthopatchError("file not found", path=path) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise OrthopatchError(f"cannot read JSON ({exc})", path=path) from None


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Read ``config.json``, the index (if any) and every shard header; check they agree."""
    root = Path(root)
    if not root.is_dir():
        raise OrthopatchError("not a model folder", path=root)
    config_path = root / CONFIG_NAME
    config = read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        raise OrthopatchError("config is not a JSON object", path=config_path)

    index_path = root / INDEX_NAME
    if index_path.exists():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise OrthopatchError("index has no weight_map of tensor names to shard files", path=index_path)
        shards: dict[str, ShardHeader] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = root / shard
            if Path(shard).name != shard or not shard.endswith(SHARD_SUFFIX):
                raise OrthopatchError(f"index names an unexpected shard file {shard!r}", path=index_path)
            if not shard_path.is_file():
                first = next(name for name, where in weight_map.items() if where == shard)
                raise OrthopatchError(f"index places this tensor in shard {shard!r}, which does not exist",
                                      path=index_path, tensor=first)
            shards[shard] = read_header(shard_path)
        for name, shard in weight_map.items():
            if name not in shards[shard].names():
                raise OrthopatchError(
                    f"index places this tensor in {shard}, which does not hold it", path=index_path, tensor=name
                )
        for shard, header in shards.items():
            for name in header.names():
                if weight_map.get(name) != shard:
                    raise OrthopatchError(
                        "tensor is in the shard but the index does not place it there", path=header.path, tensor=name
                    )
        return Checkpoint(root, config, shards, dict(weight_map), index_path)

    single = root / SINGLE_SHARD_NAME
    if single.is_file():
        header = read_header(single)
        weight_map = {n: SINGLE_SHARD_NAME for n in header.names()}
        return Checkpoint(root, config, {SINGLE_SHARD_NAME: header}, weight_map, None)
    raise OrthopatchError(f"no {INDEX_NAME} or {SINGLE_SHARD_NAME} in the model folder", path=root)
