"""``README.md`` of a record: rendered from ``submission.json`` alone (``--check`` renders it
again and compares), so the prose can never disagree with the numbers."""

from __future__ import annotations

from typing import Any

from lmkit.core.kinds import KIND_MARKS, legend
from lmkit.core.record.summary import COMPLIANCE_NOTES


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "null"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _mark(kind: str) -> str:
    return KIND_MARKS[kind].strip()


def _verdict(value: bool | None) -> str:
    return {True: "true", False: "**false**", None: "null (lmkit cannot know)"}[value]


def render(sub: dict[str, Any]) -> str:
    """The README of ``sub`` (a submission.json object)."""
    seeds = [sub["seed_results"][str(s)] for s in sub["seeds"]]
    head = sub["metric"]
    s = sub["summary"]
    std = s["val_bpb"]["std"]
    lines = [
        f"# {sub['name']}",
        "",
        f"**{head['name']} {_mark(head['kind'])} {_num(sub['val_bpb'])} {head['unit']}** "
        f"(mean of {len(seeds)} seed{'s' * (len(seeds) != 1)}"
        + (f", std {_num(std)}" if std is not None else "")
        + f"; kind `{head['kind']}`) · bytes_total {sub['bytes_total']:,} decimal bytes · "
        f"track `{sub['track']}` · {sub['date']}",
        "",
        f"Objective `{sub['objective']}`; author {sub['author'] or 'not given'}"
        + (f" (@{sub['github_id']})" if sub["github_id"] else "") + ". "
        f"Trained on {', '.join(sub['hardware']['train'])}; evaluated on "
        f"{sub['hardware']['eval']}. Written by `lmkit record` (lmkit "
        f"{sub['software']['lmkit']}); every figure is computed from the runs.",
        "",
        "## Results per seed",
        "",
        f"val_bpb is `{head['name']}` of the artifact read back from its file (protocol: "
        f"{head['protocol']}); pre-quant is the trained checkpoint on the same tokens.",
        "",
        "| seed | steps | train s | pre-quant | quantized (val_bpb) | ± stderr | tokens | bytes "
        "| eval s | artifact bytes | bytes_total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mark = _mark(head["kind"])
    for r in seeds:
        lines.append(
            f"| {r['seed']} | {r['steps']:,} | {r['train_seconds']:.3f} | "
            f"{mark}{_num(r['pre_quant_val_bpb'])} | {mark}{_num(r['val_bpb'])} | "
            f"{_num(r['val_bpb_stderr'])} | {r['val_tokens']:,} | {r['val_bytes']:,} | "
            f"{r['eval_time_s']:.3f} | {r['artifact_bytes']:,} | {r['bytes_total']:,} |")
    lines += ["", "Across seeds (mean ± sample std):", ""]
    for key in ("val_bpb", "pre_quant_val_bpb", "quantization_penalty", "train_wallclock_ms",
                "eval_time_s", "artifact_bytes", "bytes_total"):
        st = s[key]
        d = 6 if key == "quantization_penalty" else 4
        spread = f" ± {_num(st['std'], d)}" if st["std"] is not None else " (one seed: no std)"
        lines.append(f"* {key}: {_num(st['mean'], d)}{spread} (min {_num(st['min'], d)}, max "
                     f"{_num(st['max'], d)})")
    lines += ["", "## Every metric", "",
              "| seed | metric | kind | pre-quant | quantized | ± stderr | tokens | bytes "
              "| protocol |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    kinds = []
    for r in seeds:
        for m in r["metrics"]:
            kinds.append(m)
            code = _mark(m["kind"])
            lines.append(f"| {r['seed']} | {m['name']} | `{code}` {m['kind']} | "
                         f"{_num(m['pre_quant_value'])} | {_num(m['value'])} | "
                         f"{_num(m['stderr'])} | {m['tokens']:,} | {m['bytes']:,} | "
                         f"{m['protocol']} |")
    lines += ["", *[f"* {line}" for line in legend(kinds, markdown=True)], ""]
    lines += ["## Bytes", "", f"bytes_total = {sub['bytes_total']:,}: {sub['bytes_note']}. "
              f"Code: {sub['code_bytes']:,} bytes in {len(sub['bytes_counted']) - 1} files. "
              f"Cap used for packing: {sub['bytes_cap']:,}.", ""]
    lines += ["## Compliance", "", "| item | value | how |", "|---|---|---|"]
    for key, value in sub["compliance"].items():
        lines.append(f"| `{key}` | {_verdict(value)} | {COMPLIANCE_NOTES[key]} |")
    lines += ["", "## Files", "",
              "* `submission.json`: every figure above; `requirements.txt`: exact versions",
              "* `code/`: the code counted in bytes_total",
              "* `seed_<seed>/`: `metrics.jsonl` (the training log), `train_run.json` (its "
              "run.json), the artifact, `eval_checkpoint.json` and `eval_artifact.json` (the "
              "evaluations)",
              "", f"Re-validate with `lmkit record --check {sub['folder']}`.", ""]
    return "\n".join(lines)
