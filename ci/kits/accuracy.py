"""Accuracy-floor kit: multiple-choice scoring by log-likelihood (HellaSwag-style).

Each item is a context and 4 endings; the engine scores ``context + " " + ending``
through /v1/completions with ``echo`` and ``logprobs`` and the kit sums the
log-probabilities of the ending's tokens. The ending with the best score
(``acc``) or best score per character (``acc_norm``) is the model's answer.
The floor is per (model, profile) in ci/kits/thresholds.py.

Ending tokens are located from the *end* of the echoed token list (token
string lengths, minus any generated text): counting from the front would be
thrown off by a BOS token the tokenizer adds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.enforce import Check
from ci.kits.thresholds import Bound

log = logging.getLogger(__name__)

DEFAULT_DATASET = Path(__file__).parent / "data" / "mc_tiny.jsonl"
METRICS = ("acc", "acc_norm")
N_ENDINGS = 4
# Prompts per request: 4 items' endings at once keeps requests few without
# making one request long enough to hit a timeout on CPU.
BATCH_PROMPTS = 16
# More items than this with a tie for the best ending means the logprobs are
# uninformative (constant/garbage), and "always pick the first" would pass a
# chance-level floor on balanced data.
MAX_TIED_FRACTION = 0.5


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item."""

    id: str
    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class ItemScore:
    """Summed ending log-likelihoods of one item, and what each metric picked."""

    item: MCItem
    sums: tuple[float, ...]
    pred_acc: int
    pred_norm: int
    tied: bool


@dataclass(frozen=True)
class AccuracyResult:
    """Scores over the dataset."""

    n: int
    acc: float
    acc_norm: float
    metric: str
    floor: float | None  # None: scored only (calibrate, a test that judges the floor itself)
    tied: int
    name: str = ""

    @property
    def score(self) -> float:
        """The value compared with the floor."""
        return self.acc if self.metric == "acc" else self.acc_norm

    def line(self) -> str:
        """One line: the scores, chance, ties and the floor when there is one."""
        floor = f"; floor {self.floor:g} on {self.metric}" if self.floor is not None else ""
        return (f"{self.n} items of {self.name}: acc {self.acc:.3f}, acc_norm {self.acc_norm:.3f} "
                f"(chance {1 / N_ENDINGS:.2f}), {self.tied} tied{floor}")

    def floor_check(self, floor: Bound) -> Check:
        """The floor as a bound check (ci/kits/enforce.py decides whether it is enforced)."""
        ok = self.score >= floor.value
        detail = "" if ok else (f"accuracy {self.metric} {self.score:.3f} < floor {floor.value:g} "
                                f"over {self.n} items of {self.name}")
        return Check("accuracy", floor, ok, detail)


