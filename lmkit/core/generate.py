"""Generation from a trained run (``lmkit sample``): the engine every sampler runs in.

Samplers are plugins (see :class:`lmkit.protocols.Sampler`); this module picks one that serves
the run's objective (by the capabilities it requires, or the objective names it lists), builds
its :class:`~lmkit.protocols.SampleContext`, counts the model calls it makes (a forward hook, so
no sampler can misreport its NFE), times it and decodes its tokens. Generation metrics are in
:mod:`lmkit.core.genmetrics`, the throughput benchmark in :mod:`lmkit.core.bench.sample`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmkit.core import config as config_mod
from lmkit.core import runs
from lmkit.core.build import CallCounter
from lmkit.core.device import autocast, synchronize
from lmkit.core.registry import Entry, get_objective, get_registry
from lmkit.core.sampling import DEFAULT_DTYPE, check_filters, make_generator
from lmkit.core.tokenizer import Tokenizer
from lmkit.errors import LmkitError
from lmkit.protocols import SampleContext, SampleResult

DOC_SEPARATOR = "\n\n"  # how a BOS (document start) inside a sample is shown in its text
DEFAULT_LENGTH = 128


def objective_capabilities(objective_cls: Any) -> set[str]:
    """What an objective class declares (``capabilities``), plus ``"next_token"`` when its logits
    are exact next-token probabilities (``exact_next_token = True``)."""
    caps = set(getattr(objective_cls, "capabilities", ()))
    if getattr(objective_cls, "exact_next_token", False):
        caps.add("next_token")
    return caps


def can_judge(objective: str) -> bool:
    """Objectives that declare ``exact_next_token = True``: their logits at i are exactly
    p(token i+1 | tokens <= i), so they can score samples (core names no objective)."""
    return "next_token" in objective_capabilities(get_objective(objective).obj)


# -- choosing a sampler ----------------------------------------------------------------------------
def serves(entry: Entry, objective: str) -> bool:
    """A sampler serves an objective whose capabilities include everything it ``requires``, or
    one it names in ``objectives`` (``"*"``: any)."""
    cls = entry.obj
    required = tuple(getattr(cls, "requires", ()))
    if required and set(required) <= objective_capabilities(get_objective(objective).obj):
        return True
    served = tuple(getattr(cls, "objectives", ()))
    return "*" in served or objective in served


def served_by(entry: Entry) -> list[str]:
    """The registered objectives a sampler serves, in registration order."""
    return [o for o in get_registry().entries["objective"] if serves(entry, o)]


def samplers_for(objective: str) -> list[Entry]:
    """Registered samplers serving ``objective``, in registration order (built-ins first)."""
    return [e for e in get_registry().entries["sampler"].values() if serves(e, objective)]


def resolve_sampler(objective: str, name: str | None) -> Entry:
    """The named sampler (checked against the objective) or the first that serves it."""
    if name is None:
        found = samplers_for(objective)
        if not found:
            raise LmkitError(f"no registered sampler serves objective {objective!r}; install a "
                             "plugin that provides one (see `lmkit samplers`)")
        return found[0]
    entry = get_registry().get("sampler", name)
    if not serves(entry, objective):
        ok = ", ".join(e.name for e in samplers_for(objective)) or "none"
        served = ", ".join(served_by(entry)) or "no registered"
        needs = tuple(getattr(entry.obj, "requires", ()))
        why = f" (objectives with the {', '.join(needs)} capability)" if needs else ""
        raise LmkitError(f"--sampler {name} serves {served} runs{why}, not {objective!r}; "
                         f"samplers for {objective}: {ok}")
    return entry


# -- tokens <-> text -------------------------------------------------------------------------------
def encode_prompt(tokenizer: Tokenizer, prompt: str | None) -> torch.Tensor:
    """``[BOS] + tokens(prompt)``: every sample starts a document, as in the training data."""
    ids = [tokenizer.bos_id] + (tokenizer.encode(prompt) if prompt else [])
    return torch.tensor(ids, dtype=torch.long)


def documents(ids: list[int], bos_id: int) -> list[list[int]]:
    """Split ids at each BOS (dropped): the documents a sample holds."""
    docs: list[list[int]] = [[]]
    for i in ids:
        if i == bos_id:
            docs.append([])
        else:
            docs[-1].append(i)
    return [d for d in docs if d] or [[]]


def decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Text of ids, one document after another (DOC_SEPARATOR between them)."""
    return DOC_SEPARATOR.join(tokenizer.decode(d) for d in documents(ids, tokenizer.bos_id))


