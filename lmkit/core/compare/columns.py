"""The comparison's metric columns: one per (metric name, context protocol).

Two figures under one name but different context protocols (a run scored with document-isolated
rows beside one scored with contiguous windows, or an old evaluation that stated none) are not
the same quantity, so they never share a column: the name is split, each column says its
protocol, and the report says why. The reproduced seed figures (a metric whose detail names
``figure_of`` and ``beside``) get their own section beside the honest metric they stand for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmkit.core.compare.entry import Entry
from lmkit.core.contexts import protocol_legend, protocol_of
from lmkit.core.kinds import format_metric


@dataclass(frozen=True)
class Column:
    """One metric column: its name, protocol and unit; ``split`` when the name also appears
    under another protocol (then ``key`` carries the protocol too)."""

    name: str
    protocol: str
    unit: str
    split: bool = False

    @property
    def key(self) -> str:
        return f"{self.name}[{self.protocol}]" if self.split else self.name

    @property
    def header(self) -> str:
        return f"{self.name} ({self.unit}; {self.protocol})"

    def pick(self, e: Entry) -> dict[str, Any] | None:
        return next((m for m in e.metrics if m["name"] == self.name
                     and protocol_of(m) == self.protocol), None)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "metric": self.name, "protocol": self.protocol,
                "unit": self.unit, "split": self.split}


def metric_columns(entries: list[Entry]) -> list[Column]:
    """Every (name, protocol) present, in the order first seen."""
    seen: dict[tuple[str, str], str] = {}
    for e in entries:
        for m in e.metrics:
            seen.setdefault((m["name"], protocol_of(m)), m["unit"])
    names = [n for n, _ in seen]
    return [Column(n, p, unit, names.count(n) > 1) for (n, p), unit in seen.items()]


def protocol_conflicts(entries: list[Entry]) -> list[dict[str, Any]]:
    """The metric names scored under more than one protocol, with the runs of each."""
    out = []
    cols = metric_columns(entries)
    for name in dict.fromkeys(c.name for c in cols if c.split):
        out.append({"metric": name, "protocols": {
            c.protocol: [e.name for e in entries if c.pick(e) is not None]
            for c in cols if c.name == name}})
    return out


def protocol_lines(entries: list[Entry], markdown: bool = False) -> list[str]:
    """The legend of the protocols present, and a line per name split across protocols."""
    cols = metric_columns(entries)
    lines = [f"context protocol {line}" for line in
             protocol_legend([c.protocol for c in cols], markdown)]
    for c in protocol_conflicts(entries):
        parts = "; ".join(f"{p} in {', '.join(runs)}" for p, runs in c["protocols"].items())
        name = f"`{c['metric']}`" if markdown else c["metric"]
        lines.append(f"{name} was scored under different context protocols ({parts}): kept in "
                     "separate columns, not comparable across them")
    return lines


def seed_figure_rows(entries: list[Entry]) -> list[dict[str, Any]]:
    """Each reproduced figure (detail ``figure_of`` and ``beside``) with the run's honest metric
    it stands beside (same protocol), for "what they would have printed"."""
    rows = []
    for e in entries:
        for m in e.metrics:
            d = m.get("detail") or {}
            if not d.get("figure_of") or not d.get("beside"):
                continue
            honest = next((x for x in e.metrics if x["name"] == d["beside"]
                           and protocol_of(x) == protocol_of(m)), None)
            rows.append({"run": e.name, "metric": m["name"], "figure_of": d["figure_of"],
                         "reported_as": d.get("reported_as"), "value": m["value"],
                         "kind": m["kind"], "protocol": protocol_of(m), "beside": d["beside"],
                         "honest": honest, "note": d.get("note")})
    return rows


def seed_figure_lines(entries: list[Entry]) -> list[str]:
    """Markdown: what each seed submission would have printed, beside the honest bound."""
    rows = seed_figure_rows(entries)
    if not rows:
        return []
    lines = ["", "## What the seeds would have printed", "",
             "| run | figure | reproduces | they would have printed | honest figure beside it "
             "| why it is not a bpb |", "|---|---|---|---|---|---|"]
    for r in rows:
        honest = (f"{r['beside']} {format_metric(r['honest'], unit=True)}" if r["honest"]
                  else f"{r['beside']} (not computed)")
        shown = format_metric({"kind": r["kind"], "value": r["value"], "stderr": None})
        reported = f" \"{r['reported_as']}\"" if r["reported_as"] else ""
        lines.append(f"| {r['run']} | {r['metric']} | {r['figure_of']}{reported} | {shown} | "
                     f"{honest} | {r['note'] or ''} |")
    lines += ["", "* Each figure is recomputed on this run's model and tokens by the "
              "submission's own method; it is a score (`kind: score`), shown only beside the "
              "honest figure it was mistaken for."]
    return lines
