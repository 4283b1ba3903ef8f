"""A safetensors checkpoint folder: its config, index and shard headers, cross-checked.

Nothing here reads tensor data; everything is decided from headers and small JSON files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError
from orthopatch.io.formats import CONFIG_NAME, INDEX_NAME, SHARD_SUFFIX, SINGLE_SHARD_NAME
from orthopatch.io.safetensors_header import ShardHeader, TensorEntry, read_header
from orthopatch.io.smallfile import describe_kind, read_small_json

#: Suffixes of tensor files that hold a direction, not a model.
DIRECTION_SUFFIXES = (".pth", ".pt", ".npy")


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


def model_folder(path: Path) -> Path:
    """The folder a MODEL argument means: the path itself, or the folder of a ``.safetensors`` file given."""
    if path.suffix == ".safetensors" and path.is_file() and (path.parent / CONFIG_NAME).exists():
        return path.parent
    return path


def _not_a_model(root: Path) -> OrthopatchError:
    """Why ``root`` is not a safetensors model folder, with what to do about it."""
    if not os.path.lexists(root):
        return OrthopatchError("no such file or folder", path=root)
    suffix = root.suffix.lower()
    if root.is_dir() and any(root.glob("*.gguf")):
        first = sorted(root.glob("*.gguf"))[0].name
        return OrthopatchError(f"holds GGUF files, not a safetensors model: give the .gguf file itself as MODEL "
                               f"(orthopatch apply {first} DIRECTION)", path=root)
    if root.is_file() and suffix in DIRECTION_SUFFIXES:
        return OrthopatchError("this is a tensor file, not a model folder: MODEL comes first, then DIRECTION "
                               "(orthopatch apply MODEL DIRECTION)", path=root)
    if root.is_file() and suffix == ".bin" or any(root.glob("*.bin")):
        return OrthopatchError(
            "holds PyTorch .bin weights, not safetensors: convert them first (transformers: "
            "from_pretrained(...).save_pretrained(OUT, safe_serialization=True))", path=root)
    if root.is_file():
        return OrthopatchError("is a file, not a model folder (give the folder that holds config.json and "
                               "the *.safetensors weights)", path=root)
    if not root.is_dir():
        try:
            kind = describe_kind(root.stat().st_mode)
        except OSError as exc:
            return OrthopatchError(f"cannot read ({exc.strerror or exc})", path=root)
        return OrthopatchError(f"is {kind}, not a model folder", path=root)
    return OrthopatchError(f"no {INDEX_NAME} or {SINGLE_SHARD_NAME} in the model folder", path=root)


def open_checkpoint(root: str | Path) -> Checkpoint:
    """Read ``config.json``, the index (if any) and every shard header; check they agree."""
    root = model_folder(Path(root))
    if not root.is_dir() or not (os.path.lexists(root / INDEX_NAME) or os.path.lexists(root / SINGLE_SHARD_NAME)):
        raise _not_a_model(root)
    config_path = root / CONFIG_NAME
    if not os.path.lexists(config_path):
        raise OrthopatchError(f"no {CONFIG_NAME} in the model folder (it names the architecture and its sizes)",
                              path=root)
    config = read_small_json(config_path)
    if not isinstance(config, dict):
        raise OrthopatchError("config is not a JSON object", path=config_path)

    index_path = root / INDEX_NAME
    if os.path.lexists(index_path):
        index = read_small_json(index_path)
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
            if not os.path.lexists(shard_path):
                first = next(name for name, where in weight_map.items() if where == shard)
                raise OrthopatchError(f"index places this tensor in shard {shard!r}, which does not exist",
                                      path=index_path, tensor=first)
            shards[shard] = read_header(shard_path)
        for name, shard in weight_map.items():
            if name not in shards[shard].by_name:
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

    header = read_header(root / SINGLE_SHARD_NAME)
    weight_map = {n: SINGLE_SHARD_NAME for n in header.names()}
    return Checkpoint(root, config, {SINGLE_SHARD_NAME: header}, weight_map, None)


def folder_name(path: Path) -> str:
    """What a model card calls a local folder: the repo id of a cache snapshot, else the name as given."""
    if cached := cached_repo_name(path):
        return cached
    return path.name if path.name not in ("", ".", "..") else Path(os.path.abspath(path)).name


def cached_repo_name(path: Path) -> str | None:
    """``ORG/NAME`` when ``path`` is a snapshot folder of the Hugging Face cache, else ``None``."""
    try:
        parts = path.resolve().parts
    except (OSError, RuntimeError):  # a symlink loop: not a cache folder; opening it will say what it is
        return None
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org_name = parts[-3].removeprefix("models--").split("--")
        return "/".join(org_name) if all(org_name) else None
    return None
