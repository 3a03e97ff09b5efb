"""lmkit: train and honestly compare small language models on one shared trunk.

The public API for plugin authors and scripts (documented in docs/api.md; stable: names are
only ever added): ``hookimpl`` (decorate hook implementations), the protocols and data classes
of :mod:`lmkit.protocols` (``Objective``, ``Batch``, ``LossOutput``, ``EvalContext``,
``TokenSpec``, ``Sampler``, ``SampleContext``, ``SampleResult``, ``Logger``,
``LoggerContext``), ``Metric`` / ``BpbMeter`` /
``ByteLUT`` (what ``EvalContext.meter`` and ``EvalContext.lut`` are), the trunk
(``ModelConfig``, ``Transformer``), ``load_run``, ``LmkitError``, ``Tokenizer``, the shared
masked-diffusion helpers of :mod:`lmkit.core.masking` (``MaskedSpec``, ``masked_spec``,
``training_rows``, ``mask_tokens``, ``masked_nats``, ``evaluate_masked``, …), the samplers'
seeded draws (``make_generator``, ``sample_tokens``) and the contract test kit
:mod:`lmkit.testing`. Heavy modules (torch) load only when a name that needs them is used.
"""

from __future__ import annotations

from typing import Any

from lmkit.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "Batch": "lmkit.protocols",
    "EvalContext": "lmkit.protocols",
    "LossOutput": "lmkit.protocols",
    "Objective": "lmkit.protocols",
    "TokenSpec": "lmkit.protocols",
    "Sampler": "lmkit.protocols",
    "SampleContext": "lmkit.protocols",
    "SampleResult": "lmkit.protocols",
    "Logger": "lmkit.protocols",
    "LoggerContext": "lmkit.protocols",
    "Metric": "lmkit.core.bpb",
    "BpbMeter": "lmkit.core.bpb",
    "ByteLUT": "lmkit.core.bpb",
    "ModelConfig": "lmkit.core.trunk",
    "Transformer": "lmkit.core.trunk",
    "load_run": "lmkit.core.runs",
    "LmkitError": "lmkit.errors",
    "Tokenizer": "lmkit.core.tokenizer",
    # the absorbing-mask machinery every masked objective shares (declare the "masked"
    # capability and expose `spec` to get the masked samplers and estimators)
    "MaskedSpec": "lmkit.core.masking",
    "LogLinearSchedule": "lmkit.core.masking",
    "MaskedEvalOptions": "lmkit.core.masking",
    "masked_spec": "lmkit.core.masking",
    "training_rows": "lmkit.core.masking",
    "document_segments": "lmkit.core.masking",
    "stratified_times": "lmkit.core.masking",
    "mask_tokens": "lmkit.core.masking",
    "masked_nats": "lmkit.core.masking",
    "evaluate_masked": "lmkit.core.masking",
    # seeded float64 draws for samplers
    "make_generator": "lmkit.core.sampling",
    "sample_tokens": "lmkit.core.sampling",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmkit' has no attribute {name!r}")
