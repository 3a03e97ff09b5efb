"""The one build path: a run is evaluated from its own files, with the batch training used."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmkit.core import runs
from lmkit.core.config import resolve_config
from lmkit.core.data import open_data
from lmkit.core.evaluate import evaluate_run, make_eval_context
from lmkit.core.tokenizer import Tokenizer
from lmkit.core.train import train
from lmkit.errors import LmkitError

FAST = ["train.seq_len=32", "train.batch_tokens=256", "train.log_every=2",
        "train.val_tokens=512", "train.dtype=fp32", "train.micro_batch=2"]


@pytest.fixture(scope="module")
def moved_run(tiny_data, tmp_path_factory):
    """A run trained on a copy of the data, evaluated, and then its data directory moved away."""
    root = tmp_path_factory.mktemp("moved")
    data = root / "data"
    shutil.copytree(tiny_data, data)
    cfg = resolve_config(preset="tiny", flags={"train.steps": 3, "data.path": str(data)},
                         sets=FAST)
    train(cfg, open_data(data), root / "run")
    before = evaluate_run(root / "run", max_tokens=1024, device="cpu")
    data.rename(root / "elsewhere")
    return root, before


def test_a_run_evaluates_from_its_own_files_after_the_data_moves(moved_run):
    root, before = moved_run
    after = evaluate_run(root / "run", max_tokens=1024, device="cpu")
    assert after["metrics"] == before["metrics"]
    assert after["data"]["val_source"] == str((root / "run" / runs.VAL_FILE).resolve())


def test_without_its_copy_a_moved_run_names_what_is_missing(moved_run, tmp_path):
    root, before = moved_run
    lonely = tmp_path / "run"
    shutil.copytree(root / "run", lonely)
    (lonely / runs.VAL_FILE).unlink()
    with pytest.raises(LmkitError, match=r"no longer exists; pass --data DIR"):
        evaluate_run(lonely, max_tokens=1024, device="cpu")
    # --data pointing at the moved directory works, with the same numbers
    again = evaluate_run(lonely, max_tokens=1024, device="cpu", data_dir=root / "elsewhere")
    assert again["metrics"] == before["metrics"]


def test_evaluation_uses_the_training_micro_batch(moved_run):
    root, _ = moved_run
    run = runs.load_run(root / "run")
    assert run.micro_batch == 2 and make_eval_context(run, max_tokens=256).batch_size == 2
    assert make_eval_context(run, max_tokens=256, batch_size=5).batch_size == 5


def test_the_tokenizer_is_one_value_with_cached_luts(tiny_data):
    tok = Tokenizer.load(tiny_data / "tokenizer.model")
    assert tok.lut(1026) is tok.lut(1026) and tok.lut(1026).size == 1026
    assert open_data(tiny_data, tok).tokenizer is tok  # handed down, not loaded again


def test_model_seq_len_is_train_seq_len(tiny_data):
    cfg = resolve_config(preset="tiny", flags={"train.steps": 1},
                         sets=["model.seq_len=48", "train.batch_tokens=480"])
    assert cfg.train.seq_len == 48 and not hasattr(cfg.model, "seq_len")


def test_auto_precision_on_a_cpu_is_fp32(monkeypatch):
    """fp32 on a CPU with or without bf16 instructions (bf16 was the slower on both kinds it
    was measured on); bf16 only when asked."""
    import torch

    from lmkit.core import device as device_mod

    cpu = torch.device("cpu")
    for native in (False, True):
        monkeypatch.setattr(device_mod, "cpu_has_native_bf16", lambda native=native: native)
        assert device_mod.resolve_dtype("auto", cpu) == "fp32"
        assert device_mod.resolve_dtype("bf16", cpu) == "bf16"


def test_host_batches_move_plainly_off_cuda() -> None:
    from lmkit.core.device import to_device

    batch = torch.arange(12).view(3, 4)
    moved = to_device(batch, torch.device("cpu"))
    assert moved is batch  # the CPU path copies nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_batches_reach_cuda_through_pinned_memory() -> None:
    from lmkit.core.device import to_device

    batch = torch.arange(12).view(3, 4)
    moved = to_device(batch, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved.is_cuda and torch.equal(moved.cpu(), batch) and not batch.is_pinned()
