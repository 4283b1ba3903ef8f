"""The Hugging Face Hub: MODEL as a repo id, DIRECTION as ``REPO_ID:PATH``, and pushing OUT.

A local path that exists always wins. A model repo is taken from the local Hugging Face cache and
downloaded only on request (then only its safetensors, config, tokenizer and card files); a direction
file is fetched alone with ``hf_hub_download`` or taken from the cache. ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE`` are honoured (huggingface_hub reads them when it is imported).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.checkpoint import folder_name, model_folder
from orthopatch.io.formats import CARD_NAME, INDEX_NAME, RECORD_NAME, SINGLE_SHARD_NAME
from orthopatch.io.model_files import model_files
from orthopatch.io.smallfile import read_small_json

#: What ``--download`` fetches of a model repo first: configs, the index, tokenizer files, card, licence.
#: The weights follow: exactly the shards the index names, or the single ``model.safetensors`` (never
#: every ``*.safetensors``: Mistral repos also hold ``consolidated.safetensors``, the same weights again).
DOWNLOAD_PATTERNS = ["*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt",
                     "*.jinja", CARD_NAME, "LICENSE*"]
#: Never fetched: subfolders (``original/`` holds the unconverted Meta weights, another full copy).
DOWNLOAD_IGNORE = ["*/*"]
#: Never uploaded: hidden files (the partial marker, temporary files, tool caches).
UPLOAD_IGNORE = [".*", "*/.*"]

#: Seconds the Hub's endpoint gets to accept a TCP connection before it counts as unreachable.
PROBE_SECONDS = 3.0
#: ``datasets/ORG/NAME:PATH`` names a file of a dataset repo.
DATASET_PREFIX = "datasets/"

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class RepoRef:
    """``ORG/NAME`` with an optional revision (``ORG/NAME@REVISION``)."""

    repo_id: str
    revision: str | None = None

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class ModelSource:
    """Where the checkpoint is on disk, what to call it, and the default output folder."""

    path: Path
    name: str  # the repo id, or the folder name: the model card's ``base_model``
    repo: RepoRef | None = None

    @property
    def hub_ref(self) -> str | None:
        """``ORG/NAME@COMMIT`` for a repo id (the commit of the cache snapshot used), else ``None``."""
        return f"{self.repo.repo_id}@{self.path.name}" if self.repo else None

    @property
    def default_out(self) -> Path | None:
        """``./NAME-abliterated`` for a repo id; ``None`` (a sibling folder) for a local folder."""
        return Path(f"{self.repo.name}-abliterated") if self.repo else None


@dataclass(frozen=True)
class DirectionSource:
    """The direction file on disk and how the model card names it (no local paths)."""

    path: Path
    name: str


def parse_repo_ref(text: str) -> RepoRef | None:
    """``ORG/NAME[@REVISION]`` as a :class:`RepoRef`, or ``None`` if ``text`` is not one."""
    repo_id, _, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        return None
    if "@" in text and not revision:
        return None
    return RepoRef(repo_id, revision or None)


def _cache_dir(cache_dir: Path | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[None]:
    from huggingface_hub.utils import disable_progress_bars

    with disable_progress_bars() if quiet else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _hub_quiet() -> Iterator[None]:
    """Keep huggingface_hub's own log lines (retries, warnings) off the terminal: errors end as one line."""
    from huggingface_hub.utils import logging as hub_logging

    logger = hub_logging.get_logger()
    level = logger.level
    logger.setLevel(hub_logging.logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def weight_files(folder: Path) -> list[str]:
    """The weight files a downloaded model folder's index names, or the single ``model.safetensors``."""
    index = folder / INDEX_NAME
    if not os.path.lexists(index):
        return [SINGLE_SHARD_NAME]
    doc = read_small_json(index, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise OrthopatchError("index has no weight_map of tensor names to shard files", path=index)
    return sorted(set(weight_map.values()))


def hub_error(exc: Exception, what: str, *, filename: str | None = None) -> OrthopatchError:
    """One line for a huggingface_hub failure about ``what`` (a repo id, or ``REPO_ID:PATH``)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, IncompleteSnapshotError):
        message = f"the cached copy is incomplete ({first_line(exc)})"
    elif isinstance(exc, LocalEntryNotFoundError):
        item = f"file {filename!r}" if filename else "repository"
        if _offline() or isinstance(exc.__cause__, OfflineModeIsEnabled):
            message = f"{item} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        else:
            message = f"{item} is not in the local Hugging Face cache and the Hub cannot be reached"
    elif isinstance(exc, LocalTokenNotFoundError):
        message = "not logged in to the Hub (run hf auth login, or set HF_TOKEN)"
    elif isinstance(exc, GatedRepoError):
        message = "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    elif isinstance(exc, RepositoryNotFoundError):
        message = "no such repository on the Hub (or it is private: log in with hf auth login)"
    elif isinstance(exc, RevisionNotFoundError):
        message = "no such revision in the repository"
    elif isinstance(exc, EntryNotFoundError):
        message = f"the repository has no file {filename!r}" if filename else "a file is missing in the repository"
    elif isinstance(exc, HfHubHTTPError):
        message = f"Hub request failed ({first_line(exc)})"
    elif isinstance(exc, ValueError):
        message = f"invalid Hub request ({first_line(exc)})"
    else:
        message = f"Hub access failed ({first_line(exc)})"
    return OrthopatchError(message, path=what)


def resolve_model(text: str, *, download: bool = False, cache_dir: Path | None = None,
                  quiet: bool = False) -> ModelSource:
    """A local folder as it is, else a repo id from the cache (downloading only if ``download``)."""
    path = Path(text)
    ref = None if os.path.lexists(path) else parse_repo_ref(text)
    if ref is None:
        folder = model_folder(path)  # the folder of a .safetensors file given as MODEL
        return ModelSource(folder, folder_name(folder))

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        with _progress(quiet), _hub_quiet():
            folder = snapshot_download(ref.repo_id, revision=ref.revision, cache_dir=cache_dir,
                                       allow_patterns=DOWNLOAD_PATTERNS if download else None,
                                       ignore_patterns=DOWNLOAD_IGNORE, local_files_only=not download)
            if download:  # then the weights the index names, from the same commit
                snapshot_download(ref.repo_id, revision=Path(folder).name, cache_dir=cache_dir,
                                  allow_patterns=weight_files(Path(folder)), ignore_patterns=DOWNLOAD_IGNORE)
    except LocalEntryNotFoundError as exc:
        if download:
            raise hub_error(exc, str(ref)) from exc
        raise OrthopatchError(f"no such folder; read as a Hub repo id, it is not in the Hugging Face cache "
                              f"({_cache_dir(cache_dir)}) either: pass --download to fetch it",
                              path=str(ref)) from None
    except OrthopatchError:
        raise
    except Exception as exc:  # network, HTTP and validation errors all end as one line
        raise hub_error(exc, str(ref)) from exc
    return ModelSource(Path(folder), ref.repo_id, ref)


def resolve_direction(text: str, *, cache_dir: Path | None = None, quiet: bool = False) -> DirectionSource:
    """A local file as it is, else ``REPO_ID[@REVISION]:PATH`` fetched alone (or from the cache)."""
    return resolve_file(text, cache_dir=cache_dir, quiet=quiet)


def resolve_file(text: str, *, cache_dir: Path | None = None, quiet: bool = False) -> DirectionSource:
    """A local file as it is, else one file of a Hub repo, fetched alone (or taken from the cache):
    ``REPO_ID[@REVISION]:PATH`` in a model repo, ``datasets/REPO_ID[@REVISION]:PATH`` in a dataset repo."""
    path = Path(text)
    repo_part, colon, filename = text.partition(":")
    repo_type = "model"
    if repo_part.startswith(DATASET_PREFIX):
        repo_part, repo_type = repo_part.removeprefix(DATASET_PREFIX), "dataset"
    ref = None if path.exists() or not colon or not filename else parse_repo_ref(repo_part)
    if ref is None:
        return DirectionSource(path, path.name)

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # An endpoint that cannot be reached at all is found in seconds, not after huggingface_hub's retries;
    # the file is then taken from the cache, as huggingface_hub would after them.
    unreachable = None if _offline() else endpoint_unreachable()
    try:
        with _progress(quiet), _hub_quiet():
            local = hf_hub_download(ref.repo_id, filename, revision=ref.revision, cache_dir=cache_dir,
                                    repo_type=repo_type, local_files_only=unreachable is not None)
    except LocalEntryNotFoundError as exc:
        if unreachable is not None:
            raise OrthopatchError(f"file {filename!r} is not in the local Hugging Face cache and the Hub cannot be "
                                  f"reached ({unreachable})", path=text) from None
        raise hub_error(exc, text, filename=filename) from exc
    except Exception as exc:  # network, HTTP and validation errors all end as one line
        raise hub_error(exc, text, filename=filename) from exc
    return DirectionSource(Path(local), text)


def endpoint_unreachable(timeout: float = PROBE_SECONDS) -> str | None:
    """Why the Hub's endpoint (``HF_ENDPOINT``, or the proxy that reaches it) refuses or does not answer a
    TCP connection within ``timeout`` seconds, or ``None`` when it accepts one."""
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if not via.hostname:
            return None
        host, port = via.hostname, via.port or 1080 if via.scheme.startswith("socks") else via.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{host}:{port}: {reason}"


def upload_patterns(out: Path, shards: Iterable[str]) -> list[str]:
    """What a push uploads of ``out``, as exact (escaped) patterns: the plan's ``shards``, the index,
    the small model files an out-of-place run copies (config, tokenizer, licence, the card) and the
    record. Nothing else: a model converted in place may still hold other copies of its weights
    (``original/``, ``consolidated.safetensors``, ``*.bin``, ``*.gguf``), unpatched."""
    names = list(shards)
    if (out / INDEX_NAME).is_file():
        names.append(INDEX_NAME)
    names += [rel.as_posix() for rel in model_files(out).copied]
    names.append(RECORD_NAME)
    return [glob.escape(name) for name in dict.fromkeys(names)]


def push_folder(out: Path, repo_id: str, shards: Iterable[str], *, private: bool = False,
                message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the files of ``out`` that make the converted model
    (:func:`upload_patterns`; hidden files never); return the commit URL.

    huggingface_hub 0.x and 1.x upload large folders resumably, in chunks and with several workers,
    with ``upload_large_folder``; 2.x dropped it, and its ``upload_folder`` resumes by itself.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    allow = upload_patterns(out, shards)
    try:
        with _hub_quiet():
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            large = getattr(api, "upload_large_folder", None)
            if large is not None:
                large(repo_id=repo_id, folder_path=out, repo_type="model", private=private,
                      allow_patterns=allow, ignore_patterns=list(UPLOAD_IGNORE), print_report=False)
                return str(repo_url)
            commit = api.upload_folder(repo_id=repo_id, folder_path=out, repo_type="model",
                                       commit_message=message or f"Upload {out.name} (orthopatch)",
                                       allow_patterns=allow, ignore_patterns=list(UPLOAD_IGNORE))
    except Exception as exc:  # network, HTTP, authentication errors all end as one line
        raise hub_error(exc, repo_id) from exc
    return str(getattr(commit, "commit_url", None) or repo_url)

