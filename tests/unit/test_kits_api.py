"""API-contract kit against the fake engine: passes when well-behaved, fails for the right reason."""
from __future__ import annotations

import pytest

from ci.kits import api
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import fake_engine


def test_contract_passes_against_a_well_behaved_engine(capsys):
    with fake_engine() as srv:
        api.check_api_contract(srv)
    out = capsys.readouterr().out
    assert "negative max_tokens" in out and "400" in out  # the table is printed


def test_models_must_list_the_served_model():
    with fake_engine() as srv:
        srv.served_model = "some-other-model"
        with pytest.raises(KitFailure, match="does not list 'some-other-model'"):
            api.check_models(srv)


def test_stream_without_done_fails():
    with fake_engine(stream_done=False) as srv:
        with pytest.raises(KitFailure, match=r"completion stream: ended after \d+ chunks without data: \[DONE\]"):
            api.check_streaming(srv)


def test_stream_with_a_non_json_event_fails():
    with fake_engine(malformed_chunk=True) as srv:
        with pytest.raises(KitFailure, match=r"1 event\(s\) are not JSON, first: '\{not json'"):
            api.check_streaming(srv, chat=True)


def test_usage_that_exceeds_max_tokens_fails():
    with fake_engine(usage_skew=5) as srv:
        with pytest.raises(KitFailure, match=r"completion: usage.completion_tokens 13 > max_tokens 8"):
            api.check_completion(srv)


@pytest.mark.parametrize("usage, cause", [
    ({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 6}, "total_tokens 6 != prompt 3"),
    ({"prompt_tokens": 3, "completion_tokens": -1, "total_tokens": 2}, "completion_tokens is -1"),
    ({"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}, "prompt_tokens is 0"),
    (None, "no usage object"),
])
def test_check_usage_names_the_inconsistency(usage, cause):
    with pytest.raises(KitFailure, match=cause):
        api.check_usage(usage, where="x")


def test_5xx_on_bad_request_fails_naming_each_case(capsys):
    with fake_engine(bad_request_status=500) as srv:
        with pytest.raises(KitFailure) as exc:
            api.check_bad_requests(srv)
    first = str(exc.value).splitlines()[0]
    # The unknown-model case still gets a 404; every other case got a 500.
    assert first.startswith("6 malformed request(s) did not get a 4xx: body is not JSON -> HTTP 500")
    assert "500" in capsys.readouterr().out


def test_2xx_on_bad_request_fails_too():
    with fake_engine() as srv:
        ok_case = api.BadRequest("actually valid", "/v1/completions",
                                 {"model": srv.served_model, "prompt": "hi", "max_tokens": 2})
        with pytest.raises(KitFailure, match="actually valid -> HTTP 200"):
            api.check_bad_requests(srv, [ok_case])


def test_the_unknown_model_case_is_asked_only_of_engines_that_check_the_field():
    names = [c.name for c in api.bad_requests("m")]
    assert "unknown model" in names
    lenient = [c.name for c in api.bad_requests("m", rejects_unknown_model=False)]
    assert lenient == [n for n in names if n != "unknown model"]
