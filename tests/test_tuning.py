# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`ops/tuning.py`: the one home of the operator's launch shapes and environment switches."""

from __future__ import annotations

import re

import pytest

from diffusers_sla.ops import tuning

from testing_utils import REPO_ROOT

ENV_NAME = re.compile(r"DIFFUSERS_SLA_[A-Z0-9_]+")


def test_only_tuning_reads_the_operators_environment_switches():
    """Every DIFFUSERS_SLA_* name under diffusers_sla/ops is in tuning.py, and tuning.py names exactly the switches
    the README's "Environment switches" table lists."""
    ops = REPO_ROOT / "diffusers_sla" / "ops"
    elsewhere = {str(path.relative_to(ops)): ENV_NAME.findall(path.read_text())
                 for path in ops.rglob("*.py") if path.name != "tuning.py"}
    assert not {name: found for name, found in elsewhere.items() if found}
    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("### Environment switches", 1)[1].split("\n#", 1)[0]
    listed = set(re.findall(r"^\| `(DIFFUSERS_SLA_[A-Z0-9_]+)` \|", table, re.M))
    assert listed == set(ENV_NAME.findall((ops / "tuning.py").read_text()))


def test_kernel_switch_names_the_variable_and_its_values(monkeypatch):
    monkeypatch.delenv("DIFFUSERS_SLA_FWD_KERNEL", raising=False)
    assert tuning.kernel_switch("forward") == "auto"
    monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", "portable")
    assert tuning.kernel_switch("backward") == "portable"
    monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", "gluon")
    with pytest.raises(ValueError, match=r"DIFFUSERS_SLA_BWD_KERNEL='gluon': allowed values are \('auto', 'portable', "
                                         r"'hopper'\)"):
        tuning.kernel_switch("backward")


def test_retired_switches_are_named_when_set():
    assert tuning.retired_switches_set({"DIFFUSERS_SLA_OVERLAP": "0", "DIFFUSERS_SLA_FWD_KERNEL": "auto"}) == \
        ["DIFFUSERS_SLA_OVERLAP"]
    assert tuning.retired_switches_set({}) == []
    assert not set(tuning.RETIRED_SWITCHES) & (set(tuning.KERNEL_ENV.values()) | {tuning.FP32_COMPUTE_ENV})
