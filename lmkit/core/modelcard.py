"""The model card of an export (``README.md``): YAML front matter the Hub reads, then Markdown.

The front matter carries the usual Hub metadata (``library_name``, ``tags``, ``pipeline_tag``,
a ``model-index`` results block) and, under ``lmkit``, the honest figures exactly as
``lmkit eval --json`` gave them (name, kind, value, stderr, tokens, bytes, unit) with the
protocol that produced them. lmkit has no YAML dependency: :func:`to_yaml` writes the small
subset it needs (block mappings and lists, quoted strings, floats that YAML 1.1 and 1.2 parsers
both read back as floats). Torch-free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lmkit.core import jsonfile
from lmkit.core.kinds import format_metric, legend

CARD_METRIC_KEYS = ("name", "kind", "value", "stderr", "tokens", "bytes", "unit")
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# plain words a YAML 1.1 parser (PyYAML) reads as booleans or null
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


# -- YAML ----------------------------------------------------------------------------------------
def _printable(ch: str) -> bool:
    """Characters YAML allows unescaped in a double-quoted scalar that no parser folds or
    strips (NEL, LS, PS and the BOM are escaped)."""
    c = ord(ch)
    return (0x20 <= c <= 0x7E or 0xA0 <= c <= 0xD7FF or 0xE000 <= c <= 0xFFFD
            or 0x10000 <= c <= 0x10FFFF) and c not in (0x2028, 0x2029, 0xFEFF)


def _quote(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif _printable(ch):
            out.append(ch)
        else:
            c = ord(ch)
            out.append(f"\\x{c:02X}" if c < 0x100 else
                       f"\\u{c:04X}" if c < 0x10000 else f"\\U{c:08X}")
    return '"' + "".join(out) + '"'


def _string(text: str) -> str:
    plain = _PLAIN.fullmatch(text) and text.lower() not in _RESERVED
    return text if plain else _quote(text)


def _float(value: float) -> str:
    """``repr``, with a ``.0`` before a bare exponent (``1e-05`` is a string to YAML 1.1)."""
    text = repr(value)
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"
    return text


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _string(str(value))


def _lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{pad}{_string(key)}:")
                out += _lines(item, indent + 2)
            else:
                out.append(f"{pad}{_string(key)}: {_scalar(item)}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                inner = _lines(item, indent + 2)
                out.append(f"{pad}- {inner[0][indent + 2:]}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_scalar(item)}")
    return out


def to_yaml(data: dict[str, Any]) -> str:
    """Block-style YAML of a JSON-like mapping (non-finite floats become null, as in every
    lmkit JSON file: see :func:`lmkit.core.jsonfile.sanitize`)."""
    clean = jsonfile.sanitize(data)
    return "\n".join(_lines(clean, 0)) + "\n" if clean else "{}\n"


# -- the card ------------------------------------------------------------------------------------
def card_metrics(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures of an evaluation as the card states them."""
    return [{k: m.get(k) for k in CARD_METRIC_KEYS} for m in result["metrics"]]


def card_protocol(result: dict[str, Any]) -> dict[str, Any]:
    """What the figures depend on besides the weights: the evaluation protocol, the targets
    scored and the precision and seed actually used."""
    return {**result["protocol"], "val_targets": result["data"]["val_targets"],
            "precision": result["precision"], "seed": result["seed"]}


def eval_command(protocol: dict[str, Any], folder: str = ".") -> str:
    """The ``lmkit eval`` command that repeats the card's protocol on the exported folder."""
    parts = ["lmkit", "eval", folder]
    if protocol.get("max_tokens"):
        parts += ["--max-tokens", str(protocol["max_tokens"])]
    for key, value in (protocol.get("options") or {}).items():
        parts += ["--opt", f"{key}={value}"]
    if protocol.get("dtype"):
        parts += ["--dtype", str(protocol["dtype"])]
    parts += ["--seed", str(protocol["seed"])]
    return " ".join(parts)


