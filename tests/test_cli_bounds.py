"""Issue 14, defect 11: numeric CLI options are range-checked (finite, with sane upper bounds),
corpus .jsonl damage, a corrupt tokenizer and unbounded sampler steps are one clear error."""

from __future__ import annotations

import pytest

from lmkit.cli import main
from lmkit.core.data.corpus import corpus_from_path
from lmkit.core.tokenizer import load_processor
from lmkit.errors import LmkitError


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["eval", "RUN", "--stride", "0"], "--stride"),
    (["eval", "RUN", "--batch-size", "0"], "--batch-size"),
    (["eval", "RUN", "--batch-size", "-1"], "--batch-size"),
    (["eval", "RUN", "--seed", str(2**70)], "--seed"),
    (["sample", "RUN", "--num", "100000000"], "--num"),
    (["sample", "RUN", "--steps", "100000000"], "--steps"),
    (["sample", "RUN", "--temperature", "nan"], "--temperature"),
    (["sample", "RUN", "--temperature", "-1"], "--temperature"),
    (["sample", "RUN", "--top-p", "inf"], "--top-p"),
    (["sample", "RUN", "--batch-size", "-1"], "--batch-size"),
    (["train", "--time", "nan"], "--time"),
    (["train", "--time", "inf"], "--time"),
    (["train", "--seed", str(2**70)], "--seed"),
])
def test_cli_bounds_numeric_options_are_range_checked(args, needle, tmp_path, capsys):
    args = [str(tmp_path) if a == "RUN" else a for a in args]
    code, err = run_cli(args, capsys)
    assert code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("line", [
    b'{"text": "ok \xff\xfe"}',                  # bad UTF-8
    b'{"text": "\\ud800 lone surrogate"}',      # lone surrogate
    b'[' * 100_000 + b']' * 100_000,             # deep nesting
    b'{"text": ' + b'[' * 1000 + b']' * 1000 + b'}',
    b'"just a string"',
])
def test_corpus_jsonl_damage_is_one_clear_error(tmp_path, line):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(LmkitError, match="c.jsonl:2"):
        list(corpus_from_path(path).documents())


def test_corrupt_tokenizer_is_one_clear_error(tmp_path):
    for data in (b"\x00" * 100, b"\x0a\xff\xff\xff\xff\x0f", b"garbage model"):
        path = tmp_path / "tokenizer.model"
        path.write_bytes(data)
        with pytest.raises(LmkitError, match="tokenizer.model"):
            load_processor(path)


def test_ddpm_steps_are_bounded():
    from types import SimpleNamespace

    from lmkit.builtin.samplers import MAX_STEPS, check_steps

    assert check_steps(SimpleNamespace(steps=MAX_STEPS)) == MAX_STEPS
    with pytest.raises(LmkitError, match="--steps"):
        check_steps(SimpleNamespace(steps=100_000_000))
