"""``lmkit record RUN...``: write a parameter-golf record folder from one run per seed.

The folder is built in a hidden sibling and renamed into place when complete, so a crash never
leaves half a record under the record's name.
"""

from __future__ import annotations

import datetime as dt
import shutil
import uuid
from pathlib import Path
from typing import Any

from lmkit import __version__
from lmkit.core import atomic, runs
from lmkit.core.pack import Recipe
from lmkit.core.record import layout, readme, summary
from lmkit.core.record.seeds import Log, hardware_of, log_figures, record_seed
from lmkit.errors import LmkitError

FORMAT = "lmkit-record/1"
RECIPE_KEYS = ("bits", "method", "compression", "calib_tokens")


def preflight(run_dirs: list[Path]) -> list[tuple[int, Path, dict[str, Any]]]:
    """(seed, run, run.json) of each run, sorted by seed; refuses runs that are not seeds of
    one configuration before any work."""
    from lmkit.core.compare.training import REUSABLE_DIFFERENCES, config_difference

    if not run_dirs:
        raise LmkitError("lmkit record needs at least one run directory (one per seed)")
    found = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise LmkitError(f"run directory {run_dir} does not exist")
        meta = runs.read_run_meta(run_dir)
        state = runs.read_run_state(run_dir)  # a checkpoint and a log that describes it,
        figures = log_figures(runs.read_metrics(Path(run_dir)),  # before minutes of packing
                              str(Path(run_dir) / runs.METRICS_FILE))
        if figures["steps"] != state["step"]:
            raise LmkitError(f"{Path(run_dir) / runs.METRICS_FILE} ends at step "
                             f"{figures['steps']} but the checkpoint is at step {state['step']}; "
                             "the log does not describe these weights")
        seed = (meta["config"].get("train") or {}).get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LmkitError(f"{run_dir}/{runs.RUN_FILE}: config.train.seed is {seed!r}, not "
                             "an integer; the run is damaged")
        found.append((seed, Path(run_dir), meta))
    found.sort(key=lambda f: f[0])
    for (s1, d1, _), (s2, d2, _) in zip(found, found[1:], strict=False):
        if s1 == s2:
            raise LmkitError(f"{d1} and {d2} both have seed {s1}: a record takes one run per "
                             "seed")
    first_dir, first = found[0][1], found[0][2]
    for _, d, meta in found[1:]:
        diff = config_difference(first["config"], meta["config"], REUSABLE_DIFFERENCES | {"seed"})
        if diff:
            raise LmkitError(f"{d} is not a seed of {first_dir}: their configs differ in more "
                             f"than train.seed ({diff})")
    return found


def eval_hardware(device: str) -> str:
    import torch

    from lmkit.core.device import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"1x {torch.cuda.get_device_name(dev)}"
    import platform

    return f"{dev.type} ({platform.platform()})"


