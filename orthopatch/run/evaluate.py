"""``orthopatch evaluate``: what an abliteration cost and what it changed.

- KL divergence of the next-token distribution at the first response position (the last token of
  the chat template's assistant opening), on harmless prompts, from SRC to MODEL:
  ``Σ p_src (log p_src − log p_model)``, mean and maximum over the prompts. Each model runs once,
  block by block, so each checkpoint is read once (plus its output head, in row blocks).
- Refusal rate on harmful prompts held out from measurement: greedy generation of
  ``max_new_tokens`` tokens; a reply containing a marker phrase (case-insensitive) is a refusal.
  Streamed, every generated token is one more pass over the weights (the checkpoint is read once per
  token; prompts of one length share a key-value cache, so a pass computes only the new tokens);
  ``in_memory`` loads each model whole with transformers and generates with its cache.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from orthopatch import __version__
from orthopatch.errors import OrthopatchError, first_line
from orthopatch.io.formats import CONFIG_NAME, EVALUATION_REPORT_FORMAT, GENERATION_CONFIG_NAME
from orthopatch.io.smallfile import read_small_json
from orthopatch.run.chat import decode, encode_set, load_tokenizer
from orthopatch.run.checks import open_for_run
from orthopatch.run.layerwise import LayerwiseModel, NonFiniteError, RunSettings, make_batches, require_transformers
from orthopatch.run.measure import PromptRecord
from orthopatch.run.prompts import PromptChoice, PromptSet, builtin_prompts, load_markers

#: ``apply --evaluate`` warns above this mean KL (nats) on the built-in harmless set: a first-token
#: distribution that moved this far no longer answers plain requests the way the source did.
KL_WARNING = 1.0


@dataclass(frozen=True)
class EvaluateOptions:
    """Everything ``evaluate`` needs; the CLI only builds one of these."""

    model: Path
    source: Path
    harmless: str | None = None  # None: the built-in held-out harmless set
    harmful: str | None = None  # None: the built-in held-out harmful set
    choice: PromptChoice = field(default_factory=PromptChoice)
    max_new_tokens: int = 32
    markers: Path | None = None
    refusals: bool = True
    in_memory: bool = False
    run: RunSettings = field(default_factory=RunSettings)
    quiet: bool = False
    #: ``ORG/NAME@COMMIT`` when the model (the source) was taken from the Hub, for the report.
    model_repo: str | None = None
    source_repo: str | None = None


@dataclass(frozen=True)
class EvaluateReport:
    """The figures ``evaluate`` prints, and writes with ``--json``."""

    model: str
    source: str
    kl_mean: float
    kl_max: float
    harmless: PromptRecord
    harmful: PromptRecord | None
    max_new_tokens: int
    model_refusals: int | None
    source_refusals: int | None
    streamed: bool
    model_bytes_read: int
    source_bytes_read: int
    seconds: float
    model_repo: str | None = None  # ORG/NAME@COMMIT of a model taken from the Hub; ``model`` is its path
    source_repo: str | None = None
    format: int = EVALUATION_REPORT_FORMAT
    orthopatch_version: str = __version__

    @property
    def model_refusal_rate(self) -> float | None:
        return None if self.model_refusals is None or not self.harmful else self.model_refusals / self.harmful.count

    @property
    def source_refusal_rate(self) -> float | None:
        return None if self.source_refusals is None or not self.harmful else self.source_refusals / self.harmful.count

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["model_refusal_rate"] = self.model_refusal_rate
        doc["source_refusal_rate"] = self.source_refusal_rate
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EvaluateReport:
        doc = {k: v for k, v in doc.items() if k not in ("model_refusal_rate", "source_refusal_rate")}
        doc["harmless"] = PromptRecord(**doc["harmless"])
        doc["harmful"] = PromptRecord(**doc["harmful"]) if doc.get("harmful") else None
        return cls(**doc)


def kl_divergence(source_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_source ‖ P_model) per row, in nats, computed in float64."""
    log_p = torch.log_softmax(source_logits.double(), dim=-1)
    log_q = torch.log_softmax(model_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


class StreamedRunner:
    """Next-token logits and greedy replies from a model run block by block from its shards."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, batch_size: int,
                 progress: bool = False):
        self.model = LayerwiseModel(root, device=device, dtype=dtype, progress=progress, logits=True)
        self.batch_size = batch_size

    @property
    def bytes_read(self) -> int:
        return self.model.reader.account.bytes_read

    @property
    def context_length(self) -> int | None:
        return self.model.context_length

    def next_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        return self.model.logits(self.model.run(make_batches(prompts, self.batch_size))).cpu()

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        return self.model.greedy(prompts, max_new_tokens, eos)

    def close(self) -> None:
        self.model.close()


class InMemoryRunner:
    """The same figures from a model transformers loads whole (when it fits in memory)."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype):
        transformers = require_transformers()
        open_for_run(root)  # before transformers builds what config.json says
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=dtype).to(device).eval()
        except Exception as exc:  # loading fails in many ways; all end as one line
            raise OrthopatchError(f"transformers cannot load the model ({first_line(exc)})", path=root) from None
        self.root, self.device = root, device
        self.bytes_read = 0

    @property
    def context_length(self) -> int | None:
        value = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return value if isinstance(value, int) else None

    @torch.inference_mode()
    def next_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        rows = [self.model(torch.tensor([p], device=self.device)).logits[0, -1].float().cpu() for p in prompts]
        logits = torch.stack(rows)
        finite = torch.isfinite(logits).all(-1)
        if not bool(finite.all()):
            raise NonFiniteError(f"the next-token logits are not finite (NaN or infinity) for "
                                 f"{int((~finite).sum())} of {len(rows)} prompts", path=self.root)
        return logits

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, eos: set[int]) -> list[list[int]]:
        replies = []
        for p in prompts:
            ids = torch.tensor([p], device=self.device)
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=sorted(eos) or None,
                                      pad_token_id=sorted(eos)[0] if eos else 0)
            reply = out[0, len(p):].tolist()
            for n, token in enumerate(reply):
                if token in eos:
                    reply = reply[: n + 1]
                    break
            replies.append(reply)
        return replies

    def close(self) -> None:
        pass


