"""Leak checks: no validation document in training (prepare, `lmkit data check`) and no
information across documents or from the future inside the trunk."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from lmkit.core.config import PRESETS
from lmkit.core.data import (
    DOC_HASHES_NAME,
    ListCorpus,
    check_data,
    find_shards,
    load_shard,
    prepare_data,
    read_doc_hashes,
    text_digest,
    train_tokenizer,
    write_shard,
)
from lmkit.core.data.leaks import RECORD_BYTES, shard_documents
from lmkit.core.masking import document_segments
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError
from tests.test_cli import run_cli as cli_run

DOCS = [f"Document {i} talks about subject {i * 7 % 13} for a sentence or two. Then it ends."
        for i in range(40)]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``tests.test_cli.run_cli`` with stderr's line wrapping undone."""
    code, out, err = cli_run(args, capsys)
    return code, out, " ".join(err.split())


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(DOCS, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=300)


def val_indices(out: Path) -> list[int]:
    _, is_val = read_doc_hashes(out / DOC_HASHES_NAME)
    return np.flatnonzero(is_val).tolist()


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, tok: Path) -> tuple[list[str], int, int]:
    """DOCS with a training document replaced by a copy of a validation document (the split is a
    function of the document count and seed only, so it is unchanged): (docs, val i, train j)."""
    clean = tmp_path_factory.mktemp("clean") / "d"
    prepare_data(ListCorpus("toy", DOCS), clean, tokenizer=tok, val_fraction=0.1)
    val = val_indices(clean)
    i = val[0]
    j = next(k for k in range(len(DOCS)) if k not in val)
    docs = list(DOCS)
    docs[j] = "  " + DOCS[i].replace(" ", "\n", 3) + "\n"  # the same text, rewrapped
    return docs, i, j


# --- hashes written by prepare -----------------------------------------------------------------


def test_text_digest_normalization() -> None:
    assert len(text_digest("a b")) == 16
    assert text_digest("a b") == text_digest(" a \n\t b\n") == text_digest("a\u00a0b")
    assert text_digest("\ufb01ne") == text_digest("fine")  # NFKC, as the tokenizer normalizes
    assert text_digest("a b") != text_digest("a  c") and text_digest("ab") != text_digest("a b")


def test_prepare_writes_doc_hashes(tmp_path: Path, tok: Path) -> None:
    docs = [*DOCS[:10], "   ", *DOCS[10:]]  # a blank document is skipped, not hashed
    m = prepare_data(ListCorpus("toy", docs), tmp_path / "d", tokenizer=tok, val_fraction=0.1)
    path = tmp_path / "d" / DOC_HASHES_NAME
    digests, is_val = read_doc_hashes(path)
    assert path.stat().st_size == 16 + RECORD_BYTES * len(DOCS)
    assert [bytes(d) for d in digests] == [text_digest(d) for d in DOCS]
    assert m["doc_hashes"] == {
        "file": DOC_HASHES_NAME, "hash": "blake2b-128", "normalization": m["doc_hashes"][
            "normalization"], "train_documents": 36, "val_documents": 4, "overlap_documents": 0,
        "val_duplicates": 0, "allow_overlap": False}
    assert int(is_val.sum()) == m["split"]["val_documents"] == 4
    # the val shard holds exactly the documents the hash file marks as val
    val_toks = load_shard(find_shards(tmp_path / "d", "val")[0])
    assert int((val_toks == 1).sum()) == 4


def test_prepare_refuses_a_val_document_planted_in_training(tmp_path: Path, tok: Path,
                                                            planted) -> None:
    docs, i, j = planted
    with pytest.raises(LmkitError) as e:
        prepare_data(ListCorpus("toy", docs), tmp_path / "d", tokenizer=tok, val_fraction=0.1)
    msg = str(e.value)
    assert "1 of 4 validation documents" in msg and f"document {i} (val)" in msg
    assert f"document {j} (train)" in msg and "--allow-overlap" in msg and "\n" not in msg
    assert not (tmp_path / "d").exists() and list(tmp_path.iterdir()) == []


