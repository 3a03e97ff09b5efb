"""``train.compile``: compiled blocks in training steps, the same numbers, eager elsewhere."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lmkit.core import device as device_mod
from lmkit.core import train as train_mod
from lmkit.core import trunk
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.device import compiler_missing
from lmkit.core.trunk import Transformer
from tests.test_trunk import randomize, tiny


def _loss_and_grads(model: Transformer, idx: torch.Tensor, cond: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    h = model.forward_hidden(idx, cond)
    loss = F.cross_entropy(model.logits(h).flatten(0, 1), idx.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None,
                    reason="torch.compile needs a C++ compiler on the CPU")
@pytest.mark.parametrize("kind", ["causal", "bidirectional_time_cond"])
def test_compiled_training_matches_eager_and_leaves_inference_eager(kind, monkeypatch):
    compiled_call = trunk._compiled_block_call()
    calls = []

    def counting_call(*args):
        calls.append(args[0])
        return compiled_call(*args)

    monkeypatch.setattr(trunk, "_compiled_block_call", lambda: counting_call)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cfg = tiny() if kind == "causal" else tiny(causal=False, time_cond=True)
    torch.manual_seed(0)
    eager = Transformer(cfg, 50, n_special=2)
    randomize(eager)
    compiled = copy.deepcopy(eager)
    compiled.compile_training()
    copy.deepcopy(compiled)  # still a plain module: copies (EMA, packing) keep working
    idx = torch.randint(0, 50, (3, 12))
    cond = torch.rand(3) if cfg.time_cond else None
    eager.train(), compiled.train()
    for _ in range(2):  # the second call runs the cached graph
        loss_e, grads_e = _loss_and_grads(eager, idx, cond)
        loss_c, grads_c = _loss_and_grads(compiled, idx, cond)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
    # every training forward ran each block through the compiled callable, which compiled
    assert calls == list(compiled.blocks) * 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    compiled.eval(), eager.eval()
    with torch.no_grad():  # evaluation is the eager path: bit for bit the uncompiled model's
        assert torch.equal(compiled(idx, cond), eager(idx, cond))
    assert len(calls) == 2 * len(compiled.blocks)


def test_without_a_compiler_training_warns_and_runs_eager(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "compiler_missing", lambda device: "no C++ compiler here")

    def must_not_compile(self):
        raise AssertionError("compile_training called without a compiler")

    monkeypatch.setattr(Transformer, "compile_training", must_not_compile)
    cfg = resolve_config(preset="tiny", flags={"train.steps": 2, "data.path": str(tiny_data)},
                         sets=["train.seq_len=32", "train.batch_tokens=256", "train.compile=true",
                               "train.val_tokens=256"])
    with pytest.warns(UserWarning, match="train.compile is on but no C\\+\\+ compiler here"):
        summary = train_mod.train(cfg, open_data(tiny_data), tmp_path / "run")
    assert summary["steps"] == 2


@pytest.mark.slow  # emulated bf16 steps: seconds, not milliseconds
def test_bf16_on_a_cpu_without_bf16_instructions_trains_eager(tiny_data, tmp_path, monkeypatch):
    """There lmkit's bf16 GEMMs run in float32 (kernels.linear), which inductor would undo."""
    monkeypatch.setattr(train_mod, "compiler_missing", lambda device: None)
    monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(trunk, "emulated_bf16", lambda device: True)  # and forward_hidden agrees

    def must_not_compile(self):
        raise AssertionError("compile_training called for emulated bf16")

    monkeypatch.setattr(Transformer, "compile_training", must_not_compile)
    cfg = resolve_config(preset="tiny", flags={"train.steps": 2, "data.path": str(tiny_data),
                                               "train.device": "cpu"},
                         sets=["train.seq_len=32", "train.batch_tokens=256", "train.compile=true",
                               "train.val_tokens=256", "train.dtype=bf16"])
    with pytest.warns(UserWarning, match="train.compile is on but this CPU has no bf16"):
        summary = train_mod.train(cfg, open_data(tiny_data), tmp_path / "run")
    assert summary["steps"] == 2


def test_compiled_blocks_step_aside_under_emulated_bf16(monkeypatch):
    model = Transformer(tiny(), 50)
    model.train()
    model.compile_training()
    compiled_calls = []
    monkeypatch.setattr(trunk, "_compiled_block_call",
                        lambda: lambda *a: compiled_calls.append(1) or a[0](*a[1:]))
    idx = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(trunk, "emulated_bf16", lambda device: True)
    model.forward_hidden(idx)
    assert compiled_calls == []
    monkeypatch.setattr(trunk, "emulated_bf16", lambda device: False)
    model.forward_hidden(idx)
    assert len(compiled_calls) == len(model.blocks)


@pytest.mark.slow
@pytest.mark.skipif(compiler_missing(torch.device("cpu")) is not None,
                    reason="torch.compile needs a C++ compiler on the CPU")
def test_compiled_bf16_blocks_trace_the_chunked_attention(monkeypatch):
    """bf16 training on a CPU with bf16 instructions: the compiled blocks trace the chunked
    causal attention (kernels.causal_attention: batched GEMMs, no SDPA) and give eager's loss
    and gradients to bf16's rounding."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from lmkit.core import kernels

    monkeypatch.setattr(kernels, "_CPU_BF16_NATIVE", True)  # as on such a CPU
    torch.manual_seed(0)
    eager = Transformer(tiny(), 50)
    randomize(eager)
    idx = torch.randint(0, 50, (3, 130))  # three blocks of query rows
    eager.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, grads_e = _loss_and_grads(eager, idx, None)
    recorder = EagerAndRecordGraphs()
    for backend in (recorder, "inductor"):
        torch._dynamo.reset()
        call = torch.compile(lambda block, *args: block(*args), backend=backend)
        monkeypatch.setattr(trunk, "_compiled_block_call", lambda call=call: call)
        compiled = copy.deepcopy(eager)
        compiled.compile_training()
        torch._dynamo.utils.counters.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_c, grads_c = _loss_and_grads(compiled, idx, None)
        assert not torch._dynamo.utils.counters["graph_break"]  # none around the attention
        torch.testing.assert_close(loss_c, loss_e, rtol=2e-2, atol=2e-2)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name].float(), grads_e[name].float(),
                                       rtol=5e-2, atol=5e-2, msg=name)
    code = "\n".join(g.print_readable(print_output=False) for g in recorder.graphs)
    assert recorder.graphs and "baddbmm" in code and "scaled_dot_product" not in code
