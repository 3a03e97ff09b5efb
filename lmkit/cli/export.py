"""``lmkit export``: parse, call :mod:`lmkit.core.export`, print."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import click

from lmkit.cli.display import console, emit_json, metrics_table, output
from lmkit.cli.options import (
    estimator_seed_option,
    objective_options,
    scoring_options,
    single_process,
)


@click.command("export")
@click.argument("source", metavar="RUN_DIR|ARTIFACT", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(file_okay=False, path_type=Path))
@scoring_options
@estimator_seed_option
@click.option("--with-val", is_flag=True,
              help="Also write the validation stream (val.bin), so `lmkit eval OUT` needs "
                   "nothing else; it publishes your validation text with the model.")
@click.option("--force", is_flag=True, help="Replace an earlier export in OUT.")
@click.option("--push", "repo_id", metavar="REPO_ID",
              help="Then upload OUT to this Hugging Face model repo, e.g. me/lmkit-ar-small "
                   "(needs pip install 'lmkit[hub]' and `hf auth login`).")
@click.option("--private", is_flag=True, help="With --push: create the repo private.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object on stdout: out, files, config, evaluation.")
def export_command(source, out, max_tokens, stride, opts, data_dir, device, dtype, batch_size,
                   seed, with_val, force, repo_id, private, as_json) -> None:
    """Write a Hub-ready folder: model.safetensors, config.json, tokenizer.model and a model
    card (README.md) whose YAML front matter holds the honest figures and their protocol.

    The figures are the run's stored `lmkit eval` result for the same scoring options (pass
    the ones you evaluated with), else an evaluation made now; a packed ARTIFACT is exported
    as the dequantized weights it decodes to, and evaluated now. `lmkit eval OUT` and `lmkit
    sample OUT` work on the folder. Nothing is written unless the whole folder is.

    \b
    Examples:
      lmkit export runs/ar-small exports/ar-small --max-tokens 32768
      lmkit export runs/ar-small/artifact.int6-gptq.lzma exports/ar-small-int6
      lmkit export runs/ar-small exports/ar-small --push me/lmkit-ar-small
    """
    single_process("export")
    from lmkit.core.export import export_model, push_folder

    with console.status("exporting…", spinner="dots") if not as_json else nullcontext():
        result = export_model(source, out, device=device, force=force, with_val=with_val,
                              max_tokens=max_tokens, options=objective_options(opts, stride),
                              data_dir=data_dir, dtype=dtype, batch_size=batch_size, seed=seed)
    if repo_id:
        with console.status(f"pushing to {repo_id}…", spinner="dots") if not as_json \
                else nullcontext():
            result["pushed"] = {"repo_id": repo_id,
                                "commit": push_folder(out, repo_id, private=private)}
    if as_json:
        emit_json(result)
        return
    output.print(metrics_table(result["evaluation"]))
    where = result["evaluation"].get("reused_from") or "evaluated now"
    output.print(f"figures: {where}", soft_wrap=True)
    output.print(f"wrote {result['out']}: {', '.join(result['files'])}", soft_wrap=True)
    if repo_id:
        output.print(f"pushed to {repo_id}: {result['pushed']['commit']}", soft_wrap=True)