def test_prepare_refusal_is_one_cli_error(tmp_path: Path, tok: Path, planted, capsys) -> None:
    docs, i, _ = planted
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "d"
    base = ["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(tok), "--out", str(out),
            "--val-fraction", "0.1"]
    code, _, err = run_cli(base, capsys)
    assert code == 1 and "Error: 1 of 4 validation documents" in err and not out.exists()
    assert "Traceback" not in err
    code, _, err = run_cli([*base, "--allow-overlap"], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["doc_hashes"]["overlap_documents"] == 1 and m["doc_hashes"]["allow_overlap"] is True
    # `data check` still fails the directory: overlap is a leak even when it was allowed
    code, text, _ = run_cli(["data", "check", str(out)], capsys)
    assert code == 1
    assert "1 val documents also in train (25.00% of val docs)" in text and "LEAK" in text
    assert f"first: val document {i} = train document" in text and "--allow-overlap" in text
    code, text, _ = run_cli(["data", "check", str(out), "--token-ids", "--json"], capsys)
    report = json.loads(text)
    assert code == 1 and report["leak"] and not report["ok"] and report["layout"] == "lmkit"
    by_name = {c["name"]: c for c in report["checks"]}
    assert by_name["text"]["overlap_documents"] == 1
    assert by_name["text"]["first"]["val_document"] == i
    assert by_name["tokens"]["overlap_documents"] == 1  # nmt_nfkc folds the rewrapping too


def test_check_clean_lmkit_dir(tiny_data: Path, capsys) -> None:
    code, text, _ = run_cli(["data", "check", str(tiny_data)], capsys)
    assert code == 0, text
    assert "27 train / 3 val documents; 0 val documents also in train" in text
    assert text.strip().endswith("ok: no validation document occurs in training")
    report = check_data(tiny_data, tokens=True)
    assert report["ok"] and [c["name"] for c in report["checks"]] == ["text", "tokens"]
    assert report["checks"][1]["val_documents"] == 3 and report["checks"][1]["val_tokens"] > 0


def test_check_notices_a_manifest_that_disagrees(tmp_path: Path, tok: Path, capsys) -> None:
    out = tmp_path / "d"
    prepare_data(ListCorpus("toy", DOCS), out, tokenizer=tok, val_fraction=0.1)
    m = json.loads((out / "manifest.json").read_text())
    m["doc_hashes"]["val_documents"] = 5
    (out / "manifest.json").write_text(json.dumps(m))
    code, text, _ = run_cli(["data", "check", str(out)], capsys)
    assert code == 1 and "doc_hashes.val_documents is 5 but doc_hashes.bin gives 4" in text
    (out / DOC_HASHES_NAME).write_bytes(b"garbage")
    code, _, err = run_cli(["data", "check", str(out)], capsys)
    assert code == 1 and err.startswith("Error:") and DOC_HASHES_NAME in err


# --- official parameter-golf shards --------------------------------------------------------------


def official_dir(root: Path, train_docs: list[np.ndarray], val_docs: list[np.ndarray],
                 shard_tokens: int = 50) -> Path:
    """fineweb_{train,val}_*.bin as parameter-golf writes them: [BOS] + ids per document,
    documents split across shards at a fixed size."""
    root.mkdir(parents=True)
    for split, docs in (("train", train_docs), ("val", val_docs)):
        stream = np.concatenate([np.concatenate([[1], d]) for d in docs]).astype(np.uint16)
        for k, start in enumerate(range(0, len(stream), shard_tokens)):
            write_shard(root / f"fineweb_{split}_{k:06d}.bin", stream[start:start + shard_tokens])
    return root


def random_docs(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 1024, rng.integers(3, 40)).astype(np.uint16) for _ in range(n)]


def test_shard_documents_cross_chunk_and_shard_boundaries(tmp_path: Path) -> None:
    docs = random_docs(30, 0)
    d = official_dir(tmp_path / "o", docs, docs[:2], shard_tokens=17)
    train = find_shards(d, "train")
    assert len(train) > 5
    for chunk in (1, 5, 1 << 20):
        got = list(shard_documents(train, 1, chunk))
        assert [n for _, n in got] == [len(x) + 1 for x in docs]
        assert len({g for g, _ in got}) == 30


def test_check_official_shards_without_overlap(tmp_path: Path, capsys) -> None:
    docs = random_docs(60, 1)
    d = official_dir(tmp_path / "o", docs[10:], docs[:10])
    code, text, _ = run_cli(["data", "check", str(d)], capsys)
    assert code == 0, text
    assert "(shards layout)" in text and "50 train / 10 val documents; 0 val documents" in text


