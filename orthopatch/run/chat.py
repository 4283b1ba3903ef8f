"""Turn instructions into the token ids a chat model sees: its tokenizer and its chat template."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.smallfile import check_small_file
from orthopatch.run.layerwise import require_transformers
from orthopatch.run.prompts import PromptSet

#: Longest a chat template may take to render one prompt (real ones take milliseconds).
TEMPLATE_SECONDS = 10.0
#: Files of which at least one is in a folder that holds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "tiktoken.model")


class TemplateTimeout(BaseException):
    """Raised inside a call that ran past its time limit (a BaseException: no ``except Exception`` in the
    code it interrupts swallows it)."""


T = TypeVar("T")


def time_limited(call: Callable[[], T], seconds: float) -> T:
    """``call()``, interrupted with :class:`TemplateTimeout` after ``seconds``.

    A watchdog timer raises the exception in the calling thread (any thread, not only the main one:
    no signal is used) at the interpreter's next instruction, which stops a Jinja loop however long.
    A pending exception that arrives as the call ends is withdrawn, so none is raised later."""
    ident, lock = threading.get_ident(), threading.Lock()
    state = {"running": True, "fired": False}

    def fire() -> None:
        with lock:
            if state["running"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(TemplateTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            return call()
        finally:
            with lock:
                state["running"] = False
                if state["fired"]:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)  # withdraw it
            timer.cancel()
    except TemplateTimeout:
        raise
    except BaseException:
        if state["fired"]:
            raise TemplateTimeout from None
        raise


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in ``folder``; a one-line error when there is none."""
    transformers = require_transformers()
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise OrthopatchError(f"no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)}); "
                              "pass --tokenizer FOLDER", path=folder)
    for name in TOKENIZER_FILES + ("special_tokens_map.json", "chat_template.jinja", "merges.txt"):
        if os.path.lexists(folder / name):
            check_small_file(folder / name, "tokenizer file")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # tokenizers fail in many ways; all end as one line
        raise OrthopatchError(f"cannot load the tokenizer ({first_line(exc)})", path=folder) from None
    encode(tokenizer, "Hello.", folder)  # a broken chat template fails here, before any model is read
    return tokenizer


def encode(tokenizer: Any, prompt: str, folder: Path | None = None) -> list[int]:
    """A user turn and the assistant's opening under the chat template, or the bare prompt without one.

    A template that does not compile or render (a jinja2 error) is a one-line error naming ``folder``
    (default: the folder the tokenizer was loaded from)."""
    if getattr(tokenizer, "chat_template", None):
        where = folder if folder is not None else getattr(tokenizer, "name_or_path", None) or None
        try:
            ids = time_limited(lambda: tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True), TEMPLATE_SECONDS)
        except TemplateTimeout:
            raise OrthopatchError(f"the tokenizer's chat template did not finish rendering a prompt within "
                                  f"{TEMPLATE_SECONDS:g} s (a template that loops for ever?)", path=where) from None
        except Exception as exc:  # jinja2's syntax, undefined-name and raise_exception errors, among others
            raise OrthopatchError(f"the tokenizer's chat template fails ({type(exc).__name__}: "
                                  f"{first_line(exc)})", path=where) from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def encode_set(tokenizer: Any, prompts: PromptSet, context: int | None, reserve: int = 0) -> list[list[int]]:
    """Every prompt's ids; a prompt that does not fit the context (with ``reserve`` tokens to spare) is an error,
    found as soon as that prompt is encoded."""
    encoded = []
    for number, prompt in enumerate(prompts.prompts, 1):
        ids = encode(tokenizer, prompt)
        if not ids:
            raise OrthopatchError(f"prompt {number} encodes to no tokens", path=prompts.source)
        if context is not None and len(ids) + reserve > context:
            spare = f" plus {reserve} new tokens" if reserve else ""
            raise OrthopatchError(f"prompt {number} is {len(ids)} tokens{spare}; the model's context is {context}",
                                  path=prompts.source)
        encoded.append(ids)
    return encoded


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)
