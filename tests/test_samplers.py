"""Samplers end to end on tiny trained runs: determinism, ddpm_cache == ddpm, KV cache == no
cache, no MASK/PAD, third-party samplers, generation metrics and the sample CLI."""

from __future__ import annotations

import json
import math
import shutil
import types

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner

from lmkit import hookimpl
from lmkit.cli.sample import bench_sample_command, sample_command
from lmkit.core import registry as registry_mod
from lmkit.core.bpb import ByteLUT
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.generate import documents, sample_run
from lmkit.core.genmetrics import (
    add_generation_metrics,
    check_judge,
    generation_metrics,
    judge_nats,
    unigram_entropy,
)
from lmkit.core.registry import entry_listing
from lmkit.core.runs import load_run
from lmkit.core.train import train
from lmkit.errors import LmkitError
from lmkit.protocols import SampleResult
from tests.conftest import registered_plugin

FAST = ["train.seq_len=32", "train.batch_tokens=512", "train.log_every=10",
        "train.val_tokens=1024", "train.dtype=fp32", "optim.lr=0.01"]
VOCAB = 1024


def train_tiny(tiny_data, out, objective: str, steps: int = 30):
    cfg = resolve_config(preset="tiny", flags={"objective": objective, "train.steps": steps,
                                               "data.path": str(tiny_data)}, sets=FAST)
    train(cfg, open_data(tiny_data), out)
    return out


@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory):
    return train_tiny(tiny_data, tmp_path_factory.mktemp("ar") / "run", "ar")


@pytest.fixture(scope="module")
def mdlm_run(tiny_data, tmp_path_factory):
    return train_tiny(tiny_data, tmp_path_factory.mktemp("mdlm") / "run", "mdlm")


@pytest.fixture(scope="module")
def maskrecon_run(tiny_data, tmp_path_factory):
    return train_tiny(tiny_data, tmp_path_factory.mktemp("maskrecon") / "run", "maskrecon",
                      steps=20)


def ids(samples):
    return [s["prompt_ids"] + s["token_ids"] for s in samples]


def sample(run_dir, sampler, **kw):
    kw.setdefault("num", 3)
    kw.setdefault("length", 24)
    return sample_run(run_dir, sampler, device="cpu", **kw)


# -- determinism and the contract ------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ar", "ddpm", "confidence", "entropy_bounded", "block"])
def test_same_seed_same_text(sampler, ar_run, mdlm_run):
    run = ar_run if sampler == "ar" else mdlm_run
    a, b = sample(run, sampler, seed=7), sample(run, sampler, seed=7)
    assert [s["text"] for s in a] == [s["text"] for s in b] and ids(a) == ids(b)
    assert ids(sample(run, sampler, seed=8)) != ids(a)  # the seed is really used
    assert len({tuple(r) for r in ids(a)}) == 3  # the samples of one batch differ


@pytest.mark.parametrize("steps", [24, 64])
def test_ddpm_cache_equals_ddpm_token_for_token(steps, mdlm_run, maskrecon_run):
    # mdlm conditions on sigma(t), maskrecon has no time input: exact for both
    for run in (mdlm_run, maskrecon_run):
        for seed, kw in ((0, {}), (1, {"temperature": 0.8, "top_p": 0.9}), (2, {"top_k": 5})):
            plain = sample(run, "ddpm", steps=steps, seed=seed, **kw)
            cached = sample(run, "ddpm_cache", steps=steps, seed=seed, **kw)
            assert ids(cached) == ids(plain)
            assert plain[0]["nfe"] == steps and cached[0]["nfe"] < steps
    one = sample(mdlm_run, "ddpm_cache", steps=steps, num=1)
    assert one[0]["nfe"] <= 24  # at most one call per step that reveals a token


def test_mask_and_pad_never_appear(mdlm_run, maskrecon_run):
    for run in (mdlm_run, maskrecon_run):
        special = set(load_run(run).tokens.special.values())
        assert special == {VOCAB, VOCAB + 1}
        for sampler in ("ddpm", "ddpm_cache", "confidence", "entropy_bounded", "block"):
            for steps in (1, 5, 24):
                out = sample(run, sampler, steps=steps, seed=steps)
                flat = [i for row in ids(out) for i in row]
                assert max(flat) < VOCAB and not special & set(flat), (sampler, steps)


