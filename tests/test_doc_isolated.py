"""``nll_doc``: document-isolated AR evaluation equals scoring every document alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmkit.builtin.ar_documents import document_windows, pack_windows
from lmkit.core.data import load_val_tokens, open_data
from lmkit.core.evaluate import run_evaluation
from lmkit.testing import ObjectiveHarness


@pytest.fixture(scope="module")
def ar(tiny_data, tmp_path_factory):
    """A tiny AR model as `lmkit train` builds it, its zero-initialised layers woken so that
    its outputs depend on context."""
    return ObjectiveHarness("ar", tiny_data, tmp_path_factory.mktemp("ar_doc"))


def evaluate(h, val, options, lut=None):
    ctx = h.setup.eval_context(val, purpose="eval", options=options, batch_size=3, lut=lut)
    return {m.name: m.to_dict() for m in run_evaluation(h.model, h.objective, ctx)}


def planted_stream(tiny_data, bos: int) -> torch.Tensor:
    """Real validation text cut into documents of chosen lengths: shorter than, equal to and
    longer than seq_len (32), a one-token document, and a last document cut by the prefix."""
    val = load_val_tokens(open_data(tiny_data), 400).clone()
    val[val == bos] = 5  # only the planted BOS tokens start documents
    at = 0
    for length in (6, 32, 1, 75, 13, 33, 64, 2, 90):
        val[at] = bos
        at += length + 1
    return val


def per_document_reference(model, val: torch.Tensor, bos: int, seq: int, lut):
    """Loop over documents; run the model on each window of each document alone (batch of one,
    starting at position 0). Returns (nats, scored stream positions, their LUT bytes)."""
    starts = [0] + [p for p in range(1, val.numel()) if int(val[p]) == bos]
    ends = starts[1:] + [val.numel() - 1]
    nats, scored = 0.0, []
    for s, e in zip(starts, ends, strict=True):
        for a in range(s, e, seq):
            b = min(a + seq, e)
            with torch.no_grad():
                logits = model(val[a:b][None])
            ce = F.cross_entropy(logits[0].double(), val[a + 1:b + 1], reduction="sum")
            nats += float(ce)
            scored += list(range(a + 1, b + 1))
    pos = torch.tensor(scored)
    prev2 = torch.where(pos >= 2, val[(pos - 2).clamp(min=0)], torch.full_like(pos, -1))
    nbytes = int(lut.target_bytes(val[pos], val[pos - 1], prev2).sum())
    return nats, scored, nbytes


def test_nll_doc_equals_a_hand_computed_per_document_nll(tiny_data, ar):
    bos, seq = ar.tokens.bos_id, ar.seq_len
    val = planted_stream(tiny_data, bos)
    by = evaluate(ar, val, {"doc_isolated": True})
    doc = by["nll_doc"]
    nats, scored, nbytes = per_document_reference(ar.model.eval(), val, bos, seq, ar.setup.lut)
    # every target once: the next document's BOS is the last target of the one before it
    assert sorted(scored) == list(range(1, val.numel()))
    assert doc["tokens"] == len(scored) and doc["bytes"] == nbytes
    assert doc["value"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert doc["kind"] == "exact" and doc["detail"]["protocol"] == "document_isolated"
    assert doc["detail"]["long_documents"] == 5 and doc["detail"]["documents"] == 9
    # context matters: the same targets under the stream's windows score differently
    assert by["nll"]["detail"]["protocol"] == "non_overlapping"
    cross = evaluate(ar, val, {"stride": seq})["nll_sliding"]
    assert cross["tokens"] == doc["tokens"] and cross["bytes"] == doc["bytes"]
    assert not math.isclose(cross["value"], doc["value"], rel_tol=1e-6)


def test_windows_tile_the_stream_and_rows_pack_them():
    bos = 1
    val = torch.tensor([1, 7, 8, 9, 1, 4, 1, 5, 6, 7, 8, 9, 3, 1])
    windows = document_windows(val, bos, seq_len=4)
    # documents start at 0, 4, 6, 13; the last one (a lone BOS at the end) has no inputs
    assert windows == [(0, 4, 0), (4, 2, 1), (6, 4, 2), (10, 3, 2)]
    assert sum(n for _, n, _ in windows) == val.numel() - 1
    assert pack_windows(windows, 4) == [[0], [1], [2], [3]]
    assert pack_windows(windows, 8) == [[0, 1], [2, 3]]


def test_nll_doc_bytes_and_nats_agree_under_random_luts(ar):
    """Under a context-free probe whose nats are 0.5·bytes(t) + A per target, nll_doc's nats
    must equal 0.5·(its bytes) + A·(its tokens) for random per-id byte LUTs: its bytes are
    exactly those of the targets it scored."""
    h = ar
    for seed in (3, 4):
        lut = h.random_lut(seed)  # no leading spaces: the probe prices base bytes
        ctx = h.setup.eval_context(h.val_tokens.clone(), purpose="eval", lut=lut,
                                   options={"doc_isolated": True}, batch_size=4)
        with h.probe(lut) as probe:
            doc = next(m for m in run_evaluation(h.model, h.objective, ctx)
                       if m.name == "nll_doc")
        assert doc.tokens == h.val_tokens.numel() - 1
        nats = doc.value * math.log(2) * doc.bytes
        assert nats == pytest.approx(0.5 * doc.bytes + probe.A * doc.tokens, rel=1e-5)
