"""Run a causal language model one block at a time, reading each block's weights once per pass.

transformers builds the model from ``config.json`` with every parameter on the meta device (no
memory). A pass runs every prompt through block 0, then block 1, and so on (layer-major order):

1. the embedding is given only the rows of the tokens the prompts use (read row by row from the
   shard), and transformers' own embedding module runs on them (Gemma's √hidden scale included);
2. each block is replaced by a stand-in that records what the model hands it (the attention mask,
   the rotary position embeddings, per block since some models alternate sliding and full
   attention), then the model's forward stops;
3. block by block: its weights are read from the shards (experts fused as transformers fuses them:
   :mod:`orthopatch.run.parameters`), every batch runs through it with the recorded arguments, the
   outputs become the next block's inputs, and the weights go back to meta.

Prompts are batched with right padding: under a causal mask a token never sees the padding that
follows it, so the last real token of each prompt gets exactly the state it would get alone.
The output head is read (in row blocks) only when logits are asked for.

Only the text decoder runs: for a model with other towers (Gemma 3's vision encoder) the blocks, the
final norm and every other parameter read come from the text decoder, plus the output head; the
other towers' weights are never read. A hidden state or logit that is not finite (NaN or infinity)
stops the pass with a one-line error naming the model and the layer.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.formats import CONFIG_NAME
from orthopatch.io.reader import CheckpointReader
from orthopatch.progress import steps
from orthopatch.run.checks import open_for_run
from orthopatch.run.parameters import Fused, parameter_sources, read_fused

INSTALL_HINT = "pip install 'orthopatch[measure]'"
#: The oldest transformers major version that builds models as this module expects (``dtype=``,
#: the loading conversions of :mod:`orthopatch.run.parameters`, the cache keyword).
MIN_TRANSFORMERS = 5
#: Where causal LMs keep the norm applied after the last block.
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f")

#: Names older checkpoints give the output head (GPT-NeoX's ``embed_out``).
HEAD_ALIASES = {"lm_head.weight": ("embed_out.weight",)}

Observer = Callable[[int, torch.Tensor], None]


class NonFiniteError(OrthopatchError):
    """A model's hidden states or logits hold a NaN or an infinity."""


def require_transformers() -> Any:
    """The ``transformers`` module (5 or later), or a one-line error saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise OrthopatchError(f"this command needs transformers: {INSTALL_HINT}") from None
    version = str(getattr(transformers, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_TRANSFORMERS:
        raise OrthopatchError(f"this command needs transformers {MIN_TRANSFORMERS} or later, not {version}: "
                              f"pip install -U 'orthopatch[measure]'")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter created inside goes to the meta device; buffers (rotary tables) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


#: Arithmetic dtypes a model may run in (``--dtype``).
RUN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunSettings:
    """How a model is run: device, arithmetic dtype, prompts per batch, and the tokenizer's folder."""

    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 16
    tokenizer: Path | None = None  # None: the model folder's own

    def torch_device(self) -> torch.device:
        from orthopatch.devices import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in RUN_DTYPES:
            raise OrthopatchError(f"unknown dtype {self.dtype!r} (use {', '.join(RUN_DTYPES)})")
        return RUN_DTYPES[self.dtype]


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids of some prompts, and where each prompt's last token is."""

    ids: torch.Tensor  # [B, T] int64
    lengths: torch.Tensor  # [B] int64
    order: tuple[int, ...]  # the prompts' indices in the caller's list


def make_batches(token_ids: list[list[int]], batch_size: int) -> list[Batch]:
    """Batches of similar lengths (longest first), padded on the right with each prompt's last token."""
    if batch_size < 1:
        raise OrthopatchError(f"batch size must be at least 1, not {batch_size}")
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        width = len(token_ids[members[0]])
        rows = [token_ids[i] + [token_ids[i][-1]] * (width - len(token_ids[i])) for i in members]
        batches.append(Batch(torch.tensor(rows, dtype=torch.long),
                             torch.tensor([len(token_ids[i]) for i in members], dtype=torch.long), tuple(members)))
    return batches


class _Stop(Exception):
    """Raised by the last stand-in block: everything the blocks receive has been recorded."""


class _StandIn(nn.Module):
    """Takes a block's place during the recording run: keeps its arguments, passes the input on."""

    def __init__(self, block: nn.Module, records: list[tuple[tuple, dict]], last: bool):
        super().__init__()
        self.__dict__["_block"] = block  # not a submodule: attribute look-ups only
        self._records = records
        self._last = last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._records.append((hidden, tuple(args[1:]), kwargs))
        if self._last:
            raise _Stop
        return hidden


@dataclass
class PassStats:
    """What a model read and held: bytes from the shards, and the most blocks materialised at once."""

    bytes_read: int = 0
    peak_blocks: int = 0


