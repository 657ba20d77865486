"""API-semantics kit against the fake engine: each check passes on a well-behaved engine and
fails, naming the cause, on an engine broken in the way the check exists to catch."""
from __future__ import annotations

import pytest

from ci.kits import api_semantics as sem
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import FAKE_VLLM_LIKE, fake_engine

# The fake prompt is ~15 words: a small context keeps the over-long prompt small.
SMALL_CONTEXT = 64


def test_every_check_passes_against_a_well_behaved_engine(capsys):
    with fake_engine(max_model_len=SMALL_CONTEXT, stream_delay_s=0.005) as srv:
        sem.check_stream_matches_plain(srv)
        sem.check_stream_matches_plain(srv, chat=True)
        sem.check_stream_abort_recovers(srv, max_tokens=200)
        sem.check_context_limit(srv)
        sem.check_n_choices(srv)
        sem.check_stop_string(srv)
        sem.check_seed_reproducible(srv)
        sem.check_logprobs(srv)
        assert sem.check_structured_output(srv) == {"name": "fake", "count": sem.SCHEMA_TOKENS}
    out = capsys.readouterr().out
    assert "engine idle again after" in out and "limit 64: HTTP 400" in out


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_stream_that_decodes_differently_from_plain_fails(chat):
    with fake_engine(stream_differs=True) as srv:
        with pytest.raises(KitFailure, match=r"streamed text differs from the non-streamed text "
                                             r"at character \d+"):
            sem.check_stream_matches_plain(srv, chat=chat)


def test_dropped_stream_that_keeps_its_slot_fails_after_the_deadline():
    with fake_engine(backend=FAKE_VLLM_LIKE, stream_delay_s=0.005, leak_aborted=True) as srv:
        with pytest.raises(KitFailure, match=r"^gauges not back to 0 1 s after an aborted "
                                             r"stream: fake:num_requests_running=1"):
            sem.check_stream_abort_recovers(srv, max_tokens=500, deadline_s=1.0)


@pytest.mark.parametrize("knobs, cause", [
    ({"overlong_status": 500}, r"over-long prompt -> HTTP 500, expected 400"),
    ({"overlong_names_limit": False}, r"over-long prompt: the 400 does not name the limit 64"),
])
def test_over_long_prompt_must_get_a_400_naming_the_limit(knobs, cause):
    with fake_engine(max_model_len=SMALL_CONTEXT, **knobs) as srv:
        with pytest.raises(KitFailure, match=cause):
            sem.check_context_limit(srv)


@pytest.mark.parametrize(("knobs", "check", "cause"), [
    ({"ignore_n": True}, sem.check_n_choices, r"^n=3: choice indices \[0\], expected \[0, 1, 2\]"),
    ({"ignore_stop": True}, sem.check_stop_string,
     r"^stop=' ?t\d+': text .* finish_reason 'length'; expected .* and 'stop'"),
    ({"deterministic": False}, sem.check_seed_reproducible, r"^seed=1234 sampled different texts"),
    ({"diverge_at": 0}, sem.check_logprobs,
     r"^logprobs: greedy token 0 ' t\d+' \(-3.0000\) is not the best of its top list"),
    ({"structured_output": False}, sem.check_structured_output,
     r"^response_format json_schema gave text that is not JSON"),
    # JSON of the right shape whose string is over the schema's maxLength: the
    # hand-written check this replaced looked at types only and passed it.
    ({"json_name": "a-name-well-over-twelve"}, sem.check_structured_output,
     r"^response_format json_schema: the JSON does not match: \$\.name: 'a-name-well-over-twelve' is "
     r"too long$"),
], ids=["n-ignored", "stop-ignored", "seed-ignored", "greedy-not-best", "schema-ignored",
        "string-over-maxLength"])
def test_an_engine_that_breaks_the_parameter_fails_naming_it(knobs, check, cause):
    with fake_engine(**knobs) as srv:
        with pytest.raises(KitFailure, match=cause):
            check(srv)


def test_schema_problems_are_named_by_location():
    schema = sem.default_schema()
    assert sem.schema_problems({"name": "x", "count": True, "extra": 1}, schema) == [
        "$: Additional properties are not allowed ('extra' was unexpected)",
        "$.count: True is not of type 'integer'"]
    assert sem.schema_problems([], schema) == ["$: [] is not of type 'object'"]
    assert sem.schema_problems({"count": 1}, schema) == ["$: 'name' is a required property"]
    assert sem.schema_problems({"name": "x" * 13, "count": 1}, schema) == [f"$.name: '{'x' * 13}' is too long"]
    assert sem.schema_problems({"name": "x" * 12, "count": 1}, schema) == []
    nested = {"type": "array", "items": {"type": "string", "maxLength": 2}}
    assert sem.schema_problems(["ok", "long"], nested) == ["$[1]: 'long' is too long"]


def test_a_schema_that_is_not_valid_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^not a valid JSON schema: 'strin' is not valid under any of "):
        sem.schema_problems({}, {"type": "strin"})


def test_the_default_schema_is_a_fresh_dict_each_time():
    first = sem.default_schema()
    first["properties"]["name"]["maxLength"] = 1000  # a caller's change stays its own
    assert sem.default_schema()["properties"]["name"]["maxLength"] == sem.SCHEMA_NAME_MAX
    with fake_engine(json_name="a-name-well-over-twelve") as srv:
        assert sem.check_structured_output(srv, schema=first)["name"] == "a-name-well-over-twelve"
        with pytest.raises(KitFailure, match="is too long"):
            sem.check_structured_output(srv)


class _Probe:
    engine, version = "vllm", "0.32.0"

    def __init__(self, flags):
        self._flags = set(flags)

    def has(self, flag):
        return flag in self._flags


def test_structured_output_probe_gives_a_reason_only_when_unsupported():
    assert sem.structured_output_unsupported(_Probe({"--structured-outputs-config"})) is None
    reason = sem.structured_output_unsupported(_Probe({"--port"}))
    assert reason.startswith("vllm 0.32.0: --help has none of --structured-outputs-config")
