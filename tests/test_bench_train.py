"""The training bench's references: the same architecture as the trunk (checked weight for
weight), their own FLOP counts, and a bench result whose ratios follow from its rows."""

from __future__ import annotations

import pytest
import torch

from lmkit.core import device as device_mod
from lmkit.core.bench import train as bench_train_mod
from lmkit.core.bench.reference import BaselineGPT, PlainGPT, model_flops_per_token
from lmkit.core.bench.train import bench_train
from lmkit.core.build import new_model
from lmkit.core.config import resolve_config
from lmkit.core.trunk import count_params, flops_per_token


def _baseline_for(preset: str, vocab: int = 1024) -> tuple[torch.nn.Module, BaselineGPT, int]:
    cfg = resolve_config(preset=preset, flags={"train.steps": 1})
    m, seq = cfg.model, cfg.train.seq_len
    torch.manual_seed(0)
    trunk = new_model(m, vocab, 0, "cpu", seq)
    ref = BaselineGPT(vocab, m.n_layer, m.d_model, m.n_head, m.n_kv_head, seq, m.mlp_mult,
                      m.q_gain_init, m.logit_softcap, m.rope_base, m.embed_init_std)
    return trunk, ref, seq


def test_reference_a_has_the_trunks_parameter_count_and_flops() -> None:
    trunk, ref, seq = _baseline_for("small")
    # the parameter-golf baseline's layers at 4 x 256, 4/2 heads, vocab 1024
    assert count_params(trunk) == count_params(ref) == 2_101_776
    assert model_flops_per_token(ref, 4, 256, seq) == flops_per_token(
        trunk.cfg, count_params(trunk), seq, 1024)


def test_reference_a_computes_what_the_trunk_computes() -> None:
    """Copy every trunk weight into the plain reference: the same loss, to float32 rounding."""
    trunk, ref, seq = _baseline_for("tiny", vocab=128)
    names = {"attn.q.": "q.", "attn.k.": "k.", "attn.v.": "v.", "attn.proj.": "attn_out.",
             "mlp.fc.": "fc.", "mlp.proj.": "mlp_out.", "attn.q_gain": "q_gain"}
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in trunk.state_dict().items():
        for old, new in names.items():
            name = name.replace(old, new)
        state[name] = torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0)
    ref.load_state_dict(state, strict=True)
    trunk.load_state_dict({k: state[k2] for k, k2 in zip(trunk.state_dict(), state, strict=True)})
    tokens = torch.randint(0, 128, (3, seq + 1), generator=g)
    want = torch.nn.functional.cross_entropy(trunk(tokens[:, :-1]).flatten(0, 1),
                                             tokens[:, 1:].flatten())
    torch.testing.assert_close(ref(tokens[:, :-1], tokens[:, 1:]), want, rtol=1e-5, atol=1e-5)


def test_reference_b_is_a_gpt2_stack() -> None:
    V, L, d, T = 1024, 4, 256, 256
    ref = PlainGPT(V, L, d, 4, T)
    # token + position tables, per block 12 d^2 weights and 13 d biases/gains, final LayerNorm
    assert count_params(ref) == V * d + T * d + L * (12 * d * d + 13 * d) + 2 * d
    assert model_flops_per_token(ref, L, d, T) == 6 * (count_params(ref) - T * d) + 12 * L * d * T


@pytest.mark.slow
def test_bench_train_rows_and_ratios(tiny_data) -> None:
    result = bench_train(preset="tiny", steps=1, rounds=2, warmup=0, precisions=("fp32",),
                         data_path=str(tiny_data))
    rows = {r["model"]: r for r in result["rows"]}
    assert sorted(rows) == ["lmkit", "reference_a", "reference_b"]
    assert rows["lmkit"]["params"] == rows["reference_a"]["params"]
    for r in rows.values():
        assert len(r["tok_s_rounds"]) == 2 and r["tok_s"] > 0
        assert r["model_flops_s"] == r["flops_per_token"] * r["tok_s"]
        assert r["lmkit_over_this_flops_s"] == rows["lmkit"]["model_flops_s"] / r["model_flops_s"]
        peak = r["peak_flops"]
        assert 0 < peak["min"] <= peak["median"] <= peak["max"]
        mfu = r["model_flops_s"] / peak["median"]  # shown only where it can be true
        assert r["mfu"] == (mfu if mfu <= 1 else None)
    assert rows["lmkit"]["lmkit_over_this_tok_s"] == 1.0
    assert result["bf16_note"] is None  # fp32 only: nothing to explain


