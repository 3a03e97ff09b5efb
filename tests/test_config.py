"""One config path: defaults < preset < TOML < flags < --set, and unknown keys are errors."""

from __future__ import annotations

import pytest

from lmkit.core.config import (
    PRESETS,
    RunConfig,
    from_dict,
    resolve_config,
    to_dict,
    to_toml,
)
from lmkit.errors import LmkitError


def test_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[model]\nn_layer = 3\nd_model = 96\n[train]\nseed = 7\n')
    cfg = resolve_config(
        config_file=toml,
        flags={"train.seed": 11, "model.d_model": None},
        sets=["model.d_model=128", "optim.lr=1e-3"],
    )
    assert cfg.preset == "tiny"
    assert cfg.model.n_layer == 3                                   # TOML over preset (2)
    assert cfg.model.d_model == 128                                 # --set over TOML
    assert cfg.train.seed == 11                                     # flag over TOML
    assert cfg.optim.lr == 1e-3                                     # --set over preset
    assert cfg.train.seq_len == PRESETS["tiny"]["train"]["seq_len"]  # preset over default
    assert cfg.model.rope_base == RunConfig().model.rope_base       # default


def test_budget_flag_replaces_preset_budget():
    cfg = resolve_config(preset="tiny", flags={"train.tokens": 5000})
    assert cfg.train.tokens == 5000 and cfg.train.steps == 0
    assert resolve_config(preset="tiny").train.steps == PRESETS["tiny"]["train"]["steps"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sets": ["model.n_layers=3"]}, "unknown config key 'model.n_layers'.*n_layer"),
        ({"sets": ["nosection=1"]}, "unknown config key 'nosection'"),
        ({"sets": ["model.n_layer"]}, "expected key=value"),
        ({"sets": ["model.n_layer=three"]}, "model.n_layer: expected int"),
        ({"sets": ["model.causal=maybe"]}, "model.causal: expected bool"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"sets": ["train.dtype=fp8"]}, "train.dtype"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(LmkitError, match=match):
        resolve_config(**kwargs)


def test_unknown_toml_key(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nstepz = 3\n")
    with pytest.raises(LmkitError, match=r"train.stepz.*c.toml.*steps"):
        resolve_config(config_file=toml)
    toml.write_text("[train\n")
    with pytest.raises(LmkitError, match="not valid TOML"):
        resolve_config(config_file=toml)
    with pytest.raises(LmkitError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.toml")


def test_toml_round_trip(tmp_path):
    cfg = resolve_config(preset="small", sets=["model.causal=false", "options.eps=0.01",
                                               "data.path=/some/where", "train.time=12.5"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = resolve_config(config_file=path)
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
