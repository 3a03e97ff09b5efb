"""Fuzz every reader of user files: each input loads or raises LmkitError, never anything else.

``python -m lmkit.core.bench.fuzz --examples 10000`` runs each reader (token shards, artifacts,
run files, an export's ``config.json``, config/``--set``, corpus ``.jsonl``) over generated and
mutated inputs and prints, per reader: inputs, tracebacks (exceptions other than LmkitError),
hangs (over the per-input timeout) and the process's peak RSS after it. The same readers and
mutators back the hypothesis properties in tests/test_properties.py.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmkit.core.memory import peak_rss_bytes
from lmkit.errors import LmkitError

# -- mutators ----------------------------------------------------------------------------------
INTERESTING = [b"", b"\x00", b"\xff", b"\xff\xfe", b"NaN", b"Infinity", b"-1", b"1e400", b"[" * 64,
               b"{" * 64, b'"\\ud800"', b"9" * 400, b"null", b"true", b"[]", b"{}", b"\n", b'"']


def mutate(data: bytes, rng: random.Random, rounds: int | None = None) -> bytes:
    """A few random byte-level edits: flips, inserts, deletes, splices, truncation."""
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(buf)) if buf else 0
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = rng.choice(INTERESTING)
        elif op == 2 and buf:
            del buf[pos:pos + rng.randint(1, 16)]
        elif op == 3:
            buf = buf[:pos]
        elif op == 4 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(buf)


JSON_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**70, 1.5, float("nan"), float("inf"),
                          "", "x", "\ud800", [], {}, [1], {"a": 1}, "a\nb", 1e308]


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """``obj`` with one key dropped, retyped or replaced deep inside (structure-aware)."""
    obj = json.loads(json.dumps(obj))
    path: list[Any] = []
    node = obj
    while isinstance(node, (dict, list)) and node and rng.random() < 0.7:
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(key)
        node = node[key]
    if not path:
        return rng.choice(JSON_VALUES)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and rng.random() < 0.3:
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(JSON_VALUES)
    return obj


def json_bytes(obj: Any, rng: random.Random) -> bytes:
    """Structure-aware half the time, byte-level otherwise."""
    if rng.random() < 0.5:
        return json.dumps(mutate_json(obj, rng)).encode("utf-8", "surrogatepass")
    return mutate(json.dumps(obj).encode(), rng)


# -- seeds: small valid files of each kind ----------------------------------------------------
def seed_shard() -> bytes:
    import numpy as np

    from lmkit.core.data.shards import HEADER_INTS, SHARD_MAGIC, SHARD_VERSION

    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, 16)
    return header.tobytes() + np.arange(16, dtype="<u2").tobytes()


def seed_artifact() -> bytes:
    import torch

    from lmkit.core.artifact import encode_artifact, serialize
    from lmkit.core.quant import quantize_model
    from lmkit.core.trunk import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, d_model=16, n_head=2, n_kv_head=1, cond_dim=4,
                                    unet_skips=False), 32)
    meta = {"model": {"config": asdict(model.cfg), "vocab_size": 32, "n_special": 0}}
    return encode_artifact(serialize(quantize_model(model, bits=8, method="rtn"), meta), "zlib")


def seed_run_meta() -> dict[str, Any]:
    from lmkit.core.config import resolve_config, to_dict

    cfg = resolve_config(preset="tiny")
    return {"format": "lmkit-run/1", "objective": "ar", "config": to_dict(cfg),
            "model": {"config": asdict(cfg.model), "params": 1000, "padded_vocab": 1024},
            "tokens": {"vocab_size": 1024, "bos_id": 1, "special": {}},
            "data": {"dir": "/nonexistent", "tokenizer": {"sha256": "0" * 64}, "tokens": {}}}


def seed_state() -> dict[str, Any]:
    return {"format": "lmkit-checkpoint/1", "step": 2, "tokens": 512, "seconds": 1.5,
            "loader": {}, "optimizers": []}


def seed_export_config() -> dict[str, Any]:
    """An export's config.json (lmkit.core.export) around :func:`seed_run_meta`'s records."""
    meta = seed_run_meta()
    return {"format": "lmkit-export/1", "library_name": "lmkit", "lmkit_version": "0.1.0",
            "objective": meta["objective"], "objective_options": meta["config"]["options"],
            "seq_len": meta["config"]["train"]["seq_len"], "vocab_size": 1024,
            "model": meta["model"],
            "tokens": meta["tokens"], "checkpoint": {"step": 2, "tokens": 512, "seconds": 1.5},
            "config": meta["config"], "data": meta["data"],
            "exported_from": {"run": "/nonexistent", "artifact": None}}


SEED_METRICS = (b'{"type": "train", "step": 1, "loss": 6.9}\n'
                b'{"type": "val", "step": 2, "metrics": [{"name": "nll", "value": 3.1}]}\n')
SEED_TOML = b'preset = "tiny"\n[model]\nn_layer = 2\n[train]\nsteps = 3\nseed = 7\n'
SEED_JSONL = b'{"text": "hello world"}\n{"text": "second doc"}\n'


# -- readers: each takes bytes (or a --set item) and a scratch directory ------------------------
def mutate_artifact(data: bytes, rng: random.Random) -> bytes:
    """Byte edits of the file, or (two thirds of the time) a valid checksum over an edited
    manifest or edited array bytes: the edits that reach past the sha256 check."""
    from lmkit.core.artifact import MANIFEST_LEN, decode_artifact, encode_artifact

    r = rng.random()
    if r < 1 / 3:
        return mutate(data, rng)
    payload = decode_artifact(data, "seed")
    (n,) = MANIFEST_LEN.unpack_from(payload)
    manifest, blob = json.loads(payload[4:4 + n]), payload[4 + n:]
    if r < 2 / 3:
        raw = json.dumps(mutate_json(manifest, rng)).encode("utf-8", "surrogatepass")
    else:
        raw, blob = payload[4:4 + n], mutate(blob, rng, rounds=1)
    if rng.random() < 0.1:
        raw = mutate(raw, rng)
    return encode_artifact(MANIFEST_LEN.pack(len(raw)) + raw + blob, "zlib")


def read_shard(data: bytes, tmp: Path) -> None:
    from lmkit.core.data.shards import load_shard, load_stream, read_shard_header

    path = tmp / "x_val_000.bin"
    path.write_bytes(data)
    read_shard_header(path)
    load_shard(path)
    load_stream([path], vocab_size=1024)


def read_artifact_file(data: bytes, tmp: Path) -> None:
    from lmkit.core.artifact import load_artifact

    path = tmp / "a.int8"
    path.write_bytes(data)
    load_artifact(path)


def read_run_files(data: bytes, tmp: Path, which: str = "run.json") -> None:
    from lmkit.core import config as config_mod
    from lmkit.core import runs

    run = tmp / "run"
    (run / "checkpoint").mkdir(parents=True, exist_ok=True)
    target = {"run.json": run / "run.json", "state.json": run / "checkpoint" / "state.json",
              "metrics.jsonl": run / "metrics.jsonl"}[which]
    target.write_bytes(data)
    if which == "run.json":
        meta = runs.read_run_meta(run)
        config_mod.from_dict(meta["config"])
        config_mod.model_config_from_dict(meta["model"]["config"])
    elif which == "state.json":
        runs.read_run_state(run)
    else:
        runs.read_metrics(run)


def read_export_files(data: bytes, tmp: Path) -> None:
    from lmkit.core import config as config_mod
    from lmkit.core.export import CONFIG_FILE, read_export_config

    folder = tmp / "export"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_FILE).write_bytes(data)
    config = read_export_config(folder)
    config_mod.from_dict(config["config"])
    config_mod.model_config_from_dict(config["model"]["config"])


def read_config(data: bytes, tmp: Path) -> None:
    from lmkit.core.config import resolve_config

    path = tmp / "c.toml"
    path.write_bytes(data)
    resolve_config(config_file=path)


SET_KEYS = ["model.n_layer", "model.d_model", "model.n_head", "model.mlp_mult", "optim.lr",
            "optim.beta1", "train.steps", "train.time", "train.seed", "train.device",
            "train.log_every", "model.embed_init_std", "data.path", "model.causal", "nope",
            "options.x", "train.batch_tokens", "model.rope_base", "objective"]
SET_VALUES = ["0", "-1", "1", "2.5e0", "1e400", "nan", "inf", "-inf", "2**70",
              "1180591620717411303424", "meta", "cuda:99", "true", "maybe", "", "1.5M",
              "1_000", "1__0", "a\nb", "\x00",
              "4", "64", "0.5", "1e-3", "9" * 5000]


def set_item(rng: random.Random) -> str:
    key = rng.choice(SET_KEYS)
    value = rng.choice(SET_VALUES)
    if rng.random() < 0.3:
        value = mutate(value.encode(), rng).decode("utf-8", "replace")
    return f"{key}={value}" if rng.random() < 0.95 else key


def read_set(items: list[str]) -> None:
    from lmkit.core.config import resolve_config

    resolve_config(preset="tiny", sets=items)


def read_corpus(data: bytes, tmp: Path) -> None:
    from lmkit.core.data.corpus import corpus_from_path

    path = tmp / "c.jsonl"
    path.write_bytes(data)
    for _ in corpus_from_path(path).documents():
        pass


# -- the fuzz loop ---------------------------------------------------------------------------
class Hang(Exception):
    """The per-input timeout fired."""


def _alarm(*_: Any) -> None:
    raise Hang


def cases(seed: int = 0) -> dict[str, Callable[[random.Random, Path], None]]:
    """Reader name -> one fuzz case (generate an input from ``rng`` and read it)."""
    shard, art = seed_shard(), seed_artifact()
    meta, state, exported = seed_run_meta(), seed_state(), seed_export_config()
    return {
        "shards": lambda rng, tmp: read_shard(mutate(shard, rng), tmp),
        "artifact": lambda rng, tmp: read_artifact_file(mutate_artifact(art, rng), tmp),
        "run.json": lambda rng, tmp: read_run_files(json_bytes(meta, rng), tmp, "run.json"),
        "state.json": lambda rng, tmp: read_run_files(json_bytes(state, rng), tmp, "state.json"),
        "metrics.jsonl": lambda rng, tmp: read_run_files(mutate(SEED_METRICS, rng), tmp,
                                                         "metrics.jsonl"),
        "export config.json": lambda rng, tmp: read_export_files(json_bytes(exported, rng), tmp),
        "config.toml": lambda rng, tmp: read_config(mutate(SEED_TOML, rng), tmp),
        "--set": lambda rng, tmp: read_set([set_item(rng) for _ in range(rng.randint(1, 3))]),
        "corpus.jsonl": lambda rng, tmp: read_corpus(mutate(SEED_JSONL, rng), tmp),
    }


def fuzz(examples: int, timeout: float = 5.0, seed: int = 0, only: list[str] | None = None,
         log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every reader over ``examples`` inputs; one row of counts per reader."""
    import warnings

    warnings.simplefilter("ignore")
    rows = []
    signal.signal(signal.SIGALRM, _alarm)
    for name, case in cases(seed).items():
        if only and name not in only:
            continue
        rng = random.Random(f"{seed}-{name}")
        tracebacks, hangs, first = 0, 0, None
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(examples):
                signal.setitimer(signal.ITIMER_REAL, timeout)
                try:
                    case(rng, Path(tmp))
                except LmkitError:
                    pass
                except Hang:
                    hangs += 1
                except Exception:  # noqa: BLE001 - counting them is the point
                    tracebacks += 1
                    first = first or "".join(traceback.format_exc().splitlines(True)[-8:])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        peak = peak_rss_bytes()  # never None here: setitimer (the timeouts) means Unix
        row = {"reader": name, "inputs": examples, "tracebacks": tracebacks, "hangs": hangs,
               "peak_rss_mb": round(peak / (1 << 20), 1),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        log(f"{name:14s} inputs {examples:>7,}  tracebacks {tracebacks:>4}  hangs {hangs:>3}  "
            f"peak RSS {row['peak_rss_mb']:8.1f} MB  ({row['seconds']} s)")
        if first:
            log("  first traceback:\n" + first)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="inputs per reader")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per input (a hang)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", help="run only this reader (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args(argv)
    rows = fuzz(args.examples, args.timeout, args.seed, args.only)
    if args.json:
        from lmkit.core.jsonfile import dumps

        print(dumps(rows))
    return 1 if any(r["tracebacks"] or r["hangs"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
