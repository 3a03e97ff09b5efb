"""Issue 14, defect 7: every config key is checked for type, range and finiteness in one place,
on every resolved config; errors name the key and the bad value (never a traceback)."""

from __future__ import annotations

import tomllib

import pytest

from lmkit.core.config import PRESETS, from_dict, resolve_config, to_dict, to_toml
from lmkit.core.units import parse_count
from lmkit.errors import LmkitError


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_passes_the_value_checks(preset):
    resolve_config(preset=preset)


@pytest.mark.parametrize("item, needle", [
    ("train.steps=1e400", "train.steps"),
    ("model.n_head=0", "model.n_head=0"),
    ("train.log_every=0", "train.log_every=0"),
    ("optim.beta1=2", "optim.beta1=2"),
    ("optim.beta2=1", "optim.beta2=1"),
    ("model.embed_init_std=-1", "model.embed_init_std=-1"),
    ("model.mlp_mult=nan", "model.mlp_mult=nan"),
    ("model.rope_base=inf", "model.rope_base=inf"),
    ("train.seed=1180591620717411303424", "train.seed=1180591620717411303424"),  # 2**70
    ("train.device=meta", "train.device='meta'"),
    ("train.time=nan", "train.time=nan"),
    ("train.time=-1", "train.time"),
    ("train.steps=2.5e0", "train.steps"),
    ("optim.lr=-0.001", "optim.lr=-0.001"),
    ("optim.lr=0", "optim.lr=0"),
    ("train.warmdown_frac=1.5", "train.warmdown_frac"),
    ("model.d_model=66", "model.n_head"),        # 66 does not divide by 4 heads
    ("model.n_kv_head=3", "model.n_kv_head=3"),
    ("model.n_layer=100000", "model.n_layer=100000"),
    ("model.d_model=65536", "model.d_model=65536"),
    ("data.path=a\nb", "data.path"),
    ("optim.name=sgd", "optim.name"),
])
def test_bad_values_are_one_error_naming_the_key(item, needle):
    with pytest.raises(LmkitError) as info:
        resolve_config(preset="tiny", sets=[item])
    assert needle in str(info.value)
    assert "\n" not in str(info.value).replace("a\nb", "")


def test_bad_flags_are_checked_like_sets():
    for flags in ({"train.time": float("nan")}, {"train.seed": 2**70}, {"train.device": "meta"},
                  {"train.steps": -3}):
        with pytest.raises(LmkitError):
            resolve_config(preset="tiny", flags=flags)


def test_a_huge_model_is_refused_before_anything_is_built():
    with pytest.raises(LmkitError, match="parameters"):
        resolve_config(preset="tiny", sets=["model.d_model=16384", "model.n_layer=200",
                                            "model.n_head=64", "model.n_kv_head=64"])


@pytest.mark.parametrize("text", ["2.5e0", "1.00000000000000001", "2.9999999999999999",
                                  "9" * 5000, "1e99999999999"])
def test_counts_are_never_rounded(text):
    with pytest.raises(ValueError):
        parse_count(text)


def test_non_utf8_and_deep_toml_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"[train]\nsteps = 3 # \xff\xfe\n")
    with pytest.raises(LmkitError, match="not UTF-8"):
        resolve_config(config_file=bad)
    bad.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(LmkitError, match="bad.toml"):
        resolve_config(config_file=bad)
    bad.write_text("[train]\nsteps = 1e400\n")
    with pytest.raises(LmkitError, match="train.steps"):
        resolve_config(config_file=bad)
    bad.write_text("[model]\nn_layer = true\n")
    with pytest.raises(LmkitError, match="model.n_layer"):
        resolve_config(config_file=bad)
    bad.write_text("[train]\nseed = 2.5\n")
    with pytest.raises(LmkitError, match="train.seed"):
        resolve_config(config_file=bad)


def test_a_data_path_with_a_newline_round_trips_through_config_toml(tmp_path):
    """Defect 11: to_toml escapes control characters (the value checks refuse such a path for
    training; a stored config with one must still be valid TOML)."""
    cfg = resolve_config(preset="tiny")
    cfg.data.path = 'a\nb"c\\d\x01\x7f'
    cfg.options['key with "quotes"\n'] = "x\ny"
    text = to_toml(cfg)
    back = tomllib.loads(text)
    assert back["data"]["path"] == cfg.data.path
    assert back["options"]['key with "quotes"\n'] == "x\ny"


def test_a_damaged_stored_config_is_a_clear_error():
    good = to_dict(resolve_config(preset="tiny"))
    for damage in ({**good, "objective": 3}, {**good, "model": []},
                   {**good, "train": {**good["train"], "lr": 1}},
                   {**good, "optim": {**good["optim"], "lr": float("nan")}}, []):
        with pytest.raises(LmkitError):
            from_dict(damage)  # type: ignore[arg-type]