def _runner(root: Path, options: EvaluateOptions) -> StreamedRunner | InMemoryRunner:
    device, dtype = options.run.torch_device(), options.run.torch_dtype()
    if options.in_memory:
        return InMemoryRunner(root, device, dtype)
    return StreamedRunner(root, device, dtype, options.run.batch_size, progress=not options.quiet)


def reply_end_ids(tokenizer: Any, root: Path) -> set[int]:
    """Tokens that end a reply, the same for both runners: the tokenizer's end of sequence and every
    ``eos_token_id`` of the model's config, of its text config (multimodal models keep one there)
    and of ``generation_config.json`` (chat models list their end-of-turn token there)."""
    ids = set()
    if isinstance(getattr(tokenizer, "eos_token_id", None), int):
        ids.add(int(tokenizer.eos_token_id))
    config = read_small_json(root / CONFIG_NAME, "model config")
    docs = [config, config.get("text_config")] if isinstance(config, dict) else []
    if os.path.lexists(root / GENERATION_CONFIG_NAME):
        docs.append(read_small_json(root / GENERATION_CONFIG_NAME, "generation config"))
    for doc in docs:
        value = doc.get("eos_token_id") if isinstance(doc, dict) else None
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
    return ids


def is_refusal(reply: str, markers: tuple[str, ...]) -> bool:
    text = reply.lower().replace("’", "'")
    return any(m.lower().replace("’", "'") in text for m in markers)


def prepare_kl_check(source: Path, run: RunSettings, prompts: PromptSet | None = None) -> None:
    """Refuse now, in one line, a KL check that could not run later (``apply --evaluate`` calls it
    before writing anything): the device exists, the tokenizer loads and its chat template renders
    the prompts within the context, and transformers builds the model with its final norm and output
    head (on the meta device: only the small parameters outside the blocks are read)."""
    device, dtype = run.torch_device(), run.torch_dtype()
    tokenizer = load_tokenizer(run.tokenizer or source)
    with LayerwiseModel(source, device=device, dtype=dtype, logits=True) as model:
        encode_set(tokenizer, prompts or builtin_kl_prompts(), model.context_length)


def kl_check(model: Path, source: Path, prompts: PromptSet, run: RunSettings | None = None,
             quiet: bool = False) -> tuple[float, float]:
    """Mean and maximum KL(source ‖ model) at the first response position over ``prompts``, streamed."""
    options = EvaluateOptions(model=model, source=source, run=run or RunSettings(), refusals=False, quiet=quiet)
    tok = load_tokenizer(options.run.tokenizer or source)
    logits = []
    for root in (source, model):
        runner = _runner(root, options)
        try:
            logits.append(runner.next_logits(encode_set(tok, prompts, runner.context_length)))
        finally:
            runner.close()
    kl = _finite_kl(kl_divergence(*_same_vocabulary(logits[0], logits[1], model)), model)
    return float(kl.mean()), float(kl.max())


