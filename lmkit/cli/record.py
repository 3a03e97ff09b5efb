"""``lmkit record``: parse, call :mod:`lmkit.core.record`, print."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from lmkit.cli.display import console, emit_json, output
from lmkit.cli.options import (
    MAX_BATCH,
    Count,
    bounded,
    calib_tokens_option,
    objective_options,
    parse_opts,
    single_process,
)
from lmkit.core.defaults import DEFAULT_CAP_BYTES
from lmkit.errors import LmkitError


def _date(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected YYYY-MM-DD") from None


@click.command("record")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True,
              help="Where records/track_<track>/<date>_<name>/ is written.")
@click.option("--check", "check_dir", type=click.Path(path_type=Path),
              help="Re-validate an existing record folder instead (schema, bytes on disk, "
                   "per-seed figures against the logs, compliance); exit 1 on any failure.")
@click.option("--name", help="The record's name [default: lmkit_<objective>_<preset>].")
@click.option("--track", default="non_record_16mb", show_default=True,
              help="Parameter-golf track, e.g. 10min_16mb (the compliance block says whether "
                   "the runs meet its limits).")
@click.option("--author", help="Author's name (lmkit cannot know it) [default: null].")
@click.option("--github-id", help="Author's GitHub id [default: null].")
@click.option("--date", callback=_date, help="The folder's date, YYYY-MM-DD [default: today, UTC].")
@click.option("--cap-bytes", type=Count(min=1), default=DEFAULT_CAP_BYTES, show_default=True,
              help="Cap on bytes_total (artifact + counted code) in DECIMAL bytes; artifacts are "
                   "packed to what the code leaves.")
@click.option("--bits", type=click.Choice(["6", "8"]), default="6", show_default=True,
              help="Artifact recipe, as in `lmkit pack`.")
@calib_tokens_option
@click.option("--max-tokens", type=Count(min=1),
              help="Score only a validation prefix (then full_validation_targets is false) "
                   "[default: all of it].")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="An evaluation option of the runs' objective (repeatable).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Data directory, if it moved since training.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]),
              help="Scoring precision [default: the run's train.dtype].")
@click.option("--batch-size", type=bounded(1, MAX_BATCH), help="Windows per forward pass.")
@click.option("--force", is_flag=True, help="Replace an existing folder of the same name.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def record_command(run_dirs, out, check_dir, name, track, author, github_id, date, cap_bytes,
                   bits, calib_tokens, max_tokens, opts, data_dir, device, dtype, batch_size,
                   force, as_json) -> None:
    """Write a parameter-golf record folder from RUN_DIRS (one trained run per seed).

    Per seed: the run's artifact (reused when valid for its checkpoint and under the cap, else
    packed), scored read back from its file on the whole validation set, beside the trained
    checkpoint. The folder holds submission.json (every figure computed from the runs),
    README.md, requirements.txt, code/ (counted in bytes_total) and seed_<seed>/ (the training
    log, the run's run.json as train_run.json, the artifact, both evaluations). A folder over
    the cap or with fewer than 3 seeds is still written; its compliance block says so.

    \b
    Example:
      lmkit record runs/ar-s1 runs/ar-s2 runs/ar-s3 --out sub --author "Ada" --github-id ada
      lmkit record --check sub/records/track_non_record_16mb/2026-12-01_lmkit_ar_small
    """
    single_process("record")
    if check_dir is not None:
        if run_dirs:
            raise LmkitError("--check DIR re-validates a folder; pass no run directories")
        from lmkit.core.record import check_record

        result = check_record(check_dir)
        if as_json:
            emit_json(result)
        else:
            for line in result["failures"]:
                output.print(f"FAIL {line}", markup=False)
            for line in result["notes"]:
                output.print(f"note {line}", markup=False)
            output.print(f"{result['folder']}: " + ("ok" if result["ok"] else
                                                    f"{len(result['failures'])} failure(s)"),
                         markup=False)
        if not result["ok"]:
            raise SystemExit(1)
        return
    if not run_dirs:
        raise LmkitError("pass one run directory per seed (or --check DIR)")
    from lmkit.core.record import write_record

    parse_opts(opts)  # a bad --opt fails before any work
    sub = write_record(list(run_dirs), out, name=name, track=track, author=author,
                       github_id=github_id, date=date, cap_bytes=cap_bytes, force=force,
                       device=device, bits=int(bits), calib_tokens=calib_tokens,
                       max_tokens=max_tokens, options=objective_options(opts, None),
                       data_dir=data_dir, dtype=dtype,
                       batch_size=batch_size, log=None if as_json else console.print)
    if as_json:
        emit_json(sub)
        return
    head = sub["metric"]
    output.print(f"wrote {sub['path']}", markup=False)
    std = sub["val_bpb_std"]
    spread = "" if std is None else f" ± {std:.4f} (sample std)"
    output.print(f"{head['name']} ({head['kind']}, {head['unit']}) {sub['val_bpb']:.4f}{spread} "
                 f"over {len(sub['seeds'])} seed(s); bytes_total {sub['bytes_total']:,} "
                 "decimal bytes", markup=False)
    for key, value in sub["compliance"].items():
        output.print(f"  {key}: {'null' if value is None else str(value).lower()}",
                     markup=False)
