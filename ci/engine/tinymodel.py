"""The tiny Llama-architecture model the CPU e2e profile serves.

No model hub is reachable on CI, so kiln writes its own model: seeded random
weights (safetensors), a Llama config, and a byte-level BPE tokenizer trained
here on a corpus generated here, with a chat template. The result is a
directory that ``transformers.AutoTokenizer`` and vLLM load like any hub model.

The directory is built once per cache and reused: a manifest records a key
(the hash of this file's source plus the seed, so any change to the generator
rebuilds) and the sha256 of every file, so a torn or tampered build is rebuilt
rather than served. Builds go to a temporary directory beside the target and
are renamed into place under a file lock, so concurrent builders never see or
leave half a model.

numpy, safetensors and tokenizers are imported only when a build is needed
(the e2e environment has them as vLLM dependencies); reuse needs none of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Sequence


from ci.engine import tinytokenizer
from ci.engine.tinytokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS
from ci.host import cachedir

log = logging.getLogger(__name__)

MODEL_NAME = "tiny-llama"
MANIFEST_NAME = cachedir.MANIFEST_NAME
# Bump when the manifest layout itself changes (the source hash covers the rest).
MANIFEST_FORMAT = 1
# A build takes about a second; a holder stuck this long is hung, and waiting
# on it forever would turn one wedged job into a hung CI run.
LOCK_TIMEOUT_S = 300.0

# --- model shape ---------------------------------------------------------------
# head_dim 64: vLLM's CPU attention accepts {32, 64, 80, ...} and rejects 16.
# 2 query heads sharing 1 KV head exercises grouped-query attention like real
# Llamas do. Untied lm_head: tied to random embeddings, the input token's own
# logit (|e|^2) wins and greedy decoding repeats the last prompt token forever
# (" is is is ..."), whatever attention computes: a KV-cache bug would go unseen.
HIDDEN_SIZE = 128
INTERMEDIATE_SIZE = 384
NUM_LAYERS = 2
NUM_HEADS = 2
NUM_KV_HEADS = 1
HEAD_DIM = 64
VOCAB_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 2048
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
# Weights are stored as float32: numpy has no bfloat16, and vLLM's `--dtype
# auto` downcasts float32 checkpoints to the platform's preferred dtype
# (bfloat16 on x86 CPUs) at load, so nothing is lost by not writing bf16.
TORCH_DTYPE = "float32"

# --- initialisation --------------------------------------------------------------
# Projections use std 1/sqrt(fan_in) so attention and MLP outputs are as large
# as the residual stream (the output depends on context, not just the last
# token). Logits get a std of LOGIT_STD: peaked enough that greedy decoding is
# not flipped by bf16 rounding differences between a batched and a single run,
# flat enough that temperature-1 sampling still varies.
EMBED_STD = 1.0
LOGIT_STD = 6.0



def model_dir(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Where :func:`ensure_tiny_model` puts the model for ``seed`` (nothing is built)."""
    _check_seed(seed)
    root = Path(cache_dir) if cache_dir is not None else cachedir.default_root()
    name = MODEL_NAME if seed == 0 else f"{MODEL_NAME}-seed{seed}"
    return root / "models" / name


