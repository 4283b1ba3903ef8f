"""Read the small files of a model folder (config, index, card, record) without trusting them.

A model folder comes from anywhere: ``config.json`` may be a FIFO (reading it waits forever), a
symlink to ``/dev/zero`` (reading it never ends), a multi-gigabyte file, or JSON nested so deeply
that the parser runs out of stack. Every small file is therefore checked before it is read: it must
be a regular file (checked on the path, then again on the open descriptor), no larger than
:data:`MAX_SMALL_BYTES`; JSON must not nest deeper than :data:`MAX_JSON_DEPTH`. Each failure is an
:class:`OrthopatchError` naming the file.

Symbolic links are followed (a Hugging Face cache snapshot is made of them) and what they point to
is checked; ``O_NOFOLLOW`` would refuse every cached model.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from orthopatch.errors import OrthopatchError

#: Largest small file read whole (configs, indexes, cards and records are far smaller).
MAX_SMALL_BYTES = 64 << 20
#: Deepest nesting of JSON objects and arrays accepted (real configs nest a handful of levels).
MAX_JSON_DEPTH = 100

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}
#: A JSON string, or an unterminated one running to the end (so a scan never restarts inside it).
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)


def describe_kind(mode: int) -> str:
    """What a non-regular file is, in words (``a FIFO (named pipe)``, ``a folder``...)."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def check_regular(path: Path, what: str = "file") -> os.stat_result:
    """``path`` (symlinks followed) is an existing regular file; its ``stat``. One-line error otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise OrthopatchError(f"{what} not found", path=path) from None
    except OSError as exc:
        raise OrthopatchError(f"cannot read {what} ({exc.strerror or exc})", path=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise OrthopatchError(f"{what} is {describe_kind(st.st_mode)}, not a regular file", path=path)
    return st


def _too_large(path: Path, what: str, size: int, limit: int) -> OrthopatchError:
    return OrthopatchError(f"{what} is {size:,} bytes, more than the {limit:,} such a file may have", path=path)


def check_small_file(path: Path, what: str = "file", limit: int = MAX_SMALL_BYTES) -> None:
    """A regular file of at most ``limit`` bytes, checked before another library (transformers) reads it."""
    size = check_regular(path, what).st_size
    if size > limit:
        raise _too_large(path, what, size, limit)


def open_regular(path: Path, what: str = "file") -> int:
    """A read-only descriptor on ``path``, refused unless it is a regular file.

    ``O_NONBLOCK`` keeps the ``open`` itself from waiting on a FIFO that was swapped in after the
    check; the descriptor is checked again with ``fstat``, so what is read is what was checked.
    """
    check_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise OrthopatchError(f"cannot open {what} ({exc.strerror or exc})", path=path) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OrthopatchError(f"{what} is {describe_kind(st.st_mode)}, not a regular file", path=path)
    os.set_blocking(fd, True)
    return fd


def read_small_bytes(path: Path, what: str = "file", limit: int = MAX_SMALL_BYTES) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (never more is read, whatever it claims)."""
    return read_fd_bytes(open_regular(path, what), path, what, limit)


def read_fd_bytes(fd: int, path: Path, what: str = "file", limit: int = MAX_SMALL_BYTES) -> bytes:
    """The whole of the regular file open on ``fd`` (closed here), at most ``limit`` bytes; ``path`` names it
    in errors. For callers that open the file themselves (relative to a folder, without following links)."""
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_large(path, what, size, limit)
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise OrthopatchError(f"cannot read {what} ({exc.strerror or exc})", path=path) from None
    finally:
        os.close(fd)
    if total > limit:
        raise OrthopatchError(f"{what} grew past {limit:,} bytes while being read", path=path)
    return b"".join(chunks)


def read_small_text(path: Path, what: str = "file", limit: int = MAX_SMALL_BYTES, *,
                    errors: str = "strict") -> str:
    """A small regular file decoded as UTF-8 (``errors="replace"`` to keep what can be read)."""
    data = read_small_bytes(path, what, limit)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise OrthopatchError(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})", path=path) from None


def json_depth(data: bytes) -> int:
    """The deepest nesting of objects and arrays in JSON text, strings left out (no parsing needed)."""
    structure = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(structure), 1 << 20):  # bounded temporaries, linear time
        part = structure[start:start + (1 << 20)]
        steps = (part == ord("[")).astype(np.int32) + (part == ord("{")) - (part == ord("]")) - (part == ord("}"))
        running = np.cumsum(steps, dtype=np.int64) + depth
        if len(running):
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
    return deepest


def parse_json(data: bytes, path: Path | str, what: str = "file", max_depth: int = MAX_JSON_DEPTH,
               not_json: str = "cannot read JSON") -> Any:
    """JSON text parsed, after its nesting depth is checked; one-line errors naming ``path`` (``not_json``
    begins the one for text that is not JSON)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OrthopatchError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})", path=path) from None
    depth = json_depth(data)
    if depth > max_depth:
        raise OrthopatchError(f"{what} nests {depth} levels deep, more than the {max_depth} accepted", path=path)
    try:
        return json.loads(text)
    except RecursionError:
        raise OrthopatchError(f"{what} nests too deeply to parse", path=path) from None
    except ValueError as exc:
        raise OrthopatchError(f"{not_json} ({exc})", path=path) from None


def read_small_json(path: Path, what: str = "file", limit: int = MAX_SMALL_BYTES,
                    max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A small regular file parsed as JSON (bounded size and nesting)."""
    return parse_json(read_small_bytes(path, what, limit), path, what, max_depth)


def is_json_int(value: object, low: int | None = None, high: int | None = None) -> bool:
    """Whether a parsed JSON value is an integer (not a bool) within ``[low, high]`` where those are given."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (low is None or value >= low) and (high is None or value <= high)