def _finite_kl(kl: torch.Tensor, where: Path) -> torch.Tensor:
    """The KL per prompt; a one-line error when one is not a number (a comparison with NaN is always false)."""
    if not all(math.isfinite(v) for v in kl.tolist()):
        raise NonFiniteError("the KL divergence from the source is not finite (NaN or infinity)", path=where)
    return kl


def _same_vocabulary(source: torch.Tensor, model: torch.Tensor, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if source.shape != model.shape:
        raise OrthopatchError(f"the model's output head has {model.shape[-1]} tokens, the source's "
                              f"{source.shape[-1]}: not the same vocabulary", path=where)
    return source, model


def evaluate(options: EvaluateOptions, log: Callable[[str], None] | None = None) -> EvaluateReport:
    """KL on harmless prompts and refusal rates on held-out harmful ones, for MODEL against SRC."""
    log = log or (lambda message: None if options.quiet else print(message, file=sys.stderr))
    started = time.monotonic()
    if options.max_new_tokens < 1:
        raise OrthopatchError(f"--max-new-tokens must be at least 1, not {options.max_new_tokens}")
    harmless = options.choice.choose(options.harmless, "harmless_eval", options.quiet)
    harmful = options.choice.choose(options.harmful, "harmful_eval", options.quiet) if options.refusals else None
    markers = load_markers(options.markers) if options.refusals else ()
    tokenizer = load_tokenizer(options.run.tokenizer or options.source)
    eos = reply_end_ids(tokenizer, options.source)

    logits: dict[str, torch.Tensor] = {}
    refusals: dict[str, int | None] = {"source": None, "model": None}
    bytes_read: dict[str, int] = {}
    for label, root in (("source", options.source), ("model", options.model)):
        runner = _runner(root, options)
        try:
            log(f"{label} {root}: next-token distributions on {len(harmless.prompts)} harmless prompts")
            logits[label] = runner.next_logits(encode_set(tokenizer, harmless, runner.context_length))
            if harmful is not None:
                how = "in memory" if options.in_memory else "one pass over the weights per token"
                log(f"{label} {root}: greedy replies of {options.max_new_tokens} tokens to "
                    f"{len(harmful.prompts)} harmful prompts ({how})")
                ids = encode_set(tokenizer, harmful, runner.context_length, reserve=options.max_new_tokens)
                replies = runner.greedy(ids, options.max_new_tokens, eos)
                refusals[label] = sum(is_refusal(decode(tokenizer, r), markers) for r in replies)
            bytes_read[label] = runner.bytes_read
        finally:
            runner.close()
    kl = _finite_kl(kl_divergence(*_same_vocabulary(logits["source"], logits["model"], options.model)), options.model)
    return EvaluateReport(
        model=str(options.model), source=str(options.source), kl_mean=float(kl.mean()), kl_max=float(kl.max()),
        harmless=PromptRecord(harmless.source, len(harmless.prompts), harmless.sha256),
        harmful=PromptRecord(harmful.source, len(harmful.prompts), harmful.sha256) if harmful else None,
        max_new_tokens=options.max_new_tokens, model_refusals=refusals["model"],
        source_refusals=refusals["source"], streamed=not options.in_memory,
        model_bytes_read=bytes_read["model"], source_bytes_read=bytes_read["source"],
        seconds=round(time.monotonic() - started, 3), model_repo=options.model_repo, source_repo=options.source_repo)


def format_report(report: EvaluateReport) -> str:
    def rate(count: int | None) -> str:
        if count is None or report.harmful is None:
            return "-"
        return f"{count}/{report.harmful.count} ({100 * count / report.harmful.count:.0f}%)"

    rows = [
        ("", "source", "model"),
        (f"KL mean / max ({report.harmless.count} harmless)", "0", f"{report.kl_mean:.4g} / {report.kl_max:.4g}"),
        ("refusal rate", rate(report.source_refusals), rate(report.model_refusals)),
        ("bytes read", f"{report.source_bytes_read:,}" if report.streamed else "-",
         f"{report.model_bytes_read:,}" if report.streamed else "-"),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows)


def builtin_kl_prompts() -> PromptSet:
    """The small harmless set ``apply --evaluate`` checks the KL on."""
    return builtin_prompts("harmless_eval")
