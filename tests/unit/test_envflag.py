"""Yes/no environment variables (ci/text/envflag.py): ``CI=false`` is false, ``CI=maybe`` an error."""
from __future__ import annotations

import pytest

from ci.text import envflag


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "Yes", "on", "ON", " true\n"])
def test_yes_words_are_true_in_any_case(value):
    assert envflag.parse("CI", value) is True


@pytest.mark.parametrize("value", [None, "", "  ", "0", "false", "FALSE", "no", "No", "off", "Off"])
def test_no_words_empty_and_unset_are_false(value):
    assert envflag.parse("CI", value) is False


@pytest.mark.parametrize("value", ["maybe", "ture", "2", "-1", "y", "enabled"])
def test_anything_else_is_one_line_naming_the_variable_and_value(value):
    with pytest.raises(envflag.FlagError) as exc:
        envflag.parse("CI", value)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"CI={value!r} is neither yes nor no: use one of 1/true/yes/on or 0/false/no/off")


def test_env_flag_reads_the_given_environment_or_the_process_one(monkeypatch):
    assert envflag.env_flag("KILN_X", {"KILN_X": "on"}) is True
    assert envflag.env_flag("KILN_X", {}) is False
    monkeypatch.setenv("CI", "false")
    assert envflag.in_ci() is False  # os.environ.get("CI") would have said yes
    monkeypatch.setenv("CI", "true")
    assert envflag.in_ci() is True
    monkeypatch.delenv("CI")
    assert envflag.in_ci() is False
    monkeypatch.setenv("CI", "sometimes")
    with pytest.raises(envflag.FlagError, match=r"^CI='sometimes' is neither yes nor no"):
        envflag.in_ci()
