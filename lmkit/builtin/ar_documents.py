"""Document-isolated AR evaluation (``nll_doc``): each document scored with only its own tokens.

The validation stream is ``[BOS] doc [BOS] doc ...``. Document k runs from its BOS up to the next
one; its inputs are its own tokens, BOS first, and its targets are its tokens after BOS *and the
next document's BOS*, the event "this document ends", predicted from the document alone. So
every target of the stream is scored exactly once (the ``nll`` targets and its unscored tail),
the model pays for every boundary, and the figure is an exact code length of the stream: it
codes the documents one after another, each ended by a BOS. A document longer than ``seq_len``
continues in non-overlapping windows of the same document (each restarts its context; no
window ever sees another document).

Windows are packed several to a row: consecutive windows tile the stream, so a row is a
contiguous slice of it, and ``Transformer.forward_hidden(segments=...)`` keeps each window
attending only to itself (block-diagonal causal mask). RoPE sees only relative positions, so a
window's nats do not depend on where in its row it sits (up to float rounding).
"""

from __future__ import annotations

from typing import Any

import torch

from lmkit.core.bpb import Metric
from lmkit.core.contexts import DOCUMENT_ISOLATED
from lmkit.core.trunk import head_nats
from lmkit.errors import LmkitError


def document_windows(val: torch.Tensor, bos_id: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(first input position, number of inputs, document index) of every window, in stream
    order. Inputs ``a .. a+n-1`` predict the targets ``a+1 .. a+n``; a document starts at
    position 0 and at every BOS after it."""
    n = val.numel()
    if n < 2:
        raise LmkitError("the validation stream has no targets to score")
    starts = [0] + [int(p) for p in (val[1:] == bos_id).nonzero().flatten() + 1]
    ends = starts[1:] + [n - 1]  # the last input of a document is the token before the next BOS
    windows = []
    for doc, (s, e) in enumerate(zip(starts, ends, strict=True)):
        for a in range(s, e, seq_len):
            windows.append((a, min(seq_len, e - a), doc))
    return windows


def pack_windows(windows: list[tuple[int, int, int]], width: int) -> list[list[int]]:
    """Indices of the windows of each row: consecutive windows while they fit in ``width``."""
    rows: list[list[int]] = []
    used = width
    for i, (_, length, _) in enumerate(windows):
        if used + length > width:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += length
    return rows


def document_isolated_nll(model: torch.nn.Module, ctx: Any) -> Metric:
    """``nll_doc``: exact NLL with document-isolated windows, several windows per model row."""
    val = ctx.val_tokens
    seq = ctx.seq_len
    windows = document_windows(val, ctx.tokens.bos_id, seq)
    rows = pack_windows(windows, seq)
    n_docs = windows[-1][2] + 1
    lengths: dict[int, int] = {}
    for _, length, doc in windows:
        lengths[doc] = lengths.get(doc, 0) + length
    meter = ctx.meter("nll_doc", "exact", {
        "estimator": "exact NLL, document-isolated windows",
        "protocol": DOCUMENT_ISOLATED,
        "seq_len": seq, "documents": n_docs, "windows": len(windows), "rows": len(rows),
        "long_documents": sum(1 for v in lengths.values() if v > seq),
        "continuation": "non_overlapping: a document longer than seq_len continues in "
                        "non-overlapping windows of itself, each restarting its context",
        "targets": "every target of the stream; a document's last target is the next "
                   "document's BOS (its end), predicted from the document alone",
        "packing": "several windows per row, each attending only to itself (block-diagonal "
                   "causal mask)",
        "unscored_tail_tokens": 0,
    })
    offsets = torch.arange(seq)
    for b in range(0, len(rows), ctx.batch_size):
        chunk = rows[b:b + ctx.batch_size]
        first = torch.tensor([windows[r[0]][0] for r in chunk])
        used = torch.tensor([sum(windows[i][1] for i in r) for r in chunk])
        segment = torch.full((len(chunk), seq), -1, dtype=torch.long)
        for j, r in enumerate(chunk):
            col = 0
            for i in r:
                segment[j, col:col + windows[i][1]] = i
                col += windows[i][1]
        real = offsets[None, :] < used[:, None]
        pos = torch.where(real, first[:, None] + offsets[None, :], torch.zeros_like(segment))
        inputs = torch.where(real, val[pos], torch.full_like(pos, ctx.tokens.bos_id))
        targets = torch.where(real, val[pos + 1], torch.zeros_like(pos))
        with ctx.autocast():
            hidden = model.forward_hidden(inputs.to(ctx.device), segments=segment.to(ctx.device))
            nats = head_nats(model, hidden, targets.to(ctx.device))
        positions = torch.where(real, pos + 1, torch.full_like(pos, -1))
        meter.add_positions(positions.to(ctx.device), nats)
        ctx.progress(min(b + ctx.batch_size, len(rows)), len(rows))
    return meter.metric()
