"""Quantizers, the artifact format and its safety checks, and pruning to a decimal byte cap."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zlib
from dataclasses import asdict

import numpy as np
import pytest
import torch

from lmkit.core import artifact as art_mod
from lmkit.core import quant
from lmkit.core.artifact import (
    HEADER,
    MANIFEST_LEN,
    decode_artifact,
    encode_artifact,
    load_artifact,
    read_artifact,
    serialize,
)
from lmkit.core.capfit import (
    apply_pruning,
    fit_to_cap,
    prune_candidates,
)
from lmkit.core.defaults import DEFAULT_CAP_BYTES
from lmkit.core.quant import (
    dequantize_rows,
    gptq_quantize,
    quantize_int8_baseline,
    quantize_model,
    round_rows,
    row_quantiles,
    search_clip,
)
from lmkit.core.trunk import ModelConfig, Transformer
from lmkit.errors import LmkitError

CFG = ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2)
VOCAB = 256


def tiny_model(seed: int = 0) -> Transformer:
    """A small trunk with every weight random (zero-initialised projections would be trivial)."""
    torch.manual_seed(seed)
    model = Transformer(CFG, VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def meta_for(model: Transformer, **extra) -> dict:
    return {"model": {"config": asdict(model.cfg), "vocab_size": model.vocab_size,
                      "n_special": model.n_special}, **extra}


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Student-t weights: outliers make the clip choice matter, as in trained matrices."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02


def correlated_inputs(n: int = 4096, d: int = 64, rank: int = 6, seed: int = 0) -> torch.Tensor:
    """Inputs living mostly in a low-dimensional subspace: strongly correlated columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g)
    mix = torch.randn(rank, d, generator=g)
    return z @ mix + 0.05 * torch.randn(n, d, generator=g)


# -- quantizers --------------------------------------------------------------------------------


def test_row_quantiles_match_torch_quantile():
    x = torch.randn(7, 1000).abs()
    qs = [0.5, 0.999, quant.INT8_CLIP_Q, 1.0]
    ours = row_quantiles(x, qs)
    for i, q in enumerate(qs):
        torch.testing.assert_close(ours[i], torch.quantile(x, q, dim=1), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[-1], x.max(dim=1).values)


