"""Fault specs: parse, format, reject (DESIGN §1 ``--inject``)."""

from __future__ import annotations

import dataclasses

import pytest

from ftrain.inject import KINDS, Fault, format_inject, parse_inject


def test_parse_the_design_example() -> None:
    assert parse_inject("oom@30,segv@60,nan@90,hang@120") == (
        Fault("oom", 30), Fault("segv", 60), Fault("nan", 90), Fault("hang", 120))


def test_every_kind_of_the_design_is_known() -> None:
    assert set(KINDS) == {"oom", "cuda", "nccl", "segv", "abort", "kill", "nan", "spike", "hang", "exc", "term"}
    spec = ",".join(f"{kind}@{i}" for i, kind in enumerate(KINDS))
    assert [f.kind for f in parse_inject(spec)] == list(KINDS)


def test_format_round_trips_and_keeps_order() -> None:
    faults = (Fault("nan", 90), Fault("oom", 30), Fault("oom", 30))
    assert format_inject(faults) == "nan@90,oom@30,oom@30"
    assert parse_inject(format_inject(faults)) == faults
    assert format_inject([]) == ""


@pytest.mark.parametrize("spec", [None, "", "   "])
def test_empty_spec_is_no_fault(spec: str | None) -> None:
    assert parse_inject(spec) == ()


def test_spaces_and_case_are_forgiven() -> None:
    assert parse_inject(" OOM@30 , nan@ 7") == (Fault("oom", 30), Fault("nan", 7))


@pytest.mark.parametrize("spec, words", [
    ("oom", "not kind@step"),
    ("oom@", "not kind@step"),
    ("@30", "not kind@step"),
    ("oom@30,,nan@4", "empty item"),
    ("boom@30", "unknown fault kind 'boom'"),
    ("oom@-1", "not an integer >= 0"),
    ("oom@3.5", "not an integer >= 0"),
    ("oom@x", "not an integer >= 0"),
    ("oom@²", "not an integer >= 0"),
])
def test_bad_specs_raise_one_clear_line(spec: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_inject(spec)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert repr(spec) in message


def test_fault_is_frozen_and_validated() -> None:
    fault = Fault("oom", 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fault.step = 4  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("boom", 3)
    with pytest.raises(ValueError, match="integer >= 0"):
        Fault("oom", -1)
    with pytest.raises(ValueError, match="integer >= 0"):
        Fault("oom", True)
    assert str(fault) == "oom@3"
