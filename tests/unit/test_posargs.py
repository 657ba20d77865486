"""ci.text.posargs: the one parser of harness flags in a session's posargs."""
from __future__ import annotations

import pytest

from ci.text.posargs import PosargError, take_value


@pytest.mark.parametrize("posargs, value, rest", [
    (["--kiln-model", "m", "tests/e2e"], "m", ["tests/e2e"]),
    (["-x", "--kiln-model=m"], "m", ["-x"]),
    (["tests/e2e"], None, ["tests/e2e"]),
    # After a literal --, everything is pytest's, even a flag of the same name.
    (["-x", "--", "--kiln-model", "m"], None, ["-x", "--", "--kiln-model", "m"]),
])
def test_the_value_comes_out_and_the_rest_stays_in_order(posargs, value, rest):
    assert take_value(posargs, "--kiln-model") == (value, rest)


@pytest.mark.parametrize("posargs, message", [
    (["--kiln-model"], "--kiln-model needs a value a model name"),
    (["--kiln-model", "a", "--kiln-model=b"], "--kiln-model given twice"),
])
def test_a_missing_or_repeated_value_is_one_line(posargs, message):
    with pytest.raises(PosargError, match=f"^{message}$"):
        take_value(posargs, "--kiln-model", hint="a model name")
