"""``lmkit export``: a run (or a packed artifact) as a folder in the layout the Hub expects.

::

    OUT/
      model.safetensors   the weights (of an artifact: the dequantized weights it decodes to)
      config.json         objective and its options, trunk config, token ids, vocabulary,
                          seq_len, checkpoint, the full lmkit config, what it was exported from
      tokenizer.model     the run's SentencePiece model
      README.md           the model card (see lmkit.core.modelcard): the honest figures
      val.bin             only with --with-val: the validation stream, so that `lmkit eval OUT`
                          needs nothing outside the folder

``config.json`` holds the records of ``run.json`` and ``state.json`` that loading needs, so the
folder loads through the one loading path (:func:`lmkit.core.runs.load_run`) to the same model;
``lmkit eval OUT`` and ``lmkit sample OUT`` work on it as on the run. The card's figures come
from the run's stored evaluation of the same protocol (:mod:`lmkit.core.evalstore`), or from
an evaluation made now; an artifact is evaluated now. The folder is written whole or not at
all (:func:`lmkit.core.atomic.staged_dir`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmkit import __version__
from lmkit.core import atomic, jsonfile, runs
from lmkit.errors import LmkitError

FORMAT = "lmkit-export/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
Log = Callable[[str], None] | None


# -- reading -------------------------------------------------------------------------------------
def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like an export folder (it holds a ``config.json``)."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """``OUT/config.json``, checked to hold every record loading needs, with consistent
    summary keys; any damage is one LmkitError naming the file."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    where = str(path)
    config = jsonfile.read_json(path, f"{folder} is not an lmkit export ({CONFIG_FILE} is "
                                      "missing)")
    if config.get("format") != FORMAT:
        raise LmkitError(f"{where}: format {config.get('format')!r} is not {FORMAT!r}: not an "
                         "lmkit export (re-create it with `lmkit export RUN OUT`)")
    meta, state = run_records(config)
    runs.check_run_meta(meta, where)
    runs.check_run_state(state, f"{where} [checkpoint]")
    stored = meta["config"]
    train = stored.get("train") if isinstance(stored.get("train"), dict) else {}
    summary = {"objective": meta["objective"], "objective_options": stored.get("options"),
               "seq_len": train.get("seq_len"), "vocab_size": meta["tokens"]["vocab_size"]}
    for key, want in summary.items():
        if key not in config or config[key] != want:
            raise LmkitError(f"{where}: {key!r} is {config.get(key)!r} but the lmkit config it "
                             f"holds says {want!r}; it was edited: restore it or export again")
    jsonfile.require(config, "exported_from", dict, where)
    return config