def front_matter(config: dict[str, Any], result: dict[str, Any], name: str) -> dict[str, Any]:
    """Hub metadata plus the honest figures (``lmkit.metrics``) and their protocol."""
    objective = config["objective"]
    data = config.get("data") or {}
    dataset = str(data.get("corpus") or "validation")
    metrics = card_metrics(result)
    index_metrics = []
    for m in metrics:
        entry = {"type": m["unit"], "name": f"{m['name']} ({m['kind']}, {m['unit']})",
                 "value": m["value"], "verified": False}
        index_metrics.append(entry)
    return {
        "library_name": "lmkit",
        "tags": ["lmkit", objective, "bits-per-byte"],
        "pipeline_tag": "text-generation",
        "lmkit": {
            "format": config["format"],
            "objective": objective,
            "exported_from": config["exported_from"],
            "metrics": metrics,
            "protocol": card_protocol(result),
            "evaluation": (f"stored lmkit eval result {Path(result['reused_from']).resolve()}"
                           if result.get("reused_from") else "evaluated by lmkit export"),
        },
        "model-index": [{"name": name, "results": [{
            "task": {"type": "text-generation", "name": "Language modelling (bits per byte)"},
            "dataset": {"type": dataset, "name": dataset, "split": "validation"},
            "metrics": index_metrics,
        }]}],
    }


def _cell(value: Any) -> str:
    """Text for a Markdown table cell (a ``|`` would end the cell)."""
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def render_card(config: dict[str, Any], result: dict[str, Any], name: str) -> str:
    """The whole ``README.md``: front matter, then what a reader needs to trust the figures."""
    meta = front_matter(config, result, name)
    protocol = meta["lmkit"]["protocol"]
    trunk = config["model"]["config"]
    source = config["exported_from"]
    what = (f"the packed artifact `{source['artifact']['path']}` (its dequantized weights)"
            if source.get("artifact") else f"the run `{source['run']}`")
    rows = [f"| {_cell(m['name'])} | {m['kind']} | {format_metric(m)} | {m['unit']} | "
            f"{m['tokens']:,} | {m['bytes']:,} | {_cell((m.get('detail') or {}).get('estimator'))}"
            " |" for m in result["metrics"]]
    lines = [
        "---", to_yaml(meta).rstrip("\n"), "---", "",
        f"# {name}", "",
        f"A language model trained with the `{config['objective']}` objective by lmkit "
        f"{config['lmkit_version']}, exported from {what} at step "
        f"{config['checkpoint']['step']:,} ({config['checkpoint']['tokens']:,} training tokens).",
        "",
        "## Evaluation", "",
        "Bits per byte on the validation stream, bytes counted with the tokenizer's exact LUT "
        "over exactly the scored tokens. Each figure states its kind.", "",
        "| metric | kind | value | unit | tokens | bytes | estimator |",
        "|---|---|---|---|---:|---:|---|",
        *rows, "",
        *[f"* {line}" for line in legend(result["metrics"], markdown=True)], "",
        "Protocol: " + ", ".join(f"{k} = `{v}`" for k, v in protocol.items()) + ".", "",
        "Repeat it (validation data: `val.bin` in this folder if present, else the recorded "
        "data directory or `--data DIR`):", "",
        "```bash", eval_command(protocol), "lmkit sample . --num 4", "```", "",
        "## Model", "",
        f"Shared lmkit transformer trunk, {config['model']['params']:,} parameters, "
        f"vocabulary {config['tokens']['vocab_size']:,} ids + special ids "
        f"{config['tokens']['special'] or '{}'}, context {config['seq_len']} tokens. "
        "Files: `model.safetensors` (weights), `config.json` (trunk, objective and its "
        "options, token ids, the full lmkit config), `tokenizer.model` (SentencePiece).", "",
        "| " + " | ".join(trunk) + " |", "|" + "---|" * len(trunk),
        "| " + " | ".join(str(v) for v in trunk.values()) + " |", "",
    ]
    return "\n".join(lines)