def test_one_step_reveals_everything_at_once(mdlm_run):
    for sampler in ("ddpm", "ddpm_cache", "confidence", "entropy_bounded", "block"):
        out = sample(mdlm_run, sampler, steps=1)
        assert out[0]["nfe"] == 1 and len(out[0]["token_ids"]) == 24


def test_one_block_is_confidence_and_remasking_cache_is_exact(mdlm_run, maskrecon_run):
    # a sigma-conditioned and a time-free model: block with one block draws and keeps exactly
    # what confidence (linear) does; ddpm_cache stays exact under remasking
    for run, kw in ((mdlm_run, {"temperature": 0.8, "top_k": 50}), (maskrecon_run, {})):
        conf = sample(run, "confidence", steps=8, seed=1, **kw)
        block = sample(run, "block", steps=8, seed=1, options={"block_size": 24}, **kw)
        assert ids(block) == ids(conf) and block[0]["nfe"] == conf[0]["nfe"] == 8
    split = sample(mdlm_run, "block", steps=8, options={"block_size": 6})
    assert split[0]["detail"]["blocks"] == 4 and split[0]["nfe"] == 8
    kw = dict(num=1, steps=48, seed=3)
    plain = sample(mdlm_run, "ddpm", **kw, options={"remask": 0.05})
    cached = sample(mdlm_run, "ddpm_cache", **kw, options={"remask": 0.05})
    assert ids(cached) == ids(plain) and cached[0]["nfe"] < plain[0]["nfe"] == 48
    assert plain[0]["detail"]["remasked"] == cached[0]["detail"]["remasked"] > 0
    assert ids(plain) != ids(sample(mdlm_run, "ddpm", **kw))


def test_kv_cached_ar_equals_uncached_token_for_token(ar_run):
    for seed, kw in ((0, {}), (1, {"temperature": 0.7, "top_k": 20}), (2, {"top_p": 0.8}),
                     (3, {"prompt": "The Congress"})):
        cached = sample(ar_run, "ar", seed=seed, length=30 if "prompt" not in kw else 24, **kw)
        plain = sample(ar_run, "ar", seed=seed, length=30 if "prompt" not in kw else 24,
                       options={"use_cache": False}, **kw)
        assert ids(cached) == ids(plain)
        assert cached[0]["detail"]["kv_cache"] and not plain[0]["detail"]["kv_cache"]
        assert cached[0]["nfe"] == plain[0]["nfe"] == len(cached[0]["token_ids"])