def test_int8_baseline_range_clip_and_fp16_scale():
    w = torch.randn(16, 4096) * 0.02
    w[3, 17] = 5.0  # one outlier: the 99.99984th percentile clip must not let it set the grid
    q, scale = quantize_int8_baseline(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -127 and int(q.max()) <= 127 and int(q.abs().max()) == 127
    assert torch.equal(scale, scale.half().float())  # exactly representable in fp16
    clip = row_quantiles(w.abs(), [quant.INT8_CLIP_Q])[0]
    assert clip[3] < 5.0 and clip[3] > w[3].abs().sort().values[-2]  # clipped below the outlier
    deq = dequantize_rows(q, scale)
    ordinary = torch.ones_like(w, dtype=torch.bool)
    ordinary[3, 17] = False
    assert (deq - w)[ordinary].abs().max() <= scale.max() * 0.51  # half a step, fp16 rounding


def test_int6_values_lie_in_range_for_rtn_and_gptq():
    w = heavy_tailed(32, 96)
    x = correlated_inputs(d=96)
    H = x.T @ x / x.size(0)
    q_rtn, scale = search_clip(w, 6)
    q_gptq = gptq_quantize(w, H, scale, 6, block_size=32)
    for q in (q_rtn, q_gptq):
        assert q.dtype == torch.int8
        assert int(q.min()) >= -31 and int(q.max()) <= 31
    assert int(q_rtn.abs().max()) == 31  # the grid is used up to its edge


def test_clip_search_picks_the_lowest_error_percentile_per_row():
    w = heavy_tailed(8, 512, seed=1)
    q, scale = search_clip(w, 6)
    best = ((w - dequantize_rows(q, scale)) ** 2).sum(1)
    for p in quant.CLIP_PERCENTILES:
        clip = row_quantiles(w.abs(), [p])[0]
        s = quant.scale_for(clip, 31)
        err = ((w - dequantize_rows(round_rows(w, s, 31, clip), s)) ** 2).sum(1)
        assert (best <= err + 1e-12).all()


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    x = correlated_inputs()
    w = torch.randn(48, 64) * 0.05
    H = x.T @ x / x.size(0)
    diag = torch.diag(H)
    q_gptq_grid, scale = search_clip(w, 6, diag / diag.mean())
    q_gptq = gptq_quantize(w, H, scale, 6)
    q_rtn, scale_rtn = search_clip(w, 6)

    def out_err(q, s):
        return (x @ w.T - x @ dequantize_rows(q, s).T).norm()

    gptq_err = out_err(q_gptq, scale)
    assert gptq_err < 0.5 * out_err(q_rtn, scale_rtn)  # RTN with its own clip search
    assert gptq_err < 0.5 * out_err(q_gptq_grid, scale)  # RTN on GPTQ's very grid


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """With H = I there is no error to spread: GPTQ must reduce to plain rounding."""
    w = heavy_tailed(8, 40, seed=2)
    _, scale = search_clip(w, 6)
    q = gptq_quantize(w, torch.eye(40), scale, 6, block_size=16)
    assert torch.equal(q, round_rows(w, scale, 31))


def test_quantize_model_schemes():
    model = tiny_model()
    matrices = set(quant.matrix_names(model))
    assert len(matrices) == 6 * CFG.n_layer
    int6 = {qt.name: qt for qt in quantize_model(model, bits=6, method="rtn")}
    assert set(int6) == set(model.state_dict())
    for name, qt in int6.items():
        if name in matrices:
            assert (qt.scheme, qt.bits) == ("int", 6)
        elif name == "embed.weight":  # int8 whatever its size
            assert (qt.scheme, qt.bits) == ("int", 8)
        else:
            assert qt.scheme == "fp16"
    # the baseline: only float tensors above small_max become int8, everything else fp16
    base = {qt.name: qt for qt in quantize_model(model, bits=8, method="rtn", small_max=4096)}
    for name, t in model.state_dict().items():
        assert base[name].scheme == ("int" if t.numel() > 4096 else "fp16"), name
        assert base[name].bits in (None, 8)


def test_any_trunk_variant_round_trips(tmp_path):
    """Objective-agnostic: a bidirectional, time-conditioned, untied trunk with special ids."""
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=4, causal=False,
                      time_cond=True, cond_dim=32, tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg, 200, n_special=2)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    idx, cond = torch.randint(0, 202, (3, 16)), torch.rand(3)
    hessians, _ = quant.collect_hessians(model, lambda: model(idx, cond))
    tensors = quantize_model(model, bits=6, method="gptq", hessians=hessians, small_max=4096)
    kinds = {qt.name: (qt.scheme, qt.bits, qt.method) for qt in tensors}
    assert kinds["blocks.1.mlp.fc.weight"] == ("int", 6, "gptq")
    assert kinds["head.weight"] == ("int", 8, "baseline")  # 200 x 64 > small_max
    assert kinds["blocks.0.adaln.weight"] == ("int", 8, "baseline")
    assert kinds["blocks.0.adaln.bias"][0] == "fp16"
    path = tmp_path / "bidir.bin"
    path.write_bytes(encode_artifact(serialize(tensors, meta_for(model)), "lzma"))
    loaded, _ = load_artifact(path)
    ref = Transformer(cfg, 200, n_special=2)
    ref.load_state_dict({qt.name: qt.dequantize() for qt in tensors})
    assert torch.equal(loaded(idx, cond), ref.eval()(idx, cond))
    assert loaded.n_special == 2 and not loaded.cfg.causal


def test_quantize_model_rejects_bad_options():
    with pytest.raises(LmkitError, match="--bits"):
        quantize_model(tiny_model(), bits=12)
    with pytest.raises(LmkitError, match="--method"):
        quantize_model(tiny_model(), bits=6, method="awq")


def test_hessians_come_from_the_matrix_layer_inputs():
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (3, 16))
    hessians, rows = quant.collect_hessians(model, lambda: model(idx))
    assert set(hessians) == set(quant.matrix_names(model)) and rows == 48
    # the first block's q/k/v all read the same normalised input
    h = model.blocks[0]
    x = torch.nn.functional.rms_norm(
        h.resid_mix[0] * torch.nn.functional.rms_norm(model.embed(idx), (64,))
        + h.resid_mix[1] * torch.nn.functional.rms_norm(model.embed(idx), (64,)), (64,))
    x = x.reshape(-1, 64)
    torch.testing.assert_close(hessians["blocks.0.attn.q.weight"], x.T @ x / 48)
    assert torch.equal(hessians["blocks.0.attn.q.weight"], hessians["blocks.0.attn.v.weight"])
    assert hessians["blocks.0.mlp.proj.weight"].shape == (128, 128)