def build_submission(seeds: list[dict[str, Any]], *, code_paths: list[str], code_bytes: int,
                     cap_bytes: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The submission.json object: ``meta`` (track, date, name, author, ...) plus everything
    computed from the seeds."""
    for s in seeds:
        s["bytes_total"] = s["artifact_bytes"] + code_bytes
    stats = summary.summarize(seeds)
    first = seeds[0]
    head = {"name": first["metric"], "kind": first["kind"], "unit": first["unit"],
            "protocol": first["protocol"]}
    for s in seeds[1:]:
        if (s["metric"], s["kind"], s["protocol"]) != (head["name"], head["kind"],
                                                        head["protocol"]):
            raise LmkitError(f"seed {s['seed']}'s headline metric is {s['metric']} "
                             f"({s['kind']}, {s['protocol']}), seed {first['seed']}'s "
                             f"{head['name']} ({head['kind']}, {head['protocol']})")
    return {
        "format": FORMAT,
        **meta,
        "objective": first["objective"],
        "metric": head,
        "val_bpb": stats["val_bpb"]["mean"], "val_bpb_std": stats["val_bpb"]["std"],
        "val_bpb_kind": head["kind"],
        "pre_quant_val_bpb": stats["pre_quant_val_bpb"]["mean"],
        "quantized_val_bpb": stats["quantized_val_bpb"]["mean"],
        "seeds": [s["seed"] for s in seeds],
        "seed_results": {str(s["seed"]): s for s in seeds},
        "summary": stats,
        **summary.byte_count(seeds, code_paths, code_bytes),
        "bytes_cap": cap_bytes,
        "artifact_bytes_max": stats["artifact_bytes"]["max"],
        "compliance": summary.compliance(seeds, cap_bytes),
        "compliance_notes": dict(summary.COMPLIANCE_NOTES),
    }


def write_record(run_dirs: list[Path], out: Path, *, name: str | None = None,
                 track: str = layout.DEFAULT_TRACK, author: str | None = None,
                 github_id: str | None = None, date: dt.date | None = None,
                 cap_bytes: int = summary.DEFAULT_CAP_BYTES, force: bool = False,
                 device: str = "auto", log: Log = None, **options: Any) -> dict[str, Any]:
    """Write ``out/records/track_<track>/<date>_<name>/``; return its submission.json object
    (with ``path``, the folder). ``options``: the pack recipe (bits, method, compression,
    calib_tokens) and scoring options (max_tokens, options, data_dir, dtype, batch_size)."""
    found = preflight([Path(d) for d in run_dirs])
    meta0 = found[0][2]
    name = layout.check_label(name or f"lmkit_{meta0['objective']}_"
                              f"{meta0['config'].get('preset') or 'custom'}", "--name")
    layout.check_label(track, "--track")
    if cap_bytes < 1:
        raise LmkitError(f"--cap-bytes must be a positive number of bytes, got {cap_bytes}")
    date = date or dt.datetime.now(dt.UTC).date()
    recipe = Recipe(**{k: v for k, v in options.items() if k in RECIPE_KEYS and v is not None})
    scoring = {k: v for k, v in options.items() if k not in RECIPE_KEYS}
    rel = layout.folder_name(track, name, date)
    folder = Path(out) / rel
    if folder.exists() and not force:
        raise LmkitError(f"{folder} already exists; pass --force to replace it, or choose "
                         "another --name")
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        from lmkit.core.registry import get_objective

        entry = get_objective(meta0["objective"])
        code_paths = layout.write_code(tmp, entry.obj.__module__)
        code_bytes = layout.files_bytes(tmp, code_paths)
        budget = cap_bytes - code_bytes
        cache: dict[str, Any] = {}
        seeds = []
        for seed, run_dir, _ in found:
            if log:
                log(f"seed {seed}: {run_dir}")
            seeds.append(record_seed(run_dir, tmp, recipe=recipe, budget=budget,
                                     scoring=scoring, device=device, leak_cache=cache, log=log))
        envs = [m.get("environment") or {} for _, _, m in found]
        sub = build_submission(seeds, code_paths=code_paths, code_bytes=code_bytes,
                               cap_bytes=cap_bytes, meta={
            "track": track, "date": date.isoformat(), "name": name, "author": author,
            "github_id": github_id, "folder": rel.as_posix(),
            "hardware": {"train": list(dict.fromkeys(hardware_of(e) for e in envs)),
                         "eval": eval_hardware(device)},
            "software": {"lmkit": __version__, "git_sha": runs.git_sha(),
                         "pytorch_version": _torch_version()},
            "recipe": {"bits": recipe.bits, "method": recipe.method,
                       "compression": recipe.compression, "calib_tokens": recipe.calib_tokens,
                       "artifact_cap_bytes": budget},
            "evaluation": {"max_tokens": scoring.get("max_tokens"),
                           "options": scoring.get("options") or {},
                           "dtype": scoring.get("dtype")},
        })
        plugins = [] if entry.distribution == "lmkit" else [entry.distribution]
        atomic.write_text(tmp / layout.REQUIREMENTS_FILE,
                          layout.requirements(plugins, sub["software"]["git_sha"]))
        atomic.write_json(tmp / layout.SUBMISSION_FILE, sub)
        atomic.write_text(tmp / layout.README_FILE, readme.render(sub))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**sub, "path": str(folder)}


def _torch_version() -> str:
    import torch

    return torch.__version__
