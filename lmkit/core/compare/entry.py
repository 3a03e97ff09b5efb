"""One run in a comparison (:class:`Entry`) and the observer a comparison reports to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lmkit.core.train import NullObserver, TrainObserver


class CompareObserver(TrainObserver, Protocol):
    """Training observer plus the comparison's phases."""

    def on_phase(self, index: int, total: int, objective: str, phase: str,
                 eta_s: float | None) -> None: ...

    def eval_progress(self, done: int, total: int) -> None: ...

    def on_evaluated(self, objective: str, seconds: float, reused: bool) -> None: ...


class NullCompareObserver(NullObserver):
    def on_phase(self, index: int, total: int, objective: str, phase: str,
                 eta_s: float | None) -> None: ...

    def eval_progress(self, done: int, total: int) -> None: ...

    def on_evaluated(self, objective: str, seconds: float, reused: bool) -> None: ...


@dataclass
class Entry:
    """One run in the comparison."""

    objective: str
    run_dir: Path
    params: int
    tokens: int
    train_seconds: float
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # sanity rules the row breaks
    units: dict[str, Any] = field(default_factory=dict, repr=False)  # Monte-Carlo units
    seed: int | None = None  # train.seed: runs of one objective with different seeds are seeds
    config: dict[str, Any] = field(default_factory=dict, repr=False)  # the run's config
    label: str = ""  # the row's name where one objective has several runs (see label_entries)
    # this process's wall clock per phase: ``training`` (the train() call, its validations
    # included, of which ``validation``) and ``evaluation`` (all a run only loaded has)
    spent: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def tok_s(self) -> float | None:
        return self.tokens / self.train_seconds if self.train_seconds else None

    @property
    def name(self) -> str:
        """The row's name in every table: the objective, with its seed where that is needed."""
        return self.label or self.objective

    @property
    def budget(self) -> dict[str, Any] | None:
        """The budgets the run was trained under (None where unset), or None without a config."""
        t = self.config.get("train")
        if not isinstance(t, dict):
            return None
        return {"steps": t.get("steps") or None, "tokens": t.get("tokens") or None,
                "seconds": t.get("time") or None}


def metric_names(entries: list[Entry]) -> list[str]:
    names: list[str] = []
    for e in entries:
        names += [m["name"] for m in e.metrics if m["name"] not in names]
    return names