# -- artifact files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A real int6 artifact of the tiny model (zlib here, so tampering tests decode quickly)."""
    model = tiny_model()
    idx = torch.randint(0, VOCAB, (4, 32))
    hessians, _ = quant.collect_hessians(model, lambda: model(idx))
    tensors = quantize_model(model, bits=6, method="gptq", hessians=hessians)
    path = tmp_path_factory.mktemp("art") / "a.int6.zlib"
    data = encode_artifact(serialize(tensors, meta_for(model, note="test")), "zlib")
    path.write_bytes(data)
    return path, tensors, model


def test_round_trip_reproduces_the_dequantized_weights_exactly(artifact):
    path, tensors, model = artifact
    manifest, stored = read_artifact(path)
    assert manifest["note"] == "test" and manifest["format"] == art_mod.FORMAT
    assert [t.name for t in stored] == [t.name for t in tensors]
    for a, b in zip(tensors, stored, strict=True):
        assert torch.equal(a.dequantize(), b.dequantize()), a.name
    loaded, _ = load_artifact(path)
    state = loaded.state_dict()
    for qt in tensors:
        assert torch.equal(state[qt.name], qt.dequantize()), qt.name
    # and the loaded model computes with exactly those weights
    ref = Transformer(CFG, VOCAB)
    ref.load_state_dict({qt.name: qt.dequantize() for qt in tensors})
    idx = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(loaded(idx), ref.eval()(idx))


def test_header_describes_the_file(artifact):
    path, _, _ = artifact
    data = path.read_bytes()
    magic, version, comp, _, length, n_data, sha = HEADER.unpack_from(data)
    assert magic == art_mod.MAGIC and version == art_mod.FORMAT_VERSION
    assert comp == art_mod.COMPRESSIONS["zlib"] and n_data == len(data) - HEADER.size
    payload = zlib.decompress(data[HEADER.size:])
    assert len(payload) == length and hashlib.sha256(payload).digest() == sha


def test_lzma_artifacts_round_trip(tmp_path):
    model = tiny_model(1)
    tensors = quantize_model(model, bits=6, method="rtn")
    path = tmp_path / "a.lzma"
    path.write_bytes(encode_artifact(serialize(tensors, meta_for(model)), "lzma"))
    _, stored = read_artifact(path)
    assert all(torch.equal(a.dequantize(), b.dequantize()) for a, b in zip(tensors, stored,
                                                                               strict=True))


def flips(n: int) -> list[int]:
    """Every header byte, and a spread of positions through the compressed data."""
    return list(range(HEADER.size)) + np.linspace(HEADER.size, n - 1, 40).astype(int).tolist()


def test_flipped_bytes_fail_cleanly(artifact, tmp_path):
    path, _, _ = artifact
    data = path.read_bytes()
    bad = tmp_path / "tampered.bin"
    for pos in flips(len(data)):
        tampered = bytearray(data)
        tampered[pos] ^= 0x41
        bad.write_bytes(bytes(tampered))
        with pytest.raises(LmkitError, match="tampered.bin") as err:
            read_artifact(bad)
        assert "corrupt" in str(err.value) or "format version" in str(err.value), pos


def test_truncated_artifacts_fail_cleanly(artifact, tmp_path):
    path, _, _ = artifact
    data = path.read_bytes()
    bad = tmp_path / "cut.bin"
    for n in (0, 7, HEADER.size - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(LmkitError, match="shorter than the 60-byte header"):
            read_artifact(bad)
    for n in (HEADER.size, HEADER.size + 10, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:n])
        with pytest.raises(LmkitError, match=r"cut\.bin .*truncated"):
            read_artifact(bad)
    bad.write_bytes(data + b"\0")  # one byte too many is as wrong as one too few
    with pytest.raises(LmkitError, match="longer than its header"):
        read_artifact(bad)


def with_header(data: bytes, **fields) -> bytes:
    names = ("magic", "version", "comp", "reserved", "length", "n_data", "sha")
    values = dict(zip(names, HEADER.unpack_from(data), strict=True))
    values.update(fields)
    return HEADER.pack(*(values[n] for n in names)) + data[HEADER.size:]


