"""Overrides: dotted keys, literal and scale/add/value forms, clamps, types kept."""

from __future__ import annotations

import pytest

from ftrain import overrides
from ftrain.errors import ConfigError
from ftrain.overrides import OverrideSpec

CONFIG = {"train": {"batch_size": 32, "grad_accum": 1, "amp": True}, "optim": {"lr": 0.003}}


def test_scale_keeps_int_and_clamps():
    spec = OverrideSpec.parse("train.batch_size", {"scale": 0.5, "min": 1})
    assert spec.resolve(32) == 16 and isinstance(spec.resolve(32), int)
    assert spec.resolve(1) == 1
    assert spec.resolve(3) == 2  # rounds half up, stays int


def test_scale_float_add_value_literal():
    assert OverrideSpec.parse("optim.lr", {"scale": 0.5}).resolve(0.003) == pytest.approx(0.0015)
    assert OverrideSpec.parse("x", {"add": 2, "max": 5}).resolve(4) == 5
    assert OverrideSpec.parse("x", {"value": 7}).resolve(3) == 7
    assert OverrideSpec.parse("train.amp", False).resolve(True) is False


def test_resolve_and_apply_accumulate():
    specs = {"train.batch_size": OverrideSpec.parse("train.batch_size", {"scale": 0.5, "min": 1}),
             "train.grad_accum": OverrideSpec.parse("train.grad_accum", {"scale": 2})}
    config = CONFIG
    for expected in [(16, 2), (8, 4), (4, 8)]:
        values = overrides.resolve(specs, config)
        config = overrides.apply(config, values)
        assert (config["train"]["batch_size"], config["train"]["grad_accum"]) == expected
    assert CONFIG["train"]["batch_size"] == 32  # the base is never mutated


def test_missing_key_is_an_error():
    with pytest.raises(ConfigError, match="no such key"):
        overrides.resolve({"train.nope": OverrideSpec.parse("train.nope", 1)}, CONFIG)


@pytest.mark.parametrize("raw, message", [
    ({"scale": "half"}, "must be a number"),
    ({"scale": 0.5, "add": 1}, "both"),
    ({"bogus": 1}, "unknown override field"),
])
def test_bad_spec(raw, message):
    with pytest.raises(ValueError, match=message):
        OverrideSpec.parse("k", raw)


def test_scale_non_number():
    with pytest.raises(ConfigError, match="not a number"):
        OverrideSpec.parse("train.amp", {"scale": 2}).resolve("yes")


def test_parse_set():
    assert overrides.parse_set("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert overrides.parse_set("train.amp=false") == ("train.amp", False)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        overrides.parse_set("optim.lr")


def test_load_config_errors(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: malformed YAML"):
        overrides.load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        overrides.load_config(tmp_path / "missing.yaml")
    scalar = tmp_path / "s.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        overrides.load_config(scalar)