def load_dataset(path: Path | str = DEFAULT_DATASET) -> list[MCItem]:
    """Read a JSONL multiple-choice set; a bad line fails naming file and line."""
    path = Path(path)
    items = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
                item = MCItem(str(row["id"]), row["context"], tuple(row["endings"]), row["label"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{where}: not an item with id/context/endings/label: {exc}") from None
            if len(item.endings) != N_ENDINGS or not all(isinstance(e, str) and e.strip()
                                                         for e in item.endings):
                raise ValueError(f"{where}: needs {N_ENDINGS} non-empty endings")
            if not isinstance(item.label, int) or not 0 <= item.label < N_ENDINGS:
                raise ValueError(f"{where}: label {item.label!r} is not 0..{N_ENDINGS - 1}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def prompt_for(item: MCItem, ending: str) -> str:
    """The text scored for one ending."""
    return f"{item.context} {ending}"


def ending_logprob(logprobs: dict, ending: str, generated: str, where: str) -> float:
    """Sum of log-probabilities of the tokens covering ``ending`` at the end of the prompt.

    A token is the ending's when it overlaps the ending's character span;
    spans are measured from the end of the echoed tokens minus ``generated``.
    """
    tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
        raise KitFailure(f"{where}: echo logprobs lack matching tokens/token_logprobs")
    total = sum(len(t) for t in tokens)
    prompt_end = total - len(generated)
    ending_start = prompt_end - len(ending)
    picked, pos = [], 0
    for tok, value in zip(tokens, values):
        start, pos = pos, pos + len(tok)
        if start < prompt_end and pos > ending_start:
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise KitFailure(f"{where}: no log-probability for ending token {tok!r}")
            picked.append(float(value))
    if not picked:
        raise KitFailure(f"{where}: could not find the ending's tokens in the echoed prompt")
    return sum(picked)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def score_items(client: EngineClient, items: Sequence[MCItem], *, echo_only: bool) -> list[ItemScore]:
    """Score every ending of every item, ``BATCH_PROMPTS`` prompts per request."""
    jobs = [(i, j) for i, item in enumerate(items) for j in range(N_ENDINGS)]
    sums = [[math.nan] * N_ENDINGS for _ in items]
    for lo in range(0, len(jobs), BATCH_PROMPTS):
        chunk = jobs[lo:lo + BATCH_PROMPTS]
        prompts = [prompt_for(items[i], items[i].endings[j]) for i, j in chunk]
        resp = client.completion(prompts, max_tokens=0 if echo_only else 1, echo=True,
                                 logprobs=1, temperature=0)
        choices = sorted(resp.get("choices") or [], key=lambda ch: ch.get("index", 0))
        if len(choices) != len(prompts):
            raise KitFailure(f"scoring request of {len(prompts)} prompts got {len(choices)} choices")
        for (i, j), prompt, choice in zip(chunk, prompts, choices):
            text = choice.get("text") or ""
            generated = text[len(prompt):] if text.startswith(prompt) else ""
            where = f"item {items[i].id} ending {j}"
            sums[i][j] = ending_logprob(choice.get("logprobs") or {}, items[i].endings[j],
                                        generated, where)
    out = []
    for item, s in zip(items, sums):
        norm = [v / len(e) for v, e in zip(s, item.endings)]
        best = max(s)
        out.append(ItemScore(item, tuple(s), _argmax(s), _argmax(norm),
                             tied=sum(1 for v in s if v == best) > 1))
    return out


def score_accuracy(server: ServerLike, *, metric: str = "acc_norm", dataset: Path | str = DEFAULT_DATASET,
                   limit: int | None = None, items: Sequence[MCItem] | None = None,
                   name: str | None = None) -> AccuracyResult:
    """Score the dataset (or ``items``) and print the per-item table; no floor.

    Fails only where no floor could save the run: logprobs that tie on more
    than MAX_TIED_FRACTION of the items carry no information.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown accuracy metric {metric!r}; known: {', '.join(METRICS)}")
    items = list(items if items is not None else load_dataset(dataset))[:limit]
    name = name or Path(dataset).name
    if not items:
        raise ValueError(f"{name}: no items to score")
    # Engines whose echo with max_tokens=0 scores the prompt and generates
    # nothing keep generated text out of the alignment entirely (a spec fact).
    echo_only = bool(getattr(server.backend, "echo_scores_prompt", False))
    with client_for(server) as c:
        scores = score_items(c, items, echo_only=echo_only)
    n = len(scores)
    acc = sum(s.pred_acc == s.item.label for s in scores) / n
    acc_norm = sum(s.pred_norm == s.item.label for s in scores) / n
    result = AccuracyResult(n, acc, acc_norm, metric, None, sum(s.tied for s in scores), name)
    print(f"{'item':<8} gold acc norm  ending log-likelihoods")
    for s in scores:
        sums = " ".join(f"{v:8.2f}" for v in s.sums)
        print(f"{s.item.id:<8} {s.item.label:>4} {s.pred_acc:>3} {s.pred_norm:>4}  {sums}")
    print(result.line())
    if result.tied > MAX_TIED_FRACTION * n:
        raise KitFailure(f"{result.tied}/{n} items have tied best endings: the engine's logprobs "
                         f"carry no information")
    return result


def check_accuracy_floor(server: ServerLike, *, floor: float, metric: str = "acc_norm",
                         dataset: Path | str = DEFAULT_DATASET, limit: int | None = None,
                         items: Sequence[MCItem] | None = None, name: str | None = None,
                         summary_path: str | Path | None = None) -> AccuracyResult:
    """Score the dataset (or ``items``) and assert ``metric`` >= ``floor``; the table prints first.

    ``summary_path`` (e.g. ``$GITHUB_STEP_SUMMARY``) gets a markdown line with
    the figures, pass or fail.
    """
    try:
        result = dataclasses.replace(score_accuracy(server, metric=metric, dataset=dataset, limit=limit,
                                                    items=items, name=name), floor=floor)
    except KitFailure as exc:
        if summary_path:  # ties fail the kit; the summary still says so
            with open(summary_path, "a", encoding="utf-8") as fh:
                fh.write(f"### accuracy ({server.served_model}): FAIL\n\n{str(exc).splitlines()[0]}\n\n")
        raise
    if summary_path:
        verdict = "pass" if result.score >= floor else "FAIL"
        with open(summary_path, "a", encoding="utf-8") as fh:
            fh.write(f"### accuracy ({server.served_model}): {verdict}\n\n{result.line()}\n\n")
    if result.score < floor:
        raise KitFailure(f"accuracy {metric} {result.score:.3f} < floor {floor:g} "
                         f"over {result.n} items of {result.name}")
    return result