def test_prompt_and_greedy(ar_run, tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    out = sample(ar_run, "ar", prompt="The Congress", temperature=0.0, length=12)
    assert out[0]["prompt_ids"] == [1] + sp.encode("The Congress")
    assert all(s["text"].startswith("The Congress") for s in out)
    assert len({tuple(r) for r in ids(out)}) == 1  # greedy: every sample is the argmax path
    assert ids(out) == ids(sample(ar_run, "ar", prompt="The Congress", temperature=0.0,
                                  length=12, seed=99))


def test_default_sampler_and_wrong_objective(ar_run, mdlm_run):
    assert sample(ar_run, None, num=1)[0]["sampler"] == "ar"
    assert sample(mdlm_run, None, num=1)[0]["sampler"] == "ddpm"
    default_length = sample(ar_run, None, num=1, length=None)[0]
    assert len(default_length["token_ids"]) == 31  # min(128, context 32 - BOS)
    with pytest.raises(LmkitError, match="--sampler ddpm serves mdlm, maskrecon runs"):
        sample(ar_run, "ddpm")
    with pytest.raises(LmkitError, match="--length 40 .* context of 32"):
        sample(ar_run, "ar", length=40)
    with pytest.raises(LmkitError, match="unknown sampler 'nope'"):
        sample(ar_run, "nope")
    with pytest.raises(LmkitError, match="--top-p"):
        sample(ar_run, "ar", top_p=0.0)
    with pytest.raises(LmkitError, match="--opt use_cahe: sampler ar has no such option; "
                                         "its options: use_cache"):
        sample(ar_run, "ar", options={"use_cahe": False})
    with pytest.raises(LmkitError, match="--opt use_cache: .* its options: remask"):
        sample(mdlm_run, "ddpm", options={"use_cache": False})


def test_batches_and_timing_fields(mdlm_run):
    out = sample(mdlm_run, "confidence", num=5, batch_size=2, steps=6,
                 options={"schedule": "cosine"})
    assert [s["batch"] for s in out] == [0, 0, 1, 1, 2] and [s["index"] for s in out] == [*range(5)]
    assert all(s["nfe"] == 6 and s["seconds"] > 0 and s["tokens_per_s"] > 0 for s in out)
    assert out[0]["detail"] == {"steps": 6, "schedule": "cosine"}
    assert ids(out) == ids(sample(mdlm_run, "confidence", num=5, batch_size=2, steps=6,
                                  options={"schedule": "cosine"}))


# -- third-party samplers --------------------------------------------------------------------------
class FirstTokenSampler:
    """Repeats the most likely first token: trivially checkable output."""

    name = "first_token"
    description = "test sampler: repeat the argmax after the prompt"
    objectives = ("ar",)

    def sample(self, model, ctx):
        x = ctx.prompt.to(ctx.device).expand(ctx.num, -1)
        top = model(x)[:, -1].argmax(-1, keepdim=True)
        return SampleResult(torch.cat([x, top.expand(-1, ctx.length)], dim=1), {"mine": True})


class EmitsMaskSampler(FirstTokenSampler):
    name = "emits_mask"
    description = "test sampler that breaks the contract"
    objectives = ("*",)

    def sample(self, model, ctx):
        out = super().sample(model, ctx)
        out.tokens[:, -1] = ctx.tokens.vocab_size  # the first special id (MASK)
        return out


@pytest.fixture
def plugin_registry():
    with registered_plugin("test-samplers", samplers=[FirstTokenSampler, EmitsMaskSampler]) as reg:
        yield reg


def test_third_party_sampler_is_listed_and_works(plugin_registry, ar_run):
    rows = {r["name"]: r for r in entry_listing("sampler")}
    assert {"ar", "ddpm", "ddpm_cache", "confidence", "first_token"} <= set(rows)
    assert rows["first_token"]["distribution"] == "lmkit-test-samplers"
    assert rows["ddpm"]["plugin"] == "lmkit.plugins.samplers"
    out = sample(ar_run, "first_token", num=2, length=5)
    assert out[0]["sampler"] == "first_token" and out[0]["nfe"] == 1
    assert len(set(out[0]["token_ids"])) == 1 and out[0]["detail"] == {"mine": True}
    assert sample(ar_run, None, num=1)[0]["sampler"] == "ar"  # built-ins stay the default
    with pytest.raises(LmkitError, match="emits_mask.*lmkit-test-samplers.*outside the vocab"):
        sample(ar_run, "emits_mask", num=1, length=4)


def test_registry_rejects_a_sampler_without_objectives(plugin_registry, monkeypatch):
    monkeypatch.delenv("LMKIT_STRICT_PLUGINS", raising=False)
    mod = types.ModuleType("bad")

    class NoObjectives:
        name, description = "bad", "no objectives attribute"

        def sample(self, model, ctx):
            raise AssertionError

    @hookimpl
    def register_samplers(register):
        register(NoObjectives)

    mod.register_samplers = register_samplers
    with pytest.warns(registry_mod.PluginWarning, match="lacks objectives"):
        plugin_registry.add_plugin(mod, "bad", "bad-dist", "1")
    assert "bad" not in plugin_registry.entries["sampler"]


# -- generation metrics ----------------------------------------------------------------------------
def test_generation_metrics_kinds_units_and_exact_bytes(ar_run, mdlm_run, tiny_data):
    kw = dict(num=3, length=24, steps=12, seed=3, device="cpu")
    metrics = generation_metrics(mdlm_run, ar_run, "ddpm", **kw)
    by = {m.name: m for m in metrics}
    assert list(by) == ["gen_ppl", "gen_entropy", "gen_nfe", "gen_tokens_per_s"]
    assert all(m.kind == "score" for m in metrics)
    assert [by[n].unit for n in by] == ["bpb", "bits", "calls", "tokens/s"]
    assert by["gen_nfe"].value == 12 and by["gen_tokens_per_s"].value > 0
    # recompute: same samples, the judge's exact NLL over the LUT bytes of their decoded text
    samples = sample(mdlm_run, "ddpm", num=3, length=24, steps=12, seed=3)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    text_bytes = sum(len(sp.decode(d).encode("utf-8"))
                     for s in samples for d in documents(s["token_ids"], 1))
    lut = ByteLUT.from_sentencepiece(tiny_data / "tokenizer.model")
    rows = torch.tensor(ids(samples))
    assert by["gen_ppl"].bytes == int(lut.sequence_bytes(rows).sum()) == text_bytes
    assert by["gen_ppl"].tokens == 72
    judge = load_run(ar_run).model
    with torch.no_grad():
        logp = torch.log_softmax(judge(rows[:, :-1]).double(), -1)
    nats = -logp.gather(-1, rows[:, 1:, None]).sum()
    assert by["gen_ppl"].value == pytest.approx(float(nats) / math.log(2) / text_bytes, rel=1e-5)
    expected = sum(unigram_entropy(s["token_ids"]) for s in samples) / 3
    assert by["gen_entropy"].value == pytest.approx(expected)
    assert by["gen_entropy"].detail["distinct_tokens"] == len({i for r in rows for i in r[1:]
                                                                .tolist()})


def test_judge_must_be_an_ar_run_with_the_same_tokenizer(ar_run, mdlm_run, tmp_path):
    with pytest.raises(LmkitError, match="'mdlm' run; the judge must be an AR run"):
        generation_metrics(ar_run, mdlm_run, num=1, length=4, device="cpu")
    other = tmp_path / "other"
    shutil.copytree(ar_run, other)
    with open(other / "tokenizer.model", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(LmkitError, match="another tokenizer"):
        generation_metrics(mdlm_run, other, num=1, length=4, device="cpu")
    with pytest.raises(LmkitError, match="not an lmkit run directory"):
        check_judge(mdlm_run, tmp_path)
    with pytest.raises(LmkitError, match="--gen needs a run directory"):
        check_judge(mdlm_run / "run.json", ar_run)
    check_judge(mdlm_run, ar_run)  # accepted


def test_eval_result_gets_the_generation_metrics(ar_run, mdlm_run):
    from lmkit.core.evaluate import evaluate_run

    result = evaluate_run(mdlm_run, max_tokens=1024, device="cpu", batch_size=32,
                          options={"samples": 2, "steps": "", "chain_k": 0})
    result = add_generation_metrics(result, ar_run, num=2, length=8, device="cpu")
    saved = json.loads(json.dumps(result))  # `lmkit eval --gen` keeps it (test_cli)
    names = [m["name"] for m in saved["metrics"]]
    assert names == ["nelbo_mc", "gen_ppl", "gen_entropy", "gen_nfe", "gen_tokens_per_s"]
    assert saved["metrics"][1]["detail"]["sampler"] == "ddpm"
    assert all({"name", "kind", "value", "unit", "stderr", "tokens", "bytes", "detail"}
               <= set(m) for m in saved["metrics"])


def test_unigram_entropy_and_sliding_judge_windows(ar_run):
    assert unigram_entropy([5, 5, 5, 5]) == 0.0
    assert unigram_entropy([1, 2, 1, 2]) == pytest.approx(1.0)
    assert unigram_entropy(list(range(8))) == pytest.approx(3.0)
    model = load_run(ar_run).model
    seq = torch.randint(2, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = judge_nats(model, seq, context=64)
        windowed = judge_nats(model, seq, context=8)
        direct = torch.nn.functional.cross_entropy(model(seq[:, :-1]).transpose(1, 2), seq[:, 1:],
                                                   reduction="none")
    torch.testing.assert_close(full, direct)
    torch.testing.assert_close(windowed[:, :8], direct[:, :8])  # the first window: same context
    assert windowed.shape == direct.shape and not torch.equal(windowed, direct)


# -- CLI -------------------------------------------------------------------------------------------
def test_sample_cli_json_is_deterministic(ar_run):
    args = [str(ar_run), "--num", "2", "--length", "10", "--seed", "5", "--json",
            "--device", "cpu"]
    first = CliRunner().invoke(sample_command, args)
    second = CliRunner().invoke(sample_command, args)
    assert first.exit_code == 0, first.output
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["sampler"] == "ar" and a["seed"] == 5 and len(a["samples"]) == 2
    for s in a["samples"]:
        assert {"text", "token_ids", "nfe", "seconds", "tokens_per_s"} <= set(s)
        assert len(s["token_ids"]) == 10 and s["nfe"] == 10
    strip = [{k: v for k, v in s.items() if k not in ("seconds", "tokens_per_s")}
             for s in a["samples"]]
    assert strip == [{k: v for k, v in s.items() if k not in ("seconds", "tokens_per_s")}
                     for s in b["samples"]]
    pretty = CliRunner().invoke(sample_command, args[:-3] + ["--device", "cpu"])
    assert pretty.exit_code == 0 and a["samples"][0]["text"][:10] in pretty.stdout
    assert "NFE 10" in pretty.stdout


def test_sample_cli_opt_and_mdlm(mdlm_run):
    result = CliRunner().invoke(sample_command, [
        str(mdlm_run), "--sampler", "confidence", "--steps", "4", "--length", "8", "--num", "1",
        "--opt", "schedule=cosine", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["samples"][0]["nfe"] == 4 and data["samples"][0]["detail"]["schedule"] == "cosine"


def test_bench_sample_json_on_fresh_models():
    result = CliRunner().invoke(bench_sample_command, [
        "--preset", "tiny", "--num", "2", "--length", "8", "--repeats", "1", "--json",
        "--device", "cpu"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ar, mdlm = data["groups"]
    assert [r["label"] for r in ar["rows"]] == ["ar (kv cache)", "ar (no cache)"]
    assert [r["label"] for r in mdlm["rows"]] == ["ddpm", "ddpm (remask=0.02)", "ddpm_cache",
                                                  "confidence", "entropy_bounded", "block"]
    assert "freshly initialised" in ar["model"] and mdlm["steps"] == 32  # T = 4 x length
    assert all(ar["identical_tokens"].values()) and all(mdlm["identical_tokens"].values())
    assert list(mdlm["identical_tokens"]) == ["ddpm == ddpm_cache"]  # not the remasking row
    assert ar["rows"][0]["speedup"] == 1.0 and [r["nfe"] for r in ar["rows"]] == [8, 8]
    ddpm, remask, cached, confidence, entropy_bounded, block = (r["nfe"] for r in mdlm["rows"])
    assert ddpm == remask == 32 and cached <= 2 * 8 and confidence == block == 8
    assert 1 <= entropy_bounded <= 8 and data["judge"] is None


def test_bench_sample_interleaves_its_rounds(monkeypatch):
    """Every variant runs once per round, the order rotating, so drift over the bench hits all
    alike; each row keeps its own best round."""
    import lmkit.core.bench.sample as bench

    calls = []
    real = bench.generate

    def recording(model, entry, *, request, **kw):
        out = real(model, entry, request=request, **kw)
        if request.length == 12:  # the timed calls (warm-ups are 8 tokens)
            calls.append((request.options["use_cache"], out[0]["seconds"]))
        return out

    monkeypatch.setattr(bench, "generate", recording)
    result = bench.bench_sample(["ar"], preset="tiny", num=1, length=12, repeats=3, device="cpu")
    assert [cached for cached, _ in calls] == [True, False, False, True, True, False]
    rows = result["groups"][0]["rows"]
    assert [r["label"] for r in rows] == ["ar (kv cache)", "ar (no cache)"]
    for row, cached in zip(rows, (True, False), strict=True):
        assert row["seconds"] == min(s for c, s in calls if c == cached)
    assert result["repeats"] == 3


def test_bench_sample_judges_every_row_at_equal_nfe(mdlm_run, ar_run):
    from lmkit.core.bench.sample import bench_sample

    result = bench_sample([str(mdlm_run)], num=3, length=12, steps=6, repeats=1, device="cpu",
                          judge=str(ar_run))
    rows = {r["label"]: r for r in result["groups"][0]["rows"]}
    assert result["judge"] == str(load_run(ar_run).path)
    assert all(1 <= r["nfe"] <= 6 for r in rows.values())  # T = 6 <= length: at most T calls
    exact = ("ddpm", "ddpm (remask=0.02)", "confidence", "block")
    assert [rows[n]["nfe"] for n in exact] == [6] * 4
    for name in ("entropy_bounded", "block"):
        again = generation_metrics(mdlm_run, ar_run, name, num=3, length=12, steps=6, seed=0,
                                   device="cpu")
        assert rows[name]["gen_ppl"] == again[0].value  # the same samples, judged the same way
        assert rows[name]["gen_entropy"] == again[1].value
        assert rows[name]["gen_ppl_stderr"] == again[0].stderr
    with pytest.raises(LmkitError, match="--judge scores trained runs"):
        bench_sample(["mdlm"], preset="tiny", num=1, length=4, repeats=1, device="cpu",
                     judge=str(ar_run))
    args = ["--run", str(mdlm_run), "--judge", str(ar_run), "--num", "2", "--length", "4",
            "--steps", "2", "--repeats", "1", "--device", "cpu"]
    shown = CliRunner().invoke(bench_sample_command, args)
    assert shown.exit_code == 0, shown.output
    assert "gen-ppl" in shown.output and "judged by" in shown.output


def test_eval_gen_keeps_the_generation_metrics_in_eval_json(ar_run, mdlm_run, capsys):
    from tests.test_compare import run_cli

    code, out, err = run_cli(["eval", str(mdlm_run), "--max-tokens", "512", "--opt", "samples=2",
                              "--opt", "steps=", "--opt", "chain_k=0", "--gen", "--judge",
                              str(ar_run), "--num", "2", "--length", "8", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    saved = json.loads((mdlm_run / "eval.json").read_text())
    assert saved == result and "gen_ppl" in [m["name"] for m in saved["metrics"]]
    assert result["protocol"]["generation"]["judge"] == str(ar_run.resolve())
    kept = [json.loads(p.read_text()) for p in (mdlm_run / "evals").glob("*.json")]
    assert result in kept


def test_eval_gen_passes_sampler_options(ar_run, mdlm_run, capsys):
    """`--sampler-opt` reaches the --gen sampler (the figures are those of the same request
    made directly), is kept in the protocol, and fails in one line when it cannot apply."""
    from tests.test_compare import run_cli

    base = ["eval", str(mdlm_run), "--max-tokens", "512", "--opt", "samples=2", "--opt",
            "steps=", "--opt", "chain_k=0", "--gen", "--judge", str(ar_run), "--num", "2",
            "--length", "8", "--sampler", "ddpm", "--json"]
    code, out, err = run_cli([*base, "--sampler-opt", "remask=0.5"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"]["generation"]["options"] == {"remask": "0.5"}
    direct = generation_metrics(mdlm_run, ar_run, "ddpm", num=2, length=8, seed=0,
                                device="cpu", options={"remask": 0.5})
    plain = generation_metrics(mdlm_run, ar_run, "ddpm", num=2, length=8, seed=0, device="cpu")
    got = next(m for m in result["metrics"] if m["name"] == "gen_ppl")["value"]
    assert got == direct[0].value != plain[0].value
    code, _, err = run_cli([*base, "--sampler-opt", "no_such_option=1"], capsys)
    assert code != 0 and "no_such_option" in err and "Traceback" not in err
    code, _, err = run_cli(["eval", str(mdlm_run), "--sampler-opt", "remask=0.5"], capsys)
    assert code != 0 and "add --gen" in err
