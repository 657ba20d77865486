"""Accuracy-floor kit: the dataset, the ending alignment, and pass/fail against the fake."""
from __future__ import annotations

import collections
import json
import math

import pytest

from ci.kits import accuracy
from ci.kits.client import KitFailure
from tests.fakes.openai_engine import fake_engine


def test_shipped_dataset_is_balanced_and_well_formed():
    items = accuracy.load_dataset()
    assert 40 <= len(items) <= 100
    assert len({it.id for it in items}) == len(items)
    counts = collections.Counter(it.label for it in items)
    # Balanced gold positions: always-pick-position-k scores exactly chance.
    assert set(counts.values()) == {len(items) // accuracy.N_ENDINGS}


@pytest.mark.parametrize("row, cause", [
    ('{"id": 1, "context": "c", "endings": ["a", "b", "c"], "label": 0}', "needs 4 non-empty endings"),
    ('{"id": 1, "context": "c", "endings": ["a", "b", "c", "d"], "label": 4}', "label 4 is not 0..3"),
    ('{"id": 1, "endings": ["a", "b", "c", "d"], "label": 0}', "not an item with id/context"),
    ("not json", "not an item"),
])
def test_bad_dataset_line_names_file_and_line(tmp_path, row, cause):
    path = tmp_path / "set.jsonl"
    good = json.dumps({"id": "x", "context": "c", "endings": list("abcd"), "label": 1})
    path.write_text(good + "\n" + row + "\n")
    with pytest.raises(ValueError, match=f"set.jsonl:2: {cause}"):
        accuracy.load_dataset(path)


def test_ending_alignment_counts_from_the_end_so_a_bos_token_does_not_shift_it():
    # "<s>" is echoed as a token but is not in the prompt text.
    logprobs = {"tokens": ["<s>", "The", " cat", " sat", " down", "."],
                "token_logprobs": [None, -1.0, -2.0, -3.0, -4.0, -5.0]}
    assert accuracy.ending_logprob(logprobs, "sat down.", "", "x") == -12.0
    # A generated token after the prompt is excluded too.
    logprobs = {"tokens": ["<s>", "The", " cat", " sat", " zz"],
                "token_logprobs": [None, -1.0, -2.0, -3.0, -7.0]}
    assert accuracy.ending_logprob(logprobs, "sat", " zz", "x") == -3.0


def test_ending_token_without_a_logprob_fails():
    logprobs = {"tokens": ["a", " b"], "token_logprobs": [None, None]}
    with pytest.raises(KitFailure, match="no log-probability for ending token ' b'"):
        accuracy.ending_logprob(logprobs, "b", "", "item 7")


def test_floor_below_the_models_score_passes(capsys):
    with fake_engine(mc_skill=0.5) as srv:
        result = accuracy.check_accuracy_floor(srv, floor=0.4)
    assert result.acc_norm == pytest.approx(0.5) and result.n == 60
    assert "60 items of mc_tiny.jsonl: acc 0.500, acc_norm 0.500" in capsys.readouterr().out


def test_floor_above_the_models_score_fails():
    with fake_engine(mc_skill=0.5) as srv:
        with pytest.raises(KitFailure, match=r"^accuracy acc_norm 0.500 < floor 0.6 over 60 items "
                                             r"of mc_tiny.jsonl"):
            accuracy.check_accuracy_floor(srv, floor=0.6)


def test_nan_logprobs_fail_naming_the_item():
    with fake_engine(mc_skill=0.5, prompt_logprob=math.nan) as srv:
        with pytest.raises(KitFailure, match=r"^item mc-000 ending 0: no log-probability"):
            accuracy.check_accuracy_floor(srv, floor=0.1, limit=4)


def test_uninformative_logprobs_fail_even_above_a_chance_floor():
    # An engine answering 0.0 for every token: all endings tie, and "pick the
    # first" would score chance on balanced data -- above a chance-level floor.
    with fake_engine(prompt_logprob=0.0) as srv:
        with pytest.raises(KitFailure, match=r"^8/8 items have tied best endings: the engine's logprobs carry no information"):
            accuracy.check_accuracy_floor(srv, floor=0.0, limit=8)


def test_unknown_metric_is_rejected():
    with pytest.raises(ValueError, match="unknown accuracy metric 'f1'"):
        accuracy.check_accuracy_floor(object(), floor=0.1, metric="f1")


def test_the_figures_reach_the_job_summary_pass_or_fail(tmp_path):
    summary = tmp_path / "step_summary.md"
    with fake_engine(mc_skill=0.5) as srv:
        accuracy.check_accuracy_floor(srv, floor=0.4, summary_path=summary)
        with pytest.raises(KitFailure):
            accuracy.check_accuracy_floor(srv, floor=0.6, summary_path=summary)
    text = summary.read_text()
    assert "### accuracy (fake-model): pass" in text and "### accuracy (fake-model): FAIL" in text
    assert "60 items of mc_tiny.jsonl: acc 0.500, acc_norm 0.500" in text


def test_a_plan_needs_at_least_one_item_and_one_request():
    with pytest.raises(ValueError, match="scoring plan needs >= 1 item per request"):
        accuracy.ScoringPlan(items_per_request=0)
    with pytest.raises(ValueError, match="and >= 1 request in flight"):
        accuracy.ScoringPlan(in_flight=0)


@pytest.mark.parametrize("plan", [accuracy.ScoringPlan(1, 1), accuracy.ScoringPlan(3, 2),
                                  accuracy.ScoringPlan(7, 4), accuracy.DEFAULT_PLAN])
def test_every_plan_scores_the_same_items_in_the_same_order(plan):
    # 30 items: not a multiple of 4 or 7, so the last request is short.
    items = accuracy.load_dataset()[:30]
    with fake_engine(mc_skill=0.5) as srv:
        serial = accuracy.score_items(srv, items, echo_only=False, plan=accuracy.SERIAL_PLAN)
        other = accuracy.score_items(srv, items, echo_only=False, plan=plan)
    assert [s.item.id for s in other] == [it.id for it in items]
    assert other == serial


def test_the_default_plan_keeps_requests_in_flight_together_and_the_serial_one_does_not():
    # Each scoring request generates one token; 50 ms per token makes requests
    # overlap whenever the kit sends the next before the last has answered.
    with fake_engine(mc_skill=0.5, token_delay_s=0.05) as srv:
        accuracy.score_accuracy(srv, limit=16, plan=accuracy.SERIAL_PLAN)
        assert srv.state.peak_active == 1
        accuracy.score_accuracy(srv, limit=16)
        assert srv.state.peak_active == accuracy.DEFAULT_PLAN.in_flight > 1


def test_a_failed_request_stops_the_pool_and_names_the_first_failed_request():
    # Every 3rd request answers 500: with 15 requests two workers would send
    # them all if a failure did not stop the pool.
    plan = accuracy.ScoringPlan(4, 2)
    with fake_engine(mc_skill=0.5, fail_every=3) as srv:
        with pytest.raises(KitFailure, match=r"^POST /v1/completions -> HTTP 500"):
            accuracy.score_accuracy(srv, limit=60, plan=plan)
        # The 3rd request fails. Until its worker has read the 500 and set the
        # stop, each other worker may finish the request it has in flight and
        # send one more (seen once in CI: 5 requests); a third would need two
        # answers inside that window, and 15 would mean no stop at all.
        assert srv.state.requests <= 3 + 2 * (plan.in_flight - 1)
