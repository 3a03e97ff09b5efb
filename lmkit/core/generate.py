"""Generation from a trained run: ``lmkit sample``, generation metrics and ``lmkit bench sample``.

Samplers are plugins (see :class:`lmkit.protocols.Sampler`); this module picks one for the run's
objective, builds its :class:`~lmkit.protocols.SampleContext`, counts the model calls it makes
(a forward hook, so no sampler can misreport its NFE), times it and decodes its tokens.

Generation metrics judge samples with an AR run: its exact NLL of the sampled tokens in bits per
byte of their decoded text (``gen_ppl``), always next to the samples' unigram entropy
(``gen_entropy``), since a judge's perplexity alone rewards repetition. All are ``kind: score``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmkit.core import config as config_mod
from lmkit.core import runs
from lmkit.core.bpb import BpbMeter, ByteLUT, Metric
from lmkit.core.device import autocast, resolve_device, synchronize
from lmkit.core.registry import Entry, get_registry
from lmkit.core.sampling import DEFAULT_DTYPE, check_filters, make_generator
from lmkit.errors import LmkitError
from lmkit.protocols import SampleContext, SampleResult

DOC_SEPARATOR = "\n\n"  # how a BOS (document start) inside a sample is shown in its text
DEFAULT_LENGTH = 128
def can_judge(objective: str) -> bool:
    """Objectives that declare ``exact_next_token = True``: their logits at i are exactly
    p(token i+1 | tokens <= i), so they can score samples (core names no objective)."""
    from lmkit.core.registry import get_objective

    return bool(getattr(get_objective(objective).obj, "exact_next_token", False))


# -- choosing a sampler ----------------------------------------------------------------------------
def serves(entry: Entry, objective: str) -> bool:
    served = tuple(getattr(entry.obj, "objectives", ()))
    return "*" in served or objective in served


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
        raise LmkitError(f"--sampler {name} serves {', '.join(entry.obj.objectives)} runs, not "
                         f"{objective!r}; samplers for {objective}: {ok}")
    return entry


# -- tokens <-> text -------------------------------------------------------------------------------
def load_tokenizer(run: runs.Run) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(run.tokenizer_path))


def encode_prompt(sp: Any, bos_id: int, prompt: str | None) -> torch.Tensor:
    """``[BOS] + tokens(prompt)``: every sample starts a document, as in the training data."""
    ids = [bos_id] + (sp.encode(prompt) if prompt else [])
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


def decode(sp: Any, ids: list[int], bos_id: int) -> str:
    """Text of ids, one document after another (DOC_SEPARATOR between them)."""
    return DOC_SEPARATOR.join(sp.decode(d) for d in documents(ids, bos_id))


# -- sampling --------------------------------------------------------------------------------------
class CallCounter:
    """Counts forward passes of a model (every pass embeds its input exactly once)."""

    def __init__(self, model: torch.nn.Module):
        self.calls = 0
        self._hook = model.embed.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._hook.remove()


def check_lengths(context: int, prompt_len: int, length: int) -> None:
    if length < 1:
        raise LmkitError(f"--length must be at least 1, got {length}")
    if prompt_len + length > context:
        raise LmkitError(
            f"--length {length} after a {prompt_len}-token prompt (BOS included) exceeds the "
            f"run's context of {context} tokens (train.seq_len); use --length "
            f"{max(context - prompt_len, 1)} or less, or a shorter --prompt")


def generate(
    model: torch.nn.Module,
    sampler_entry: Entry,
    *,
    objective: Any,
    tokens: Any,
    prompt: torch.Tensor,
    context: int,
    num: int,
    length: int,
    steps: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Run a sampler over ``num`` samples in batches; per batch: tokens, NFE and seconds.

    One generator seeded with ``seed`` serves all batches in turn, so the output is fixed by
    (seed, batch_size). Returns one record per batch: ``tokens`` (int64 ``[b, P + length]``, on
    CPU), ``nfe`` (model calls), ``seconds`` and the sampler's ``detail``.
    """
    if num < 1:
        raise LmkitError(f"--num must be at least 1, got {num}")
    check_lengths(context, prompt.numel(), length)
    check_filters(temperature, top_k, top_p)
    device = next(model.parameters()).device
    cls = sampler_entry.obj
    sampler = cls() if isinstance(cls, type) else cls
    sampler_opts = sampler_options(sampler, options or {})
    generator = make_generator(seed, device)
    batch_size = batch_size or num
    out = []
    was_training = model.training
    model.eval()
    counter = CallCounter(model)
    try:
        for start in range(0, num, batch_size):
            ctx = SampleContext(
                objective=objective, tokens=tokens, prompt=prompt, num=min(batch_size, num - start),
                length=length, steps=steps or length, context=context, generator=generator,
                device=device, autocast=autocast(device, precision), temperature=temperature,
                top_k=top_k, top_p=top_p, options=sampler_opts, dtype=DEFAULT_DTYPE,
            )
            calls = counter.calls
            synchronize(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                result = sampler.sample(model, ctx)
            synchronize(device)
            seconds = time.perf_counter() - t0
            ids = check_result(result, ctx, sampler_entry)
            out.append({"tokens": ids, "nfe": counter.calls - calls, "seconds": seconds,
                        "detail": dict(result.detail)})
    finally:
        counter.close()
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


def sample_loaded(
    run: runs.Run,
    sampler: str | None = None,
    *,
    num: int = 4,
    length: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    prompt: str | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
    batch_size: int | None = None,
    model: torch.nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Samples from a loaded run; see :func:`sample_run`."""
    entry = resolve_sampler(run.config.objective, sampler)
    sp = load_tokenizer(run)
    prompt_ids = encode_prompt(sp, run.tokens.bos_id, prompt)
    context = run.config.train.seq_len
    if length is None:
        length = max(1, min(DEFAULT_LENGTH, context - prompt_ids.numel()))
    batches = generate(model or run.model, entry, objective=run.objective, tokens=run.tokens,
                       prompt=prompt_ids, context=context, num=num, length=length, steps=steps,
                       seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                       options=options, precision=precision, batch_size=batch_size)
    P, bos = prompt_ids.numel(), run.tokens.bos_id
    samples = []
    for b, batch in enumerate(batches):
        per_sample = batch["seconds"] / batch["tokens"].size(0)
        for row in batch["tokens"].tolist():
            samples.append({
                "index": len(samples), "sampler": entry.name, "seed": seed, "batch": b,
                "prompt": prompt or "", "text": decode(sp, row[1:], bos),
                "prompt_ids": row[:P], "token_ids": row[P:],
                "nfe": batch["nfe"], "seconds": per_sample,
                "tokens_per_s": length / per_sample if per_sample > 0 else math.inf,
                "detail": batch["detail"],
            })
    return samples


def sample_run(run_dir: str | Path, sampler: str | None = None, *, device: str = "auto",
               **kwargs: Any) -> list[dict[str, Any]]:
    """Generate samples from a run's checkpoint; ``kwargs`` are :func:`sample_loaded`'s.

    ``num`` samples of ``length`` tokens; ``sampler`` defaults to the first registered sampler
    serving the run's objective; ``steps`` (diffusion samplers) defaults to ``length``; the
    prompt is ``[BOS] + tokens(prompt)``. Per sample: ``text`` (prompt included; a BOS shows as
    a blank line), ``prompt_ids``, ``token_ids`` (the generated ids), ``nfe`` (model calls of
    its batch), ``seconds`` (its batch's wall time divided by the batch size) and
    ``tokens_per_s``. Also: ``temperature``, ``top_k``, ``top_p``, ``options`` (the sampler's
    ``--opt``), ``precision`` (fp32 | bf16), ``batch_size`` (default: all at once) and ``seed``.
    Same arguments, same samples.
    """
    run = runs.load_run(run_dir, device=resolve_device(device))
    return sample_loaded(run, sampler, **kwargs)


# -- generation metrics ----------------------------------------------------------------------------
def check_judge(run_dir: str | Path, judge_run_dir: str | Path) -> None:
    """Refuse a judge that is not a causal next-token run with the run's tokenizer (cheap: reads
    run.json and the tokenizer copies, no weights; call it before a long evaluation)."""
    import json

    from lmkit.core.data import sha256_file

    judge_dir, run_dir = Path(judge_run_dir), Path(run_dir)
    if not run_dir.is_dir():
        raise LmkitError(f"--gen needs a run directory, not {run_dir}: generation metrics of a "
                         "packed artifact are not supported; pass its RUN_DIR")
    meta_path = judge_dir / runs.RUN_FILE
    if not meta_path.is_file():
        raise LmkitError(f"--judge {judge_dir} is not an lmkit run directory "
                         f"({runs.RUN_FILE} is missing); pass an AR run")
    meta = json.loads(meta_path.read_text())
    objective = meta.get("objective")
    if not can_judge(objective) or not meta["model"]["config"].get("causal", False):
        raise LmkitError(f"--judge {judge_dir} is a {objective!r} run; the judge must be an AR "
                         f"run (an objective with exact next-token NLL)")
    ours, theirs = run_dir / runs.TOKENIZER_FILE, judge_dir / runs.TOKENIZER_FILE
    if not theirs.is_file() or sha256_file(theirs) != sha256_file(ours):
        raise LmkitError(f"--judge {judge_dir} was trained with another tokenizer than "
                         f"{run_dir} ({theirs} differs from {ours}); judge with an AR run "
                         "trained on the same tokenized data")


def load_judge(judge_run_dir: str | Path, run: runs.Run, device: torch.device) -> runs.Run:
    """The judge run, once :func:`check_judge` accepts it."""
    check_judge(run.path, judge_run_dir)
    return runs.load_run(judge_run_dir, device=device)


def judge_nats(model: torch.nn.Module, seq: torch.Tensor, context: int) -> torch.Tensor:
    """Exact NLL (nats, float32) of ``seq[:, 1:]`` under a causal model, ``[B, N-1]``.

    Sequences longer than the judge's context are scored in sliding windows: each target is
    scored once, with at least ``context // 2`` tokens of context.
    """
    n_targets = seq.size(1) - 1
    out = torch.empty(seq.size(0), n_targets, device=seq.device)
    stride, done = max(1, context // 2), 0
    while done < n_targets:
        end = min(context, n_targets) if done == 0 else min(done + stride, n_targets)
        lo = max(0, end - context)
        logits = model(seq[:, lo:end])
        nats = F.cross_entropy(logits.float().transpose(1, 2), seq[:, lo + 1:end + 1],
                               reduction="none")
        out[:, done:end] = nats[:, done - lo:]
        done = end
    return out


def unigram_entropy(ids: list[int]) -> float:
    """Entropy in bits of the empirical token distribution of ``ids``."""
    if not ids:
        return 0.0
    counts = torch.bincount(torch.tensor(ids)).double()
    p = counts[counts > 0] / len(ids)
    return float(-(p * p.log2()).sum())


def generation_metrics(
    run_dir: str | Path,
    judge_run_dir: str | Path,
    sampler: str | None = None,
    num: int = 8,
    length: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    *,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> list[Metric]:
    """Generative perplexity (bpb under the judge), unigram entropy, NFE and tokens/s.

    All four are ``kind: score`` and are computed over the same samples (generated ids only; the
    prompt is context). Extra keyword arguments go to :func:`sample_loaded`.
    """
    dev = resolve_device(device)
    run = runs.load_run(run_dir, device=dev)
    judge = load_judge(judge_run_dir, run, dev)
    samples = sample_loaded(run, sampler, num=num, length=length, steps=steps, seed=seed,
                            **kwargs)
    if log:
        log(f"sampled {len(samples)} × {len(samples[0]['token_ids'])} tokens with "
            f"{samples[0]['sampler']}; judging with {judge.path}")
    rows = torch.tensor([s["prompt_ids"] + s["token_ids"] for s in samples], device=dev)
    P, L = len(samples[0]["prompt_ids"]), len(samples[0]["token_ids"])
    lut = ByteLUT.from_sentencepiece(run.tokenizer_path, size=run.model.padded_vocab).to(dev)
    with torch.no_grad():
        nats = judge_nats(judge.model, rows, judge.config.train.seq_len)[:, P - 1:]
    targets, prev = rows[:, P:], rows[:, P - 1:-1]
    prev2 = torch.cat([torch.full_like(rows[:, :1], -1), rows], dim=1)[:, P - 1:-2]
    base = {"sampler": samples[0]["sampler"], "samples": len(samples), "length": L,
            "prompt_tokens": P, "seed": seed, "steps": samples[0]["detail"].get("steps"),
            "temperature": kwargs.get("temperature", 1.0), "judge": str(judge.path),
            "sampling_dtype": str(DEFAULT_DTYPE).replace("torch.", "")}
    meter = BpbMeter(lut, "gen_ppl", "score", {
        **base, "estimator": "judge's exact NLL of the sampled tokens per LUT byte of their text",
        "note": "a score of the samples, not of a held-out text; read it next to gen_entropy "
                "(repetitive text gets a low gen_ppl)",
    })
    meter.add(nats, targets, prev, prev2=prev2)
    ppl = meter.metric()
    ppl.detail["perplexity_per_token"] = math.exp(ppl.value * math.log(2) * ppl.bytes / ppl.tokens)
    n_tokens, n_bytes = ppl.tokens, ppl.bytes
    per_sample = torch.tensor([unigram_entropy(s["token_ids"]) for s in samples],
                              dtype=torch.float64)
    stderr = float(per_sample.std() / math.sqrt(len(samples))) if len(samples) > 1 else None
    pooled = [i for s in samples for i in s["token_ids"]]
    entropy = Metric("gen_entropy", "score", float(per_sample.mean()), "bits", stderr, n_tokens,
                     n_bytes, {**base, "estimator": "unigram entropy of each sample's tokens, "
                               "mean over samples", "pooled_entropy_bits": unigram_entropy(pooled),
                               "distinct_tokens": len(set(pooled))})
    seconds = sum(s["seconds"] for s in samples)
    nfe = Metric("gen_nfe", "score", float(sum(s["nfe"] for s in samples) / len(samples)),
                 "calls", None, n_tokens, n_bytes,
                 {**base, "estimator": "model calls per sample (of its batch)"})
    speed = Metric("gen_tokens_per_s", "score", n_tokens / seconds if seconds else math.inf,
                   "tokens/s", None, n_tokens, n_bytes,
                   {**base, "estimator": "generated tokens / sampling wall time",
                    "device": str(dev), "seconds": seconds})
    return [ppl, entropy, nfe, speed]


def add_generation_metrics(result: dict[str, Any], judge_run_dir: str | Path, *,
                           sampler: str | None = None, num: int = 8, length: int | None = None,
                           steps: int | None = None, seed: int | None = None,
                           device: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """Append the generation metrics to an ``lmkit eval`` result and rewrite its ``eval.json``.

    ``result`` is what :func:`lmkit.core.evaluate.evaluate_run` returned (its ``run`` names the
    run directory); ``seed`` None means 0.
    """
    run_dir = Path(result["run"])
    check_judge(run_dir, judge_run_dir)
    metrics = generation_metrics(run_dir, judge_run_dir, sampler, num, length, steps,
                                 0 if seed is None else seed, device=device, **kwargs)
    result["metrics"] = [*result["metrics"], *(m.to_dict() for m in metrics)]
    runs.write_json(run_dir / runs.EVAL_FILE, result)
    return result


# -- benchmark -------------------------------------------------------------------------------------
def fresh_model(objective: str, preset: str, device: torch.device) -> tuple[Any, Any, int, Any]:
    """(objective, model, context, tokens) of a freshly initialised ``preset`` model.

    Sampling throughput does not depend on the weights, so the benchmark needs no trained run.
    """
    from lmkit.core.registry import get_objective
    from lmkit.core.trunk import Transformer
    from lmkit.protocols import TokenSpec

    cfg = config_mod.resolve_config(preset=preset, flags={"objective": objective})
    cls = get_objective(objective).obj
    vocab = 1024
    tokens = TokenSpec(vocab_size=vocab, bos_id=1,
                       special={n: vocab + i for i, n in enumerate(cls.special_tokens)})
    obj = cls(config_mod.build_options(cls.Options, cfg.options, "options"), tokens)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(obj.configure_model(cfg.model), vocab, len(tokens.special))
    return obj, model.to(device).eval(), cfg.train.seq_len, tokens


BENCH_VARIANTS = {
    # objective -> (label, sampler, options); the first is the reference of the ratios
    "ar": [("ar (kv cache)", "ar", {"use_cache": True}),
           ("ar (no cache)", "ar", {"use_cache": False})],
    "mdlm": [("ddpm", "ddpm", {}), ("ddpm_cache", "ddpm_cache", {}),
             ("confidence", "confidence", {})],
}


def bench_sample(
    *,
    ar_run: str | Path | None = None,
    mdlm_run: str | Path | None = None,
    preset: str = "small",
    num: int = 2,
    length: int = 128,
    steps: int | None = None,
    seed: int = 0,
    repeats: int = 2,
    device: str = "auto",
    precision: str = "fp32",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Tokens/s and NFE of ``ar`` with vs without its KV cache, and of ``ddpm``, ``ddpm_cache``
    and ``confidence`` at the same T, side by side in one process (best of ``repeats``).

    ``steps`` defaults to 4 × ``length``: caching pays off when T exceeds the tokens to reveal
    (``confidence`` reveals at least one token per step, so it takes min(T, length) steps).
    Without a run, a freshly initialised ``preset`` model stands in (said in the output). The
    pairs that must agree (cached vs uncached AR, ddpm vs ddpm_cache) are checked token for token.
    """
    dev = resolve_device(device)
    groups = []
    for objective, run_dir in (("ar", ar_run), ("mdlm", mdlm_run)):
        if run_dir is not None:
            run = runs.load_run(run_dir, device=dev)
            obj, model, context, tokens = (run.objective, run.model, run.config.train.seq_len,
                                           run.tokens)
            source = str(run.path)
        else:
            obj, model, context, tokens = fresh_model(objective, preset, dev)
            source = f"freshly initialised {preset!r} model (throughput does not need training)"
        n = min(length, context - 1)
        T = steps or 4 * n
        kw = dict(objective=obj, tokens=tokens, prompt=torch.tensor([tokens.bos_id]),
                  context=context, num=num, seed=seed, precision=precision)
        rows, outputs = [], []
        for label, name, options in BENCH_VARIANTS[objective]:
            entry = resolve_sampler(obj.name, name)
            generate(model, entry, **kw, length=min(8, n), options=options)  # warm-up
            runs_ = [generate(model, entry, **kw, length=n, steps=T, options=options)[0]
                     for _ in range(repeats)]
            best = min(runs_, key=lambda r: r["seconds"])
            outputs.append(best["tokens"])
            rows.append({"label": label, "sampler": name, "options": options, "nfe": best["nfe"],
                         "seconds": best["seconds"], "tokens_per_s": num * n / best["seconds"]})
            if log:
                log(f"{objective}: {label}: {rows[-1]['tokens_per_s']:,.0f} tokens/s, "
                    f"NFE {best['nfe']}")
        for row in rows:
            row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
            row["nfe_ratio"] = row["nfe"] / rows[0]["nfe"]
        groups.append({
            "objective": objective, "model": source, "num": num, "length": n,
            "steps": T if objective != "ar" else None, "reference": rows[0]["label"],
            "rows": rows,
            "identical_tokens": {f"{rows[0]['label']} == {rows[1]['label']}":
                                 torch.equal(outputs[0], outputs[1])},
        })
    return {"benchmark": "sample", "device": str(dev), "threads": torch.get_num_threads(),
            "precision": precision, "repeats": repeats, "seed": seed, "groups": groups}