def test_check_official_shards_with_overlap(tmp_path: Path, capsys) -> None:
    docs = random_docs(60, 2)
    val = docs[:10]
    train = docs[10:30] + [val[3]] + docs[30:] + [val[3], val[7]]  # planted, one twice
    d = official_dir(tmp_path / "o", train, val)
    code, text, _ = run_cli(["data", "check", str(d), "--json"], capsys)
    report = json.loads(text)
    c = report["checks"][0]
    assert code == 1 and report["leak"] and c["name"] == "tokens"
    assert (c["train_documents"], c["val_documents"], c["overlap_documents"]) == (53, 10, 2)
    assert c["first"] == {"val_document": 3, "train_document": 20}
    val_tokens = sum(len(v) + 1 for v in val)
    assert c["val_tokens"] == val_tokens
    assert c["overlap_tokens"] == len(val[3]) + len(val[7]) + 2
    assert c["overlap_share"] == pytest.approx(0.2)
    code, text, _ = run_cli(["data", "check", str(d)], capsys)
    assert code == 1 and "2 val documents also in train (20.00% of val docs" in text


def test_check_official_docs_jsonl(tmp_path: Path, capsys) -> None:
    docs = random_docs(20, 3)
    d = official_dir(tmp_path / "o", docs[4:], docs[:4])
    texts = [f"text of document {i}, with some words" for i in range(20)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    lines[6] = "{not json"  # robust: counted, skipped, indices stay put
    lines[8] = json.dumps({"body": "no text field"})
    lines.insert(3, "")
    jsonl = tmp_path / "docs_selected.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    code, text, _ = run_cli(["data", "check", str(d), "--docs", str(jsonl), "--json"], capsys)
    report = json.loads(text)
    assert code == 0, text
    t = report["checks"][1]
    assert t["name"] == "text" and t["val_documents"] == 4 and t["train_documents"] == 14
    assert t["unreadable_lines"] == 2 and t["first_unreadable_line"] == 8  # 1-based, blank kept
    # a validation text reappearing later (whitespace differs) is a leak even if tokens differ
    lines.append(json.dumps({"text": "  " + texts[2].upper().lower() + "\n"}))
    jsonl.write_text("\n".join(lines) + "\n")
    code, text, _ = run_cli(["data", "check", str(d), "--docs", str(jsonl)], capsys)
    assert code == 1 and "first: val document 2 = train document 20" in text
    assert "(the first 4 documents are validation)" in text and "2 unreadable lines" in text
    code, _, err = run_cli(["data", "check", str(d), "--docs", str(jsonl), "--text-field", "x"],
                           capsys)
    assert code == 1 and "--text-field" in err


def test_check_errors_are_one_line(tmp_path: Path, tiny_data: Path, capsys) -> None:
    code, _, err = run_cli(["data", "check", str(tmp_path / "nope")], capsys)
    assert code == 1 and err.startswith("Error:") and "does not exist" in err
    code, _, err = run_cli(["data", "check", str(tiny_data), "--docs", str(tmp_path / "x")],
                           capsys)
    assert code == 1 and "--docs is for parameter-golf directories" in err


# --- the trunk: no information from the future or from another document ----------------------

BOS, VOCAB = 1, 61


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only spins (80x slower on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_preset(name: str, **flags) -> ModelConfig:
    """A preset's structural switches (GQA or MHA, skips, x0 mix, scales, tied head, softcap,
    q gain, MLP width) at d=32 and 5 layers (so U-Net skips connect 2 encoder blocks)."""
    cfg = dataclasses.replace(ModelConfig(), **PRESETS[name]["model"])
    kv = 4 if cfg.n_kv_head == cfg.n_head else 2
    return dataclasses.replace(cfg, n_layer=5, d_model=32, n_head=4, n_kv_head=kv, cond_dim=16,
                               **flags)


def perturbed(cfg: ModelConfig) -> Transformer:
    """A model whose zero-initialised projections (which would hide any mixing) carry signal."""
    torch.manual_seed(0)
    model = Transformer(cfg, VOCAB).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def influence(model: Transformer, idx: Tensor, out: str, cond: Tensor | None = None,
              segments: Tensor | None = None) -> Tensor:
    """[T, T]: entry (i, j) is the size of d(output at i)/d(input embedding at j), exactly 0 where
    position i cannot see position j. Every path from a token into the network starts at its
    embedding row, so this covers attention, skips, the x0 mix and anything added later."""
    store = {}

    def hook(module, args, emb):
        store["emb"] = emb.detach().requires_grad_(True)
        return store["emb"]

    handle = model.embed.register_forward_hook(hook)
    try:
        h = model.forward_hidden(idx, cond, segments=segments)
        y = model.logits(h) if out == "logits" else h
    finally:
        handle.remove()
    proj = torch.randn(y.size(-1), generator=torch.Generator().manual_seed(2))
    rows = []
    for i in range(idx.size(1)):
        (g,) = torch.autograd.grad(y[0, i] @ proj, store["emb"], retain_graph=True)
        rows.append(g[0].abs().sum(-1))
    return torch.stack(rows)


def cond_for(cfg: ModelConfig) -> Tensor | None:
    return torch.tensor([0.37]) if cfg.time_cond else None


PRESET_NAMES = sorted(PRESETS)


@pytest.mark.parametrize("time_cond", [False, True])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_causal_logits_ignore_later_tokens(preset: str, time_cond: bool) -> None:
    cfg = tiny_preset(preset, causal=True, time_cond=time_cond)
    model = perturbed(cfg)
    idx = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    idx[0, [0, 5]] = BOS
    inf = influence(model, idx, "logits", cond_for(cfg))
    future = torch.triu(torch.ones_like(inf, dtype=torch.bool), diagonal=1)
    assert (inf[future] == 0).all(), f"{preset}: a logit depends on a later token"
    assert (inf[~future] > 0).all()  # and on every earlier one: the check is not vacuous
    base = model(idx, cond_for(cfg))
    for i in (0, 4, 10):  # change everything after i: logits up to i stay put
        changed = idx.clone()
        changed[0, i + 1:] = (changed[0, i + 1:] + 11) % VOCAB
        again = model(changed, cond_for(cfg))
        torch.testing.assert_close(again[:, : i + 1], base[:, : i + 1], atol=1e-5, rtol=0)
        assert not torch.allclose(again[:, i + 1:], base[:, i + 1:])


DOC_STARTS = (0, 4, 9)  # three packed documents: A = 0..3, B = 4..8, C = 9..13


def packed_row() -> tuple[Tensor, Tensor]:
    idx = torch.randint(2, VOCAB, (1, 14), generator=torch.Generator().manual_seed(4))
    idx[0, list(DOC_STARTS)] = BOS
    # the segments mdlm's document mode passes: a BOS starts a new segment
    spec = types.SimpleNamespace(documents=True, bos_id=BOS)
    return idx, document_segments(idx, spec)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_segments_keep_documents_apart(preset: str, causal: bool) -> None:
    cfg = tiny_preset(preset, causal=causal, time_cond=not causal)
    model = perturbed(cfg)
    idx, seg = packed_row()
    inf = influence(model, idx, "hidden", cond_for(cfg), seg)
    same = seg[0, :, None] == seg[0, None, :]
    visible = same.tril() if causal else same
    assert (inf[~same] == 0).all(), f"{preset}: a position sees another document"
    assert (inf[visible] > 0).all()
    # change document B: A and C are bit-for-bit what they were, B is not
    h = model.forward_hidden(idx, cond_for(cfg), segments=seg)
    changed = idx.clone()
    changed[0, 5:9] = (changed[0, 5:9] + 11) % VOCAB
    h2 = model.forward_hidden(changed, cond_for(cfg), segments=seg)
    others = (seg[0] != 2)
    torch.testing.assert_close(h2[0, others], h[0, others], atol=1e-6, rtol=0)
    assert not torch.allclose(h2[0, ~others], h[0, ~others])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_a_documents_bos_gets_nothing_from_the_previous_document(preset: str,
                                                                 causal: bool) -> None:
    cfg = tiny_preset(preset, causal=causal, time_cond=not causal)
    model = perturbed(cfg)
    idx, seg = packed_row()
    inf = influence(model, idx, "hidden", cond_for(cfg), seg)
    for start in DOC_STARTS[1:]:
        assert (inf[start, :start] == 0).all(), f"{preset}: BOS at {start} sees earlier tokens"
    # stronger: each packed document computes what it computes alone (RoPE is relative, and
    # no layer mixes positions outside attention), BOS included
    h = model.forward_hidden(idx, cond_for(cfg), segments=seg)
    for a, b in zip(DOC_STARTS, (*DOC_STARTS[1:], idx.size(1)), strict=True):
        alone = model.forward_hidden(idx[:, a:b], cond_for(cfg))
        torch.testing.assert_close(h[:, a:b], alone, atol=1e-4, rtol=0)