def test_lying_about_the_length_fails_cleanly(artifact, tmp_path):
    path, _, _ = artifact
    data = path.read_bytes()
    length = HEADER.unpack_from(data)[4]
    for lie in (length - 1, length + 1, length // 3, 10 * length):
        with pytest.raises(LmkitError, match="decompresses to"):
            decode_artifact(with_header(data, length=lie), "lied")
    with pytest.raises(LmkitError, match="claims a"):
        decode_artifact(with_header(data, length=2**62), "lied")
    with pytest.raises(LmkitError, match="truncated"):
        decode_artifact(with_header(data, n_data=len(data)), "lied")


def test_decompression_bomb_is_bounded():
    bomb_size = 32 << 20
    payload = bytes(bomb_size)  # 32 MiB of zeros compress to ~32 KB
    honest = encode_artifact(payload, "zlib")
    assert len(honest) < bomb_size / 500
    # a header honest about the size is refused before decompressing when above the limit
    with pytest.raises(LmkitError, match="claims a"):
        decode_artifact(honest, "bomb", max_payload=1 << 20)
    # a header that understates the size stops the decompressor right after the claimed length
    calls = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self):
            self.d = real()

        def decompress(self, data, max_length=0):
            out = self.d.decompress(data, max_length)
            calls.append((max_length, len(out)))
            return out

        def __getattr__(self, name):
            return getattr(self.d, name)

    lie = with_header(honest, length=1000)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(art_mod.zlib, "decompressobj", Spy)
        with pytest.raises(LmkitError, match="more than the 1,000 bytes"):
            decode_artifact(lie, "bomb")
    assert calls == [(1001, 1001)]
    assert art_mod.payload_limit(len(honest)) <= art_mod.MAX_PAYLOAD_BYTES


def reencode(path, edit) -> bytes:
    """Decode an artifact, let ``edit`` change its manifest, and re-encode it validly."""
    payload = decode_artifact(path.read_bytes(), path)
    (n,) = MANIFEST_LEN.unpack_from(payload)
    manifest = json.loads(payload[4:4 + n])
    edit(manifest)
    raw = json.dumps(manifest).encode()
    return encode_artifact(MANIFEST_LEN.pack(len(raw)) + raw + payload[4 + n:], "zlib")


def _set(path, value):
    """An edit setting manifest[path] = value; a str after "tensors" selects a tensor by name."""
    def edit(manifest):
        *keys, last = path
        obj = manifest
        for k in keys:
            obj = next(t for t in obj if t["name"] == k) if isinstance(obj, list) else obj[k]
        obj[last] = value
    return edit


EMB, SKIP, Q = "embed.weight", "skip_weights", "blocks.0.attn.q.weight"


@pytest.mark.parametrize("edit,match", [
    (_set(["tensors", EMB, "shape"], [3, 3]), "do not match shape"),
    (_set(["tensors", SKIP, "shape"], [3, 3]), "do not match dtype"),
    (_set(["tensors", SKIP, "arrays", "values", "offset"], 10**9), "past the end"),
    (_set(["tensors", SKIP, "arrays", "values", "nbytes"], 2), "is not 2 bytes"),
    (_set(["tensors", SKIP, "arrays", "values", "dtype"], "object"), "no valid dtype"),
    (_set(["tensors", EMB, "scheme"], "pickle"), "unknown scheme"),
    (_set(["tensors", Q, "name"], EMB), "appears twice"),
    (_set(["tensors", Q, "bits"], 4), "outside \\[-7, 7\\]"),
    (_set(["tensors", Q, "arrays", "scale", "shape"], [2]), "is not"),
    (_set(["format"], "other/9"), "manifest format"),
    (_set(["tensors", EMB, "shape"], [-1]), "invalid shape"),
])
def test_inconsistent_manifests_fail_cleanly(artifact, tmp_path, edit, match):
    path, _, _ = artifact
    bad = tmp_path / "tampered.bin"
    bad.write_bytes(reencode(path, edit))
    with pytest.raises(LmkitError, match=match) as err:
        read_artifact(bad)
    assert str(bad) in str(err.value)


def test_garbage_manifests_fail_cleanly(tmp_path):
    bad = tmp_path / "bad"
    for manifest in (b"\xff\xfe", b"[" * 100_000, b"{\"format\": 1", b"[]"):
        bad.write_bytes(encode_artifact(MANIFEST_LEN.pack(len(manifest)) + manifest, "zlib"))
        with pytest.raises(LmkitError, match="corrupt"):
            read_artifact(bad)
    bad.write_bytes(encode_artifact(MANIFEST_LEN.pack(10**6) + b"{}", "zlib"))
    with pytest.raises(LmkitError, match="runs past"):
        read_artifact(bad)


def test_tensors_that_do_not_match_the_model_are_refused(artifact, tmp_path):
    path, _, _ = artifact
    bad = tmp_path / "other-model.bin"
    bad.write_bytes(reencode(path, _set(["model", "config", "d_model"], 32)))
    with pytest.raises(LmkitError, match="shape"):
        load_artifact(bad)
    bad.write_bytes(reencode(path, lambda m: m["tensors"].pop()))
    with pytest.raises(LmkitError, match="missing"):  # its bytes are refused before decoding
        load_artifact(bad)
    bad.write_bytes(reencode(path, _set(["model", "config", "n_layer"], "many")))
    with pytest.raises(LmkitError, match="model"):
        load_artifact(bad)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(LmkitError, match="does not exist"):
        read_artifact(tmp_path / "nope")
    with pytest.raises(LmkitError, match="directory"):
        read_artifact(tmp_path)


