"""The tiny model's tokenizer: byte-level BPE trained on a corpus generated here.

No hub is reachable from CI, so the tokenizer is trained locally, in about
0.2 s, on deterministic English-like text (an LCG, not random.Random, so the
same bytes come out on every platform and Python version).
"""
from __future__ import annotations

from typing import Iterator

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5 in this order
# Role markers around each turn; an unknown role is a request error (4xx), not
# a silently mangled prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS_SENTENCES = 20000
# Common English words (plus a few of kiln's own nouns) the corpus is made of.
_WORDS = """
the of and to in is it that for was on are with as be at by this have from or one had not but what
all were when we there can an your which their said if do will each about how up out them then she
many some so these would other into has more her two like him see time could no make than first
been its who now people my made over did down only way find use may water long little very after
words called just where most know get through back much go good new write our me man too any day
same right look think also around another came come work three word must because does part even
place well such here take why things help put years different away again off went old number great
tell men say small every found still capital france paris hello server model token request engine
test kernel memory cache batch stream metric latency queue worker thread process port health ready
start stop build image runner
""".split()
_LCG_MUL = 6364136223846793005  # Knuth's MMIX LCG: stable on every platform and
_LCG_INC = 1442695040888963407  # Python version, unlike random.Random's helpers.


def corpus() -> Iterator[str]:
    """Deterministic English-like sentences with numbers: the tokenizer's training text."""
    x = 0x6B696C6E  # "kiln"
    for i in range(CORPUS_SENTENCES):
        x = (x * _LCG_MUL + _LCG_INC) % 2**64
        words = []
        for _ in range(4 + (x >> 33) % 9):
            x = (x * _LCG_MUL + _LCG_INC) % 2**64
            r = x >> 33
            if r % 11 == 0:
                words.append(str(r % 10000))
            else:
                # Squaring a uniform skews towards the list's head: a rough
                # Zipf, so frequent words become single tokens first.
                u = (r % 100000) / 100000
                words.append(_WORDS[int(u * u * len(_WORDS))])
        s = " ".join(words)
        yield s[0].upper() + s[1:] + ".?!,"[i % 4]


def train_tokenizer(vocab_size: int):
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise RuntimeError("building the tiny model needs tokenizers; pip install tokenizers") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes are in the vocab, so any input text encodes (no <unk>).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer, length=CORPUS_SENTENCES)
    # Llama-style: a plain encode starts with BOS; chat prompts get theirs from
    # the template and are encoded without special tokens by the engine.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok
