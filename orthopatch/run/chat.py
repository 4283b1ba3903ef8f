"""Turn instructions into the token ids a chat model sees: its tokenizer and its chat template."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.smallfile import check_small_file
from orthopatch.run.layerwise import require_transformers
from orthopatch.run.prompts import PromptSet

#: Files of which at least one is in a folder that holds a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "tiktoken.model")


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
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True)
        except Exception as exc:  # jinja2's syntax, undefined-name and raise_exception errors, among others
            where = folder if folder is not None else getattr(tokenizer, "name_or_path", None) or None
            raise OrthopatchError(f"the tokenizer's chat template fails ({type(exc).__name__}: "
                                  f"{first_line(exc)})", path=where) from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(prompt)["input_ids"]]


def encode_set(tokenizer: Any, prompts: PromptSet, context: int | None, reserve: int = 0) -> list[list[int]]:
    """Every prompt's ids; a prompt that does not fit the context (with ``reserve`` tokens to spare) is an error."""
    encoded = [encode(tokenizer, p) for p in prompts.prompts]
    for number, ids in enumerate(encoded, 1):
        if not ids:
            raise OrthopatchError(f"prompt {number} encodes to no tokens", path=prompts.source)
        if context is not None and len(ids) + reserve > context:
            spare = f" plus {reserve} new tokens" if reserve else ""
            raise OrthopatchError(f"prompt {number} is {len(ids)} tokens{spare}; the model's context is {context}",
                                  path=prompts.source)
    return encoded


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)
