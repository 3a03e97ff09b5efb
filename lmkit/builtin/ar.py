"""The autoregressive baseline: next-token cross-entropy, scored by exact negative log-likelihood.

Evaluation reproduces the parameter-golf protocol (``nll``: non-overlapping ``seq_len`` windows)
and adds sliding windows (``--stride S``, ``nll_sliding``: the first window scores all its
targets, each later window only its last S, so every target is scored exactly once with at least
``seq_len - S`` tokens of context) and document-isolated windows (``--opt doc_isolated=true``,
``nll_doc``, :mod:`lmkit.builtin.ar_documents`). Each metric names its context protocol
(:mod:`lmkit.core.contexts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmkit.builtin.ar_documents import document_isolated_nll
from lmkit.core.bpb import Metric
from lmkit.core.contexts import NON_OVERLAPPING, sliding
from lmkit.core.trunk import ModelConfig, Transformer, logits_nats
from lmkit.errors import LmkitError
from lmkit.protocols import Batch, EvalContext, LossOutput, TokenSpec


@dataclass
class AROptions:
    """AR has no options of its own; the section exists so configs stay uniform."""


@dataclass
class AREvalOptions:
    stride: int = 0  # sliding-window stride for the extra `nll_sliding` metric (0 = off)
    doc_isolated: bool = False  # also `nll_doc`: each document scored with only its own tokens


def token_nats(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood in nats (float32), shape of ``targets``."""
    if isinstance(model, Transformer):  # the head and the loss in one
        return model.token_nats(model.forward_hidden(inputs), targets)
    return logits_nats(model(inputs), targets)


class ARObjective:
    name = "ar"
    description = "causal next-token prediction (the parameter-golf baseline); exact NLL"
    special_tokens: tuple[str, ...] = ()
    exact_next_token = True  # its NLL of a sequence is exact: it can judge other models' samples
    Options = AROptions
    EvalOptions = AREvalOptions

    def __init__(self, options: AROptions, tokens: TokenSpec):
        self.options = options
        self.tokens = tokens

    def configure_model(self, cfg: ModelConfig) -> ModelConfig:
        cfg.causal = True
        cfg.time_cond = False
        return cfg

    def loss(self, model: Transformer, batch: Batch) -> LossOutput:
        tokens = batch.tokens
        return LossOutput(token_nats(model, tokens[:, :-1], tokens[:, 1:]).mean())

    def evaluate(self, model: Transformer, ctx: EvalContext) -> list[Metric]:
        metrics = [self._windows(model, ctx, stride=0)]
        stride = ctx.options.stride
        if stride and ctx.purpose == "eval":
            if not 0 < stride <= ctx.seq_len:
                raise LmkitError(f"--stride must be between 1 and seq_len ({ctx.seq_len})")
            metrics.append(self._windows(model, ctx, stride=stride))
        if ctx.options.doc_isolated and ctx.purpose == "eval":
            metrics.append(document_isolated_nll(model, ctx))
        return metrics

    def _windows(self, model: Transformer, ctx: EvalContext, stride: int) -> Metric:
        val = ctx.val_tokens
        n_targets = val.numel() - 1
        if n_targets < 1:
            raise LmkitError("the validation stream has no targets to score")
        seq = min(ctx.seq_len, n_targets)
        # Each window: (start of its inputs, number of trailing positions it scores).
        if stride == 0:
            windows = [(i * seq, seq) for i in range(n_targets // seq)]
            name, detail = "nll", {"estimator": "exact NLL, non-overlapping windows",
                                   "protocol": NON_OVERLAPPING,
                                   "seq_len": seq, "windows": len(windows),
                                   "unscored_tail_tokens": n_targets - len(windows) * seq}
        else:
            windows, scored_to = [(0, seq)], seq
            while scored_to < n_targets:
                end = min(scored_to + stride, n_targets)
                windows.append((end - seq, end - scored_to))
                scored_to = end
            name, detail = "nll_sliding", {"estimator": "exact NLL, sliding windows",
                                           "protocol": sliding(stride),
                                           "seq_len": seq, "stride": stride,
                                           "windows": len(windows)}
        meter = ctx.meter(name, "exact", detail)
        share = meter.shard(len(windows), ctx.batch_size)  # under torchrun: this rank's
        windows = windows[share.start:share.stop]
        offsets = torch.arange(seq)
        for b in range(0, len(windows), ctx.batch_size):
            chunk = windows[b:b + ctx.batch_size]
            starts = torch.tensor([s for s, _ in chunk]).unsqueeze(1)
            inputs = val[starts + offsets].to(ctx.device)
            targets = val[starts + offsets + 1].to(ctx.device)
            # each window scores its last n targets: their stream positions, -1 elsewhere
            scored = torch.tensor([n for _, n in chunk]).unsqueeze(1)
            positions = torch.where(offsets >= seq - scored, starts + offsets + 1, -1)
            with ctx.autocast():
                nats = token_nats(model, inputs, targets)
            meter.add_positions(positions.to(ctx.device), nats)
            ctx.progress(min(b + ctx.batch_size, len(windows)), len(windows))
        return meter.metric()