def test_loading_executes_no_pickle(artifact, monkeypatch):
    path, tensors, _ = artifact

    def forbidden(*args, **kwargs):
        raise AssertionError("artifact loading must not unpickle")

    for obj, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load"), (np, "load")):
        monkeypatch.setattr(obj, name, forbidden)
    model, _ = load_artifact(path)
    emb = next(qt for qt in tensors if qt.name == "embed.weight")
    assert torch.equal(model.state_dict()["embed.weight"], emb.dequantize())


# -- pruning and the cap -----------------------------------------------------------------------


def test_the_cap_is_decimal_bytes():
    assert DEFAULT_CAP_BYTES == 16 * 10**6 != 16 * 2**20
    from lmkit.cli import pack as cli_pack
    from lmkit.core import pack as core_pack

    assert cli_pack.DEFAULT_CAP_BYTES == DEFAULT_CAP_BYTES
    assert cli_pack.pack_command.params[3].default == DEFAULT_CAP_BYTES
    calib = next(p for p in cli_pack.pack_command.params if p.name == "calib_tokens")
    assert calib.default == core_pack.DEFAULT_CALIB_TOKENS


def test_cap_compares_exact_file_bytes(artifact):
    _, tensors, model = artifact
    meta = meta_for(model)
    size = len(fit_to_cap(tensors, meta, "zlib", None).data)
    exact = fit_to_cap(tensors, meta, "zlib", size)  # at the cap: fits as is
    assert exact.pruned == 0 and len(exact.data) == size
    over = fit_to_cap(tensors, meta, "zlib", size - 1)  # one byte over: must prune
    assert over.pruned > 0 and len(over.data) <= size - 1


def test_pruning_zeroes_only_plus_minus_one_values_and_fits(artifact):
    _, tensors, model = artifact
    meta = meta_for(model)
    size = len(fit_to_cap(tensors, meta, "zlib", None).data)
    cands = prune_candidates(tensors)
    all_pruned = apply_pruning(tensors, cands, len(cands))
    floor = len(fit_to_cap(all_pruned, meta, "zlib", None).data)
    assert floor < size - 200
    cap = (size + floor) // 2  # reachable, but only by pruning part of the ±1 values
    packed = fit_to_cap(tensors, meta, "zlib", cap)
    assert len(packed.data) <= cap and 0 < packed.pruned < packed.candidates
    changed = 0
    for before, after in zip(tensors, packed.tensors, strict=True):
        if before.scheme != "int":
            assert after is before
            continue
        diff = before.data != after.data
        assert (before.data[diff].abs() == 1).all() and (after.data[diff] == 0).all()
        changed += int(diff.sum())
    assert changed == packed.pruned
    manifest, _ = art_mod.deserialize(decode_artifact(packed.data, "x"), "x")
    assert manifest["pruned_values"] == packed.pruned


def test_impossible_cap_raises(artifact):
    _, tensors, model = artifact
    with pytest.raises(LmkitError, match="cannot fit --cap-bytes 1,000"):
        fit_to_cap(tensors, meta_for(model), "zlib", 1000)


def test_pruning_order_follows_reconstruction_cost():
    small = quant.QTensor("a", (2, 2), "float32", "int", torch.tensor([[1, -1], [1, 5]],
                          dtype=torch.int8), torch.tensor([0.01, 0.02]).half(), 6, "rtn")
    big = quant.QTensor("b", (1, 2), "float32", "int", torch.tensor([[1, -1]], dtype=torch.int8),
                        torch.tensor([0.1]).half(), 6, "rtn",
                        col_weight=torch.tensor([0.001, 1.0]))
    cands = prune_candidates([small, big])
    # costs: a row0 1e-4 (x2), a[1,0] 4e-4, b[0,0] 1e-5 (Hessian-weighted), b[0,1] 1e-2
    assert list(zip(cands.tensor.tolist(), cands.flat.tolist(), strict=True)) == [
        (1, 0), (0, 0), (0, 1), (0, 2), (1, 1)]
    pruned = apply_pruning([small, big], cands, 2)
    assert pruned[1].data.tolist() == [[0, -1]] and pruned[0].data.tolist() == [[0, -1], [1, 5]]


def test_struct_header_size_is_stable():
    assert HEADER.size == 60 and struct.calcsize("<I") == MANIFEST_LEN.size