def run_records(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``run.json`` and checkpoint-state records an export's config holds."""
    meta = {key: config.get(key) for key in ("objective", "config", "model", "tokens", "data")}
    state = config.get("checkpoint")
    return meta, state if isinstance(state, dict) else {}


def check_tokenizer(folder: Path, sha256: str, meta: dict[str, Any]) -> None:
    """The folder's tokenizer must be the one the model was trained with (a swapped one with
    the same vocabulary size would silently change every byte count)."""
    want = meta["data"]["tokenizer"]["sha256"]
    if sha256 != want:
        raise LmkitError(f"{folder / runs.TOKENIZER_FILE} (sha256 {sha256[:12]}...) is not the "
                         f"tokenizer the model was trained with (sha256 {want[:12]}...); "
                         "restore it or export again")


# -- writing -------------------------------------------------------------------------------------
def check_out(out: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless ``force`` (and then only an earlier export's folder)."""
    if out.exists() and not out.is_dir():
        raise LmkitError(f"{out} is a file; pass a folder path for the export")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise LmkitError(f"{out} is not empty; pass --force to replace an earlier export "
                             "there, or choose another folder")
        if not is_export_dir(out) or (out / runs.RUN_FILE).exists():
            raise LmkitError(f"--force refuses to replace {out}: it is not an lmkit export (no "
                             f"{CONFIG_FILE}, or it is a run directory)")


def source_record(run: runs.Run, path: Path, manifest: dict[str, Any] | None) -> dict[str, Any]:
    """What the folder was exported from: the run, and the artifact file when there is one."""
    from lmkit.core.evaluate import artifact_entry
    from lmkit.core.tokenizer import sha256_file

    artifact = None
    if manifest is not None:
        artifact = {**artifact_entry(path, manifest), "sha256": sha256_file(path)}
    return {"run": str(run.path.resolve()), "artifact": artifact, "lmkit": __version__,
            "git_sha": runs.git_sha(),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


def export_config(run: runs.Run, source: dict[str, Any],
                  data_dir: str | Path | None = None) -> dict[str, Any]:
    """``config.json``: Hub-style summary keys first, then the records loading reads."""
    meta = run.meta
    data = dict(meta["data"])
    if data_dir is not None:  # the data moved: record where evaluation found it
        data["dir"] = str(Path(data_dir).resolve())
    return {
        "format": FORMAT, "library_name": "lmkit", "lmkit_version": __version__,
        "objective": meta["objective"], "objective_options": meta["config"].get("options"),
        "seq_len": meta["config"]["train"]["seq_len"],
        "vocab_size": meta["tokens"]["vocab_size"],
        "model": meta["model"], "tokens": meta["tokens"],
        "checkpoint": {k: run.state[k] for k in ("step", "tokens", "seconds")},
        "config": meta["config"], "data": data, "exported_from": source,
    }


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's state dict as safetensors (``format: pt``, as the Hub's loaders expect)."""
    from safetensors.torch import save

    inner = getattr(model, "_orig_mod", model)
    tensors = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    return save(tensors, metadata={"format": "pt", "lmkit": FORMAT})


def evaluate_source(run: runs.Run, model: torch.nn.Module, manifest: dict[str, Any] | None,
                    path: Path, **scoring: Any) -> dict[str, Any]:
    """The card's figures: a run's stored evaluation of this protocol (evaluated and stored
    now if there is none); an artifact's round trip, evaluated now."""
    from lmkit.core.evaluate import artifact_entry, evaluate_loaded, evaluate_stored

    if manifest is None:
        return evaluate_stored(run, reuse=True, latest=False, **scoring)
    return {**evaluate_loaded(run, model=model, **scoring),
            "artifact": artifact_entry(path, manifest)}


def export_model(source: str | Path, out: str | Path, *, device: str = "auto",
                 force: bool = False, with_val: bool = False, log: Log = None,
                 **scoring: Any) -> dict[str, Any]:
    """Export a run directory or a packed artifact file to the folder ``out``.

    ``scoring`` are :class:`~lmkit.core.evaluate.Scoring` fields (the protocol of the card's
    figures). Returns ``{"out", "files", "config", "evaluation"}`` (``evaluation``: the
    ``lmkit eval --json`` object the card states).
    """
    from lmkit.core.evaluate import Scoring, load_target
    from lmkit.core.modelcard import render_card

    source, out = Path(source), Path(out).resolve()
    if not source.exists():
        raise LmkitError(f"{source} does not exist: pass a run directory or a packed artifact")
    check_out(out, force)
    Scoring(**scoring)  # bad options fail before anything is loaded
    run, model, manifest = load_target(source, device)
    if run.export is not None:
        raise LmkitError(f"{source} is already an export; copy the folder instead")
    if out == run.path.resolve():
        raise LmkitError(f"{out} is the run directory itself; export to another folder")
    if log:
        log(f"evaluating {source} for the model card…")
    result = evaluate_source(run, model, manifest, source, **scoring)
    config = export_config(run, source_record(run, source, manifest), scoring.get("data_dir"))
    files = {WEIGHTS_FILE: weights_bytes(model),
             CONFIG_FILE: (jsonfile.dumps(config, indent=2) + "\n").encode(),
             runs.TOKENIZER_FILE: run.tokenizer.path.read_bytes(),
             CARD_FILE: render_card(config, result, out.name).encode()}
    with atomic.staged_dir(out) as tmp:
        for name, blob in files.items():
            atomic.write_bytes(tmp / name, blob)
        if with_val:
            from lmkit.core.data import write_shard

            tokens = run.val_tokens(None, scoring.get("data_dir"))
            write_shard(tmp / runs.VAL_FILE, tokens.numpy())
    names = sorted(p.name for p in out.iterdir())
    if log:
        log(f"wrote {out}: {', '.join(names)}")
    return {"out": str(out), "files": names, "config": config, "evaluation": result}


# -- the Hub -------------------------------------------------------------------------------------
def push_folder(folder: str | Path, repo_id: str, *, private: bool = False,
                token: str | None = None) -> str:
    """Upload an export folder to the Hub model repo ``repo_id`` (created if needed); return
    the URL of the commit. Needs ``huggingface_hub`` (``pip install 'lmkit[hub]'``)."""
    folder = Path(folder)
    read_export_config(folder)  # never upload something that is not a loadable export
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise LmkitError("--push needs huggingface_hub: pip install 'lmkit[hub]' (or "
                         "pip install huggingface_hub), then log in with `hf auth login`"
                         ) from None
    api = HfApi(token=token, library_name="lmkit", library_version=__version__)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"lmkit export ({FORMAT})")
    except Exception as exc:  # noqa: BLE001 - network, auth and Hub errors of many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LmkitError(f"pushing {folder} to {repo_id} failed: {first}") from None
    return str(getattr(commit, "commit_url", commit))