class LayerwiseModel:
    """A checkpoint's model built on the meta device, run block by block from the shards."""

    def __init__(self, root: str | Path, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 progress: bool = False, logits: bool = False):
        """``logits``: the caller will ask for logits, so the final norm and the head must exist (checked
        here, before any pass runs)."""
        transformers = require_transformers()
        self.root = Path(root)
        if not self.root.is_dir():
            raise OrthopatchError("not a model folder", path=self.root)
        self.checkpoint = open_for_run(self.root)  # before transformers builds what config.json says
        self.reader = CheckpointReader(self.checkpoint)
        self.device, self.dtype = device, dtype
        self.progress = progress  # a bar of blocks on stderr for each pass
        self.stats = PassStats()
        try:
            self._build(transformers, logits)
        except BaseException:
            self.reader.close()
            raise

    def _build(self, transformers: Any, logits: bool) -> None:
        """The model on the meta device, its text decoder, blocks, embedding, head and final norm."""
        try:
            self.config = transformers.AutoConfig.from_pretrained(self.root)
            with parameters_on_meta():
                model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        except Exception as exc:  # transformers fails in many ways on a config it cannot build; all end as one line
            raise OrthopatchError(f"transformers cannot build this model ({first_line(exc)})",
                                  path=self.root / CONFIG_NAME) from None
        self.model = model.eval()
        if self.device.type != "cpu":
            for name, buffer in list(model.named_buffers()):
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner._buffers[leaf] = buffer.to(self.device)
        # Which checkpoint tensors feed each parameter (transformers renames or fuses some families').
        self.sources = parameter_sources(model, self.checkpoint.weight_map, self.root)
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.decoder = self._find_decoder()
        self.decoder_name = names[id(self.decoder)]
        self.blocks_name, self.blocks = self._find_blocks()
        self.embedding = model.get_input_embeddings()
        self.embedding_name = self._tensor_name(names[id(self.embedding)] + ".weight")
        head = model.get_output_embeddings()
        self.head_name = self.head_bias_name = None
        if head is not None:
            tied = head.weight is self.embedding.weight or any(
                getattr(c, "tie_word_embeddings", False) is True for c in (self.config, self.config.get_text_config()))
            own = names[id(head)] + ".weight"
            found = [n for n in (self._renamed(own), own, *HEAD_ALIASES.get(own, ())) if n and self.reader.has(n)]
            self.head_name = found[0] if found else self.embedding_name if tied else self._tensor_name(own)
            if isinstance(getattr(head, "bias", None), nn.Parameter):
                self.head_bias_name = names[id(head)] + ".bias"
        self.norm = next((getattr(self.decoder, n) for n in FINAL_NORM_NAMES if isinstance(
            getattr(self.decoder, n, None), nn.Module)), None)
        if logits and (self.norm is None or self.head_name is None):
            missing = " and ".join(w for w, v in (("final norm", self.norm), ("output head", self.head_name))
                                   if v is None)
            raise OrthopatchError(f"cannot find the model's {missing} in transformers' {type(model).__name__}",
                                  path=self.root / CONFIG_NAME)
        self._load_others(head)

    # -- structure ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.weight.shape[1])

    @property
    def context_length(self) -> int | None:
        value = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        return value if isinstance(value, int) else None

    def _find_decoder(self) -> nn.Module:
        """The text decoder: the module that embeds tokens and runs the blocks (Gemma 3's
        ``model.language_model``; the base model of a text-only family)."""
        try:
            decoder = self.model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        embedding = self.model.get_input_embeddings()
        for candidate in (decoder, self.model.base_model):
            if isinstance(candidate, nn.Module) and candidate is not self.model and any(
                    m is embedding for m in candidate.modules()):
                return candidate
        raise OrthopatchError(f"cannot find the text decoder of transformers' {type(self.model).__name__}",
                              path=self.root / CONFIG_NAME)

    def _find_blocks(self) -> tuple[str, nn.ModuleList]:
        """The text decoder's list of blocks, and its name in the whole model."""
        n = self.config.get_text_config().num_hidden_layers
        for name, module in self.decoder.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h"):
                return ".".join(p for p in (self.decoder_name, name) if p), module
        raise OrthopatchError(f"cannot find the model's {n} blocks", path=self.root / CONFIG_NAME)

    def _renamed(self, name: str) -> str | None:
        """The checkpoint tensor transformers loads into parameter ``name`` under its own or another name."""
        source = self.sources.get(name)
        if isinstance(source, Fused):
            raise OrthopatchError(f"is fused from {sum(map(len, source.groups))} tensors into {name!r}, which is "
                                  "read only as a whole tensor here", path=self.root, tensor=source.first)
        return source

    def _tensor_name(self, name: str) -> str:
        """The checkpoint's name for the model's parameter ``name`` (older files omit the base model's prefix)."""
        renamed = self._renamed(name)
        if renamed is not None:
            return renamed
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        for candidate in (name, name.removeprefix(prefix), prefix + name):
            if self.reader.has(candidate):
                return candidate
        raise OrthopatchError(f"the checkpoint has no tensor {name!r}, which transformers' "
                              f"{type(self.model).__name__} expects", path=self.root)

    def _set(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)

    def _read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        source = self.sources.get(name)
        if isinstance(source, Fused):
            return read_fused(source, self.reader, shape, dtype=self.dtype, device=self.device, root=self.root)
        stored = self._tensor_name(name)
        value = self.reader.read(stored)
        if tuple(value.shape) != tuple(shape):
            raise OrthopatchError(f"has shape {list(value.shape)}, the model expects {list(shape)}",
                                  path=self.root, tensor=stored)
        dtype = self.dtype if value.is_floating_point() else value.dtype
        return value.to(device=self.device, dtype=dtype)

    def _load_others(self, head: nn.Module | None) -> None:
        """Read the text decoder's parameters outside the blocks and the embedding (norms, position
        tables). Nothing of another tower (a vision encoder) is read, nor the head."""
        skip = {id(p) for p in self.blocks.parameters()} | {id(self.embedding.weight)}
        if head is not None:
            skip |= {id(p) for p in head.parameters()}
        for name, param in list(self.decoder.named_parameters()):
            if id(param) not in skip:
                full = f"{self.decoder_name}.{name}" if self.decoder_name else name
                self._set(self.model, full, self._read(full, tuple(param.shape)))

    # -- one block at a time -----------------------------------------------------------------------

    def _materialise(self, layer: int) -> None:
        block = self.blocks[layer]
        for name, param in list(block.named_parameters()):
            self._set(block, name, self._read(f"{self.blocks_name}.{layer}.{name}", tuple(param.shape)))
        resident = sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks)
        self.stats.peak_blocks = max(self.stats.peak_blocks, resident)

    def _release(self, layer: int) -> None:
        block = self.blocks[layer]
        for name, param in list(block.named_parameters()):
            self._set(block, name, torch.empty_like(param, device="meta"))

    def _embed(self, batch: Batch) -> torch.Tensor:
        """The embedding module's output, given only the rows of this batch's tokens."""
        rows = torch.unique(batch.ids)
        weight = self.reader.read_rows(self.embedding_name, rows.tolist())
        emb = self.embedding
        saved_weight, saved_pad = emb.weight, getattr(emb, "padding_idx", None)
        emb.weight = nn.Parameter(weight.to(device=self.device, dtype=self.dtype), requires_grad=False)
        if saved_pad is not None:
            emb.padding_idx = None  # ids are renumbered below; padding only matters for training
        try:
            return emb(torch.searchsorted(rows, batch.ids).to(self.device))
        finally:
            emb.weight = saved_weight
            if saved_pad is not None:
                emb.padding_idx = saved_pad

    def _capture_inputs(self, embeds: torch.Tensor, **forward: Any) -> list[tuple[torch.Tensor, tuple, dict]]:
        """What each block receives for this batch: (input of block 0, args, kwargs) per block.

        ``forward`` goes to the model's forward (a key-value cache); without it no cache is used."""
        records: list[tuple[torch.Tensor, tuple, dict]] = []
        originals = list(self.blocks)
        for i, block in enumerate(originals):
            self.blocks[i] = _StandIn(block, records, last=i == len(originals) - 1)
        try:
            self.decoder(inputs_embeds=embeds, **(forward or {"use_cache": False}))
        except _Stop:
            pass
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
        if len(records) != len(originals):
            raise OrthopatchError(f"the model's forward ran {len(records)} of its {len(originals)} blocks",
                                  path=self.root / CONFIG_NAME)
        return records

    @torch.inference_mode()
    def run(self, batches: list[Batch], observe: Observer | None = None,
            forward: list[dict[str, Any]] | None = None) -> torch.Tensor:
        """Run every batch through every block; return the residual stream after the last block at
        each prompt's last token, ``[prompts, hidden]`` (prompts in the callers' order).

        ``observe(L, states)`` sees the residual stream entering block ``L`` (``L = num_layers``:
        leaving the last block) at each prompt's last token, as float64 on the CPU. ``forward[b]``
        goes to the model's forward for batch ``b`` (its key-value cache).
        """
        hidden, records = [], []
        for b, batch in enumerate(batches):
            recorded = self._capture_inputs(self._embed(batch), **(forward[b] if forward else {}))
            hidden.append(recorded[0][0])
            records.append([(args, kwargs) for _, args, kwargs in recorded])
        for layer in steps(range(self.num_layers), self.num_layers, self.root.name, "block", self.progress):
            states = self._last_tokens(batches, hidden)
            self._check_finite(states, f"the hidden states entering block {layer}")
            if observe is not None:
                observe(layer, states.double().cpu())
            self._materialise(layer)
            try:
                for b, (args, kwargs) in enumerate(r[layer] for r in records):
                    out = self.blocks[layer](hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
            finally:
                self._release(layer)
        final = self._last_tokens(batches, hidden)
        self._check_finite(final, f"the hidden states leaving block {self.num_layers - 1}")
        if observe is not None:
            observe(self.num_layers, final.double().cpu())
        self.stats.bytes_read = self.reader.account.bytes_read
        return final

    def _check_finite(self, values: torch.Tensor, what: str) -> None:
        """A one-line error naming the model when ``values`` hold a NaN or an infinity."""
        finite = torch.isfinite(values).reshape(values.shape[0], -1).all(-1)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            hint = f" in {str(self.dtype).removeprefix('torch.')} (try --dtype float32)" \
                if self.dtype != torch.float32 else ""
            raise NonFiniteError(f"{what} are not finite (NaN or infinity) for {bad} of {values.shape[0]} "
                                 f"prompts{hint}", path=self.root)

    @staticmethod
    def _last_tokens(batches: list[Batch], hidden: list[torch.Tensor]) -> torch.Tensor:
        n = sum(len(b.order) for b in batches)
        out = torch.empty(n, hidden[0].shape[-1], dtype=hidden[0].dtype, device=hidden[0].device)
        for batch, h in zip(batches, hidden, strict=True):
            picked = h[torch.arange(h.shape[0], device=h.device), (batch.lengths - 1).to(h.device)]
            out[torch.tensor(batch.order, device=h.device)] = picked
        return out

    # -- greedy generation -------------------------------------------------------------------------

    def _new_cache(self) -> Any:
        transformers = require_transformers()
        try:
            return transformers.DynamicCache(config=self.config)
        except TypeError:  # older transformers: a cache without the config's layer types
            return transformers.DynamicCache()

    def _cache_keyword(self) -> str:
        """What the model's forward calls its key-value cache (``cache`` now, ``past_key_values`` before)."""
        return "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        """Greedy replies: each generated token is one pass over every block (the weights are read
        once per token). Prompts of the same length share a batch and a key-value cache, so a pass
        computes only the new token of each, with no padding; a prompt's tokens after its end are
        dropped, and a batch leaves the passes when all its prompts have ended."""
        keyword = self._cache_keyword()
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(i)
        going = [(members, self._new_cache()) for _, members in sorted(groups.items(), reverse=True)]
        feed = {i: list(prompts[i]) for i in range(len(prompts))}
        replies: list[list[int]] = [[] for _ in prompts]
        ended: set[int] = set()
        for _ in range(max_new_tokens):
            if not going:
                break
            batches, first = [], 0
            for members, _cache in going:
                ids = torch.tensor([feed[i] for i in members])
                batches.append(Batch(ids, torch.full((len(members),), ids.shape[1]),
                                     tuple(range(first, first + len(members)))))
                first += len(members)
            final = self.run(batches, forward=[{keyword: cache, "use_cache": True} for _, cache in going])
            tokens = self.logits(final).argmax(-1).tolist()
            order = [i for members, _ in going for i in members]
            for i, token in zip(order, tokens, strict=True):
                feed[i] = [token]
                if i not in ended:
                    replies[i].append(token)
                    if token in eos:
                        ended.add(i)
            going = [(members, cache) for members, cache in going if not ended.issuperset(members)]
        return replies

    # -- the output head ---------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """Next-token logits ``[prompts, vocab]`` (float32) from :meth:`run`'s result.

        Applies the final norm, then the head read in row blocks (the head is never held whole).
        """
        if self.norm is None or self.head_name is None:
            raise OrthopatchError("cannot find the model's final norm and output head", path=self.root / CONFIG_NAME)
        normed = self.norm(final.to(self.device, self.dtype))
        vocab = self.reader.shape(self.head_name)[0]
        out = torch.empty(normed.shape[0], vocab, dtype=torch.float32, device=self.device)
        for first, rows in self.reader.row_blocks(self.head_name):
            block = rows.to(device=self.device, dtype=self.dtype)
            out[:, first:first + block.shape[0]] = (normed @ block.T).float()
        if self.head_bias_name is not None:
            out += self._read(self.head_bias_name, (vocab,)).float()
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        self.stats.bytes_read = self.reader.account.bytes_read
        self._check_finite(out, "the next-token logits")
        return out

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> LayerwiseModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def block_bytes(model: LayerwiseModel) -> int:
    """Bytes of one block's parameters in the compute dtype (what one materialised block costs)."""
    return sum(math.prod(p.shape) for p in model.blocks[0].parameters()) * model.dtype.itemsize