def test_bench_train_explains_bf16_on_a_cpu_without_bf16(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    assert "float32 GEMM" in bench_train_mod.bf16_note(cpu, ("fp32", "bf16"))
    assert bench_train_mod.bf16_note(cpu, ("fp32",)) is None
    assert bench_train_mod.bf16_note(cuda, ("bf16",)) is None
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: True)
    assert bench_train_mod.bf16_note(cpu, ("bf16",)) is None


@pytest.mark.slow
def test_bench_all_summary_follows_from_its_rows() -> None:
    from lmkit.core.bench.all import EVAL_ROUNDS, bench_all
    from lmkit.core.defaults import DEFAULT_NUM_SAMPLES
    from lmkit.core.memory import peak_rss_bytes

    result = bench_all(preset="tiny", rounds=1, batch_tokens=512, train_steps=2,
                       eval_tokens=2048, length=16)
    s = result["summary"]
    rows = {(r["precision"], r["model"]): r for r in result["train"]["rows"]}
    assert s["lmkit_over_reference_a_flops_s_fp32"] == \
        rows[("fp32", "lmkit")]["model_flops_s"] / rows[("fp32", "reference_a")]["model_flops_s"]
    assert s["eval_over_train_tok_s"] == s["eval_tok_s"] / result["train_run"]["tok_s"]
    (nll,) = result["eval"]["rows"]  # the median of EVAL_ROUNDS passes
    assert len(nll["seconds_rounds"]) == result["eval"]["repeats"] == EVAL_ROUNDS
    assert s["eval_tok_s"] == pytest.approx(1e6 / nll["seconds_per_1m_tokens"])
    ar = next(g for g in result["sample"]["groups"] if g["objective"] == "ar")
    by = {r["label"]: r["tokens_per_s"] for r in ar["rows"]}
    assert s["ar (kv cache) over ar (no cache) tokens/s"] == \
        by["ar (kv cache)"] / by["ar (no cache)"]
    assert "ddpm_cache over ddpm tokens/s" in s
    lengths = {g["objective"]: (g["length"], g["steps"]) for g in result["sample"]["groups"]}
    assert lengths == {"ar": (16, None), "mdlm": (8, 8)}  # masked samplers: half the length
    assert {g["num"] for g in result["sample"]["groups"]} == {DEFAULT_NUM_SAMPLES}
    assert all(ar["identical_tokens"].values())
    assert 50e6 < result["peak_rss_bytes"] <= peak_rss_bytes()


def test_the_train_table_fits_80_columns_with_every_model_named(monkeypatch) -> None:
    """The table a terminal shows: every model's full name (eager and compiled lmkit must not
    both read 'lmkit…') and each row's ratio, at the width of a plain 80-column terminal."""
    import io

    from rich.console import Console

    from lmkit.cli import bench_all as cli_bench

    peak = {"median": 1.5e11, "min": 1.2e11, "max": 1.9e11}
    rows = []
    for name, params, tok_s, flops in (("lmkit", 2_101_776, 6415.0, 15.76e6),
                                       ("reference_a", 2_101_776, 5690.0, 15.76e6),
                                       ("reference_b", 3_487_488, 4862.0, 23.68e6),
                                       ("lmkit_compiled", 2_101_776, 7113.0, 15.76e6)):
        rows.append({"precision": "fp32", "model": name, "params": params, "tok_s": tok_s,
                     "flops_per_token": flops, "model_flops_s": flops * tok_s,
                     "mfu": flops * tok_s / peak["median"], "peak_flops": peak,
                     "compile_seconds": 8.6 if name == "lmkit_compiled" else None})
    for r in rows:
        r["lmkit_over_this_flops_s"] = rows[0]["model_flops_s"] / r["model_flops_s"]
    result = {"objective": "ar", "preset": "small", "device": "cpu", "tokens_per_step": 8192,
              "rounds": 5, "rows": rows, "bf16_over_fp32": None, "bf16_note": None,
              "sequences_per_forward": {"lmkit": 8, "references": 32},
              "flops_s_ratios": {"fp32": {"lmkit_compiled/reference_b": 0.974}}}
    buffer = io.StringIO()
    monkeypatch.setattr(cli_bench, "output", Console(file=buffer, width=80, soft_wrap=True))
    cli_bench.print_train_table(result)
    table = [line for line in buffer.getvalue().splitlines() if line.startswith(("┃", "│"))]
    assert table and all(len(line) <= 80 for line in table)
    assert not any("…" in line for line in table)
    body = {line.split("│")[2].strip(): line for line in table if line.startswith("│")}
    assert sorted(body) == sorted(r["model"] for r in rows)
    assert "0.88×" in body["reference_b"] and "0.90×" in body["lmkit_compiled"]
    assert "2.10M" in body["lmkit"] and "3.49M" in body["reference_b"]
    assert "lmkit_compiled/reference_b 0.97×" in buffer.getvalue()
