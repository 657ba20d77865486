"""HF transformers as the reference decoder for the reference kit (ci/kits/reference.py).

Loads a local model directory with ``AutoModelForCausalLM`` in float32 and
decodes greedily with its own KV cache, one token at a time, reporting each
position's top-k log-probabilities the way an OpenAI-compatible engine does:
token strings are the single-token decodes (``" Paris"``), prompts are
tokenized with the tokenizer's default special tokens (as engines do for
``/v1/completions``).

torch and transformers are imported when a reference is built: the e2e
environment has them (vLLM depends on both); kiln's own test environment
does not need them.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ci.kits.reference import Decode, Step

log = logging.getLogger(__name__)


class HFReference:
    """Greedy decoding with HF transformers on CPU, float32."""

    def __init__(self, model_dir: Path | str, *, threads: int | None = None):
        import torch  # noqa: PLC0415  (heavy; only the e2e environment has it)
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.eval()

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def greedy(self, prompt: str, n_tokens: int, top_k: int) -> Decode:
        """Temperature-0 decode of ``n_tokens`` (EOS ignored) with top-k logprobs per step."""
        torch = self._torch
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        steps, past = [], None
        with torch.no_grad():
            for _ in range(n_tokens):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
                values, indices = torch.topk(logprobs, top_k)
                top: dict[str, float] = {}
                for v, i in zip(values.tolist(), indices.tolist()):
                    # Two ids may decode to one string; keep the likelier, as a dict does.
                    top.setdefault(self._piece(i), v)
                chosen = int(indices[0])
                steps.append(Step(self._piece(chosen), float(values[0]), top))
                ids = torch.tensor([[chosen]])
        return Decode(prompt, tuple(steps))
