"""``lmkit record --check DIR``: re-validate a record folder from its own files.

Checks, in order: ``submission.json`` against the schema; ``bytes_total`` and every byte figure
against the sizes on disk; each seed's figures recomputed from its copied log, ``run.json``,
evaluations and artifact; the means, stds and compliance block recomputed (the leak check
re-run where the run's data is here); ``README.md`` rendered again. Every failure is reported.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from lmkit.core import jsonfile, runs
from lmkit.core.record import layout, readme, summary
from lmkit.core.record.seeds import leak_report, seed_entry
from lmkit.errors import LmkitError

SCHEMA_FILE = "submission.schema.json"


def schema() -> dict[str, Any]:
    """The JSON Schema of submission.json, shipped in ``lmkit/schemas``."""
    text = resources.files("lmkit").joinpath("schemas", SCHEMA_FILE).read_text("utf-8")
    return json.loads(text)


def schema_errors(sub: Any) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        raise LmkitError("lmkit record --check needs jsonschema: pip install jsonschema") from None
    validator = jsonschema.Draft202012Validator(schema())
    return [f"schema: {'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(sub), key=lambda e: list(e.absolute_path))]


def same(a: Any, b: Any) -> bool:
    """Equal as JSON values, floats to 1e-12 relative (a JSON round trip keeps them exact)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (math.isfinite(a) and math.isfinite(b)
                          and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _inside(folder: Path, rel: str) -> Path | None:
    path = (folder / rel).resolve()
    return path if path.is_relative_to(folder.resolve()) else None


class Checker:
    """Collects failures (what is wrong, one line each) and notes (what could not be checked)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.failures: list[str] = []
        self.notes: list[str] = []

    def expect(self, what: str, stored: Any, recomputed: Any) -> None:
        if not same(stored, recomputed):
            self.failures.append(f"{what}: submission.json says {_short(stored)}, the folder "
                                 f"gives {_short(recomputed)}")

    def read(self, rel: str, what: str) -> Any:
        path = _inside(self.folder, rel)
        if path is None:
            self.failures.append(f"{what}: {rel} points outside the folder")
            return None
        if not path.is_file():
            self.failures.append(f"{what}: {rel} is missing")
            return None
        try:
            if rel.endswith(".jsonl"):
                return runs.MetricsLog(path).records()
            return jsonfile.read_json(path)
        except LmkitError as exc:
            self.failures.append(f"{what}: {exc}")
            return None


def _short(value: Any) -> str:
    text = jsonfile.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_seed(c: Checker, key: str, stored: dict[str, Any], sub: dict[str, Any]) -> None:
    """Recompute one seed's entry from its files and compare every figure."""
    try:
        _check_seed(c, key, stored, sub)
    except (LmkitError, KeyError, TypeError, IndexError, AttributeError, ValueError) as exc:
        c.failures.append(f"seed {key}: its files do not give its figures ({exc!r:.200})")


def _check_seed(c: Checker, key: str, stored: dict[str, Any], sub: dict[str, Any]) -> None:
    from lmkit.core.artifact import read_artifact

    seed = stored["seed"]
    where = f"seed {key}"
    if str(seed) != key:
        c.failures.append(f"{where}: its entry says seed {seed}")
    sub_dir = layout.seed_dir(seed)
    records = c.read(f"{sub_dir}/{layout.LOG_FILE}", where)
    meta = c.read(f"{sub_dir}/{layout.RUN_FILE}", where)
    before = c.read(f"{sub_dir}/{layout.EVAL_CHECKPOINT_FILE}", where)
    after = c.read(f"{sub_dir}/{layout.EVAL_ARTIFACT_FILE}", where)
    artifact = _inside(c.folder, stored["artifact"])
    if artifact is None or not artifact.is_file():
        c.failures.append(f"{where}: artifact {stored['artifact']} is missing")
        return
    if None in (records, meta, before, after):
        return
    manifest, _ = read_artifact(artifact)
    env = meta.get("environment") or {}
    for field, value in seed_entry(seed, env, records, before, after, artifact).items():
        c.expect(f"{where} {field}", stored.get(field), value)
    c.expect(f"{where} seed in run.json", seed, meta["config"]["train"]["seed"])
    c.expect(f"{where} artifact's checkpoint step", stored["steps"],
             (manifest.get("checkpoint") or {}).get("step"))
    c.expect(f"{where} artifact bytes in eval_artifact.json", stored["artifact_bytes"],
             (after.get("artifact") or {}).get("bytes"))
    recipe = sub["recipe"]
    c.expect(f"{where} artifact recipe", [recipe["bits"], recipe["method"],
                                          recipe["compression"]],
             [manifest.get("bits"), manifest.get("method"), manifest.get("compression")])
    c.expect(f"{where} bytes_total", stored["bytes_total"],
             stored["artifact_bytes"] + sub["code_bytes"])
    leak = stored["leak_check"]
    if leak is not None and Path(leak["dir"]).is_dir():
        c.expect(f"{where} leak_check (re-run on {leak['dir']})", leak,
                 leak_report(Path(leak["dir"]), {}))
    elif leak is not None:
        c.notes.append(f"{where}: data {leak['dir']} is not here; its leak check is taken as "
                       "recorded")


def check_record(folder: str | Path) -> dict[str, Any]:
    """Re-validate ``folder``; ``ok`` is False with every failure listed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmkitError(f"record folder {folder} does not exist")
    sub = jsonfile.read_json(folder / layout.SUBMISSION_FILE,
                             f"{folder} is not a record folder ({layout.SUBMISSION_FILE} is "
                             "missing)")
    c = Checker(folder)
    c.failures += schema_errors(sub)
    if c.failures:  # the rest reads fields the schema guarantees
        return _result(c)
    if sorted(sub["seed_results"]) != sorted(str(s) for s in sub["seeds"]):
        c.failures.append(f"seeds {sub['seeds']} do not match seed_results "
                          f"{sorted(sub['seed_results'])}")
        return _result(c)
    seeds = [sub["seed_results"][str(s)] for s in sub["seeds"]]
    for key, stored in sub["seed_results"].items():
        check_seed(c, key, stored, sub)
    code = layout.code_files(folder)
    c.expect("code_bytes", sub["code_bytes"], layout.files_bytes(folder, code))
    c.expect("files counted", sub["bytes_counted"],
             summary.byte_count(seeds, code, sub["code_bytes"])["bytes_counted"])
    counted = [_inside(folder, p) for p in sub["bytes_counted"]]
    if all(p is not None and p.is_file() for p in counted):
        c.expect("bytes_total (sizes on disk of bytes_counted)", sub["bytes_total"],
                 sum(p.stat().st_size for p in counted))  # type: ignore[union-attr]
    else:
        c.failures.append("bytes_counted names files that are not in the folder")
    for field, value in summary.byte_count(seeds, code, sub["code_bytes"]).items():
        c.expect(field, sub[field], value)
    stats = summary.summarize(seeds)
    c.expect("summary", sub["summary"], stats)
    for field in ("val_bpb", "pre_quant_val_bpb", "quantized_val_bpb"):
        c.expect(field, sub[field], stats[field]["mean"])
    c.expect("val_bpb_std", sub["val_bpb_std"], stats["val_bpb"]["std"])
    c.expect("artifact_bytes_max", sub["artifact_bytes_max"], stats["artifact_bytes"]["max"])
    c.expect("compliance", sub["compliance"], summary.compliance(seeds, sub["bytes_cap"]))
    try:
        text = (folder / layout.README_FILE).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        c.failures.append(f"{layout.README_FILE}: cannot be read ({exc})")
    else:
        if text != readme.render(sub):
            c.failures.append(f"{layout.README_FILE} differs from the one submission.json "
                              "renders (edited by hand, or submission.json changed)")
    if not (folder / layout.REQUIREMENTS_FILE).is_file():
        c.failures.append(f"{layout.REQUIREMENTS_FILE} is missing")
    return _result(c)


def _result(c: Checker) -> dict[str, Any]:
    return {"folder": str(c.folder), "ok": not c.failures, "failures": c.failures,
            "notes": c.notes}