# -- sampling --------------------------------------------------------------------------------------
def check_lengths(context: int, prompt_len: int, length: int) -> None:
    if length < 1:
        raise LmkitError(f"--length must be at least 1, got {length}")
    if prompt_len + length > context:
        raise LmkitError(
            f"--length {length} after a {prompt_len}-token prompt (BOS included) exceeds the "
            f"run's context of {context} tokens (train.seq_len); use --length "
            f"{max(context - prompt_len, 1)} or less, or a shorter --prompt")


@dataclass(frozen=True)
class SampleRequest:
    """What to generate: ``num`` samples of ``length`` tokens (default: 128, at most the context)
    after ``[BOS] + prompt``, ``steps`` denoising steps (diffusion samplers; default: length),
    the filters, the sampler's ``--opt`` ``options``, the model's ``precision`` and how many
    samples go through the model at once (``batch_size``; default: all). Same request, same
    samples: one generator seeded with ``seed`` serves all batches in turn."""

    num: int = 4
    length: int | None = None
    steps: int | None = None
    seed: int = 0
    prompt: str | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    options: dict[str, Any] | None = None
    precision: str = "fp32"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.num < 1:
            raise LmkitError(f"--num must be at least 1, got {self.num}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LmkitError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.steps is not None and self.steps < 1:
            raise LmkitError(f"--steps must be at least 1, got {self.steps}")
        check_filters(self.temperature, self.top_k, self.top_p)


def generate(model: torch.nn.Module, sampler_entry: Entry, *, objective: Any, tokens: Any,
             prompt: torch.Tensor, context: int, request: SampleRequest) -> list[dict[str, Any]]:
    """Run a sampler over ``request.num`` samples in batches; per batch: tokens, NFE, seconds.

    Returns one record per batch: ``tokens`` (int64 ``[b, P + length]``, on CPU), ``nfe`` (model
    calls), ``seconds`` and the sampler's ``detail``. ``request.length`` must be set.
    """
    r = request
    length = int(r.length or 0)
    check_lengths(context, prompt.numel(), length)
    device = next(model.parameters()).device
    cls = sampler_entry.obj
    sampler = cls() if isinstance(cls, type) else cls
    sampler_opts = sampler_options(sampler, r.options or {})
    generator = make_generator(r.seed, device)
    batch_size = r.batch_size or r.num
    out = []
    was_training = model.training
    model.eval()
    try:
        with CallCounter(model) as counter:
            for start in range(0, r.num, batch_size):
                ctx = SampleContext(
                    objective=objective, tokens=tokens, prompt=prompt,
                    num=min(batch_size, r.num - start), length=length, steps=r.steps or length,
                    context=context, generator=generator, device=device,
                    autocast=autocast(device, r.precision), temperature=r.temperature,
                    top_k=r.top_k, top_p=r.top_p, options=sampler_opts, dtype=DEFAULT_DTYPE,
                )
                calls = counter.calls
                synchronize(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    result = sampler.sample(model, ctx)
                synchronize(device)
                seconds = time.perf_counter() - t0
                ids = check_result(result, ctx, sampler_entry)
                out.append({"tokens": ids, "nfe": counter.calls - calls, "seconds": seconds,
                            "detail": dict(result.detail)})
    finally:
        model.train(was_training)
    return out


def sampler_options(sampler: Any, values: dict[str, Any]) -> Any:
    """The sampler's ``Options`` dataclass filled from ``--opt key=value`` (None if it has none)."""
    opts_cls = getattr(sampler, "Options", None)
    known = [f.name for f in dataclasses.fields(opts_cls)] if opts_cls is not None else []
    for key in values:
        if key not in known:
            raise LmkitError(f"--opt {key}: sampler {sampler.name} has no such option; its "
                             f"options: {', '.join(known) or 'none'}")
    return config_mod.build_options(opts_cls, values, "--opt") if opts_cls is not None else None


def check_result(result: SampleResult, ctx: SampleContext, entry: Entry) -> torch.Tensor:
    """The sampler's tokens, checked against the contract (shape, prompt kept, real ids only)."""
    who = f"sampler {entry.name!r} (plugin {entry.plugin!r}, {entry.distribution} {entry.version})"
    ids = result.tokens.detach().cpu().long()
    P = ctx.prompt.numel()
    if tuple(ids.shape) != (ctx.num, P + ctx.length):
        raise LmkitError(f"{who} returned tokens of shape {list(ids.shape)}, expected "
                         f"{[ctx.num, P + ctx.length]}; report this to its author")
    if not torch.equal(ids[:, :P], ctx.prompt.cpu().long().expand(ctx.num, -1)):
        raise LmkitError(f"{who} changed the prompt tokens; report this to its author")
    if ((ids < 0) | (ids >= ctx.tokens.vocab_size)).any():
        raise LmkitError(f"{who} emitted ids outside the vocabulary (MASK, PAD or beyond "
                         f"{ctx.tokens.vocab_size}); report this to its author")
    return ids


def sample_loaded(run: runs.Run, sampler: str | None = None, *,
                  model: torch.nn.Module | None = None, **request: Any) -> list[dict[str, Any]]:
    """Samples from a loaded run (or ``model``, e.g. an artifact's round trip); ``request``
    are :class:`SampleRequest`'s fields. See :func:`sample_run`."""
    entry = resolve_sampler(run.config.objective, sampler)
    req = SampleRequest(**request)
    prompt_ids = encode_prompt(run.tokenizer, req.prompt)
    context = run.config.train.seq_len
    if req.length is None:
        req = dataclasses.replace(req, length=max(1, min(DEFAULT_LENGTH,
                                                         context - prompt_ids.numel())))
    batches = generate(model or run.model, entry, objective=run.objective, tokens=run.tokens,
                       prompt=prompt_ids, context=context, request=req)
    P = prompt_ids.numel()
    samples = []
    for b, batch in enumerate(batches):
        per_sample = batch["seconds"] / batch["tokens"].size(0)
        for row in batch["tokens"].tolist():
            samples.append({
                "index": len(samples), "sampler": entry.name, "seed": req.seed, "batch": b,
                "prompt": req.prompt or "", "text": decode(run.tokenizer, row[1:]),
                "prompt_ids": row[:P], "token_ids": row[P:],
                "nfe": batch["nfe"], "seconds": per_sample,
                "tokens_per_s": req.length / per_sample if per_sample > 0 else math.inf,
                "detail": batch["detail"],
            })
    return samples


def sample_run(run_dir: str | Path, sampler: str | None = None, *, device: str = "auto",
               **request: Any) -> list[dict[str, Any]]:
    """Generate samples from a run's checkpoint, or from a packed artifact's round trip.

    ``request`` are :class:`SampleRequest`'s fields; ``sampler`` defaults to the first
    registered sampler serving the run's objective. Per sample: ``text`` (prompt included; a
    BOS shows as a blank line), ``prompt_ids``, ``token_ids`` (the generated ids), ``nfe``
    (model calls of its batch), ``seconds`` (its batch's wall time divided by the batch size)
    and ``tokens_per_s``. Same arguments, same samples.
    """
    from lmkit.core.evaluate import load_target

    run, model, _ = load_target(run_dir, device)
    return sample_loaded(run, sampler, model=model, **request)