def ensure_tiny_model(cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """Return the directory of the tiny model, building it first if needed.

    ``cache_dir`` is kiln's cache root (default ``ci.host.cachedir.default_root()``); the
    model lives in ``<cache_dir>/models/tiny-llama`` (``-seed<N>`` for other
    seeds). A complete directory whose manifest matches this generator is
    returned untouched; anything else is rebuilt atomically under a lock.
    The same seed always yields byte-identical weights.
    """
    target = model_dir(cache_dir, seed=seed)
    return cachedir.ensure(target, _generator_key(seed), lambda tmp: _write_model(tmp, seed),
                           manifest={"format": MANIFEST_FORMAT, "seed": seed},
                           label=f"tiny model (seed {seed})", lock_timeout_s=LOCK_TIMEOUT_S)


def _check_seed(seed: int) -> None:
    # numpy's RandomState takes seeds in [0, 2**32).
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")


def _generator_key(seed: int) -> str:
    # Every parameter is a constant in this file, so hashing the source makes
    # any change to the generator rebuild (a hand-bumped version gets forgotten).
    # Library versions are left out on purpose: a new tokenizers release still
    # reads the cached files, and rebuilding under a reader would pull the
    # model out from under a running server.
    h = hashlib.sha256(Path(__file__).read_bytes() + Path(tinytokenizer.__file__).read_bytes())
    h.update(f"\0seed={seed}\0format={MANIFEST_FORMAT}".encode())
    return h.hexdigest()


def _write_model(dest: Path, seed: int) -> list[str]:
    """Write every model file into ``dest``; return their names."""
    try:
        import numpy as np
        from safetensors.numpy import save_file
    except ImportError as e:
        raise RuntimeError(
            f"building the tiny model needs numpy and safetensors ({e.name} is missing); "
            "pip install numpy safetensors tokenizers") from None
    tok = tinytokenizer.train_tokenizer(VOCAB_SIZE)
    vocab = tok.get_vocab_size()
    if vocab != VOCAB_SIZE:
        # The model's vocab must equal the tokenizer's: an id the tokenizer
        # cannot decode would crash the engine's detokenizer mid-request.
        raise RuntimeError(f"tokenizer training gave {vocab} tokens, expected {VOCAB_SIZE}")
    tok.save(str(dest / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(dest / "special_tokens_map.json", {
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "additional_special_tokens": list(ROLE_TOKENS),
    })
    _write_json(dest / "config.json", _config(ids))
    _write_json(dest / "generation_config.json", {
        # No sampling fields on purpose: vLLM turns generation_config values
        # into request defaults, and the kits must see the API's defaults.
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
    })
    silent = [i for i in range(vocab) if not _emittable(tok, i)]
    tensors = _weights(np, seed, silent)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "generation_config.json", "model.safetensors",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _config(ids: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": RMS_NORM_EPS,
        # transformers 5 reads rope_parameters and dtype; 4.x (older engine
        # images) reads rope_theta and torch_dtype. Both spellings are written.
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "torch_dtype": TORCH_DTYPE,
        "dtype": TORCH_DTYPE,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }


def _emittable(tok, token_id: int) -> bool:
    """Whether the model may generate this token: printable text only."""
    if tok.id_to_token(token_id) in SPECIAL_TOKENS:
        return False
    text = tok.decode([token_id], skip_special_tokens=False)
    # Lone bytes >= 0x80 decode to U+FFFD: a partial UTF-8 sequence that
    # streams as empty deltas; control bytes make unreadable log lines.
    return (bool(text) and "\ufffd" not in text
            and all(c.isprintable() or c == "\n" for c in text))


def _weights(np, seed: int, silent: Sequence[int]) -> dict:
    # RandomState, not default_rng: its stream is frozen by numpy's
    # compatibility policy, so a seed gives the same bytes on every numpy.
    rng = np.random.RandomState(seed)

    def normal(shape: tuple[int, ...], std: float):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def proj(out_f: int, in_f: int):
        return normal((out_f, in_f), in_f ** -0.5)

    ones = np.ones(HIDDEN_SIZE, dtype=np.float32)
    t = {"model.embed_tokens.weight": normal((VOCAB_SIZE, HIDDEN_SIZE), EMBED_STD)}
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = ones.copy()
        t[p + "self_attn.q_proj.weight"] = proj(NUM_HEADS * HEAD_DIM, HIDDEN_SIZE)
        t[p + "self_attn.k_proj.weight"] = proj(NUM_KV_HEADS * HEAD_DIM, HIDDEN_SIZE)
        t[p + "self_attn.v_proj.weight"] = proj(NUM_KV_HEADS * HEAD_DIM, HIDDEN_SIZE)
        t[p + "self_attn.o_proj.weight"] = proj(HIDDEN_SIZE, NUM_HEADS * HEAD_DIM)
        t[p + "post_attention_layernorm.weight"] = ones.copy()
        t[p + "mlp.gate_proj.weight"] = proj(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        t[p + "mlp.up_proj.weight"] = proj(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        t[p + "mlp.down_proj.weight"] = proj(HIDDEN_SIZE, INTERMEDIATE_SIZE)
    t["model.norm.weight"] = ones.copy()
    # The final norm makes each hidden component ~1, so a row std of
    # LOGIT_STD/sqrt(hidden) gives logits of std LOGIT_STD.
    head = normal((VOCAB_SIZE, HIDDEN_SIZE), LOGIT_STD / HIDDEN_SIZE ** 0.5)
    # Zero rows give those tokens logit 0 while the top logit sits near
    # +3.5 * LOGIT_STD: the model never emits EOS or role markers on its own
    # (max_tokens alone decides lengths) nor byte fragments (text stays clean).
    head[list(silent)] = 0.0
    t["lm_head.weight"] = head
    return t
