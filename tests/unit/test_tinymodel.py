"""ci.engine.tinymodel: the locally written tiny Llama model (no engine needed)."""
from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests import requires

requires.module("numpy")
requires.module("safetensors")
tokenizers = requires.module("tokenizers")

from ci.engine import models, tinymodel  # noqa: E402
from ci.host import cachedir  # noqa: E402

WEIGHTS = "model.safetensors"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
EXPECTED_CHAT = "<s><|system|>\nBe brief.</s>\n<|user|>\nSay hi.</s>\n<|assistant|>\n"


def _stats(d: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return tinymodel.ensure_tiny_model(tmp_path_factory.mktemp("cache"))


def _copy(built: Path, cache: Path) -> Path:
    """A finished build in another cache, without paying for a second build."""
    d = tinymodel.model_dir(cache)
    shutil.copytree(built, d)
    return d


def test_layout_and_config(built, tmp_path_factory):
    assert built.name == "tiny-llama" and built.parent.name == "models"
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "generation_config.json", WEIGHTS, "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", tinymodel.MANIFEST_NAME} <= names
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["head_dim"] == 64  # vLLM's CPU attention rejects 16
    assert cfg["num_attention_heads"] * cfg["head_dim"] == cfg["hidden_size"]
    assert cfg["vocab_size"] == tokenizers.Tokenizer.from_file(str(built / "tokenizer.json")).get_vocab_size()
    assert (built / WEIGHTS).stat().st_size < 16 * 2**20  # "tiny": a few MB


def test_weights_match_config_shapes(built):
    from safetensors.numpy import load_file

    cfg = json.loads((built / "config.json").read_text())
    w = load_file(str(built / WEIGHTS))
    assert w["model.embed_tokens.weight"].shape == (cfg["vocab_size"], cfg["hidden_size"])
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    assert w["model.layers.1.self_attn.k_proj.weight"].shape == (kv, cfg["hidden_size"])
    assert len([k for k in w if k.endswith("q_proj.weight")]) == cfg["num_hidden_layers"]
    # EOS is never the model's own choice (lengths are set by max_tokens).
    assert not w["lm_head.weight"][cfg["eos_token_id"]].any()


def test_same_seed_gives_identical_bytes(built, tmp_path):
    again = tinymodel.ensure_tiny_model(tmp_path)
    for name in (WEIGHTS, "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name


def test_other_seed_other_dir_and_weights(built, tmp_path):
    other = tinymodel.ensure_tiny_model(tmp_path, seed=1)
    assert other.name == "tiny-llama-seed1"
    assert (other / WEIGHTS).read_bytes() != (built / WEIGHTS).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (built / "tokenizer.json").read_bytes()


def test_reuse_does_not_rewrite(built):
    before = _stats(built)
    assert tinymodel.ensure_tiny_model(built.parent.parent) == built
    assert _stats(built) == before


@pytest.mark.parametrize("damage", ["no-manifest", "truncated-weights", "missing-file"])
def test_torn_build_is_rebuilt(built, tmp_path, damage):
    d = _copy(built, tmp_path)
    assert cachedir.is_complete(d, tinymodel._generator_key(0))
    good = (d / WEIGHTS).read_bytes()
    if damage == "no-manifest":
        (d / tinymodel.MANIFEST_NAME).unlink()
    elif damage == "truncated-weights":
        (d / WEIGHTS).write_bytes(good[: len(good) // 2])
    else:
        (d / "tokenizer.json").unlink()
    # A builder that died mid-build leaves its temp dir; the next build sweeps it.
    leftover = d.parent / ".tiny-llama.tmp-deadbeef"
    leftover.mkdir()
    (leftover / WEIGHTS).write_bytes(b"partial")
    assert tinymodel.ensure_tiny_model(tmp_path) == d
    assert (d / WEIGHTS).read_bytes() == good
    assert (d / "tokenizer.json").is_file()
    assert not leftover.exists()
    assert sorted(p.name for p in d.parent.iterdir()) == [".tiny-llama.lock", "tiny-llama"]


def test_changed_generator_rebuilds(built, tmp_path, monkeypatch):
    d = _copy(built, tmp_path)
    ino = (d / WEIGHTS).stat().st_ino
    monkeypatch.setattr(tinymodel, "_generator_key", lambda seed: "a-newer-generator")
    tinymodel.ensure_tiny_model(tmp_path)
    assert (d / WEIGHTS).stat().st_ino != ino
    assert json.loads((d / tinymodel.MANIFEST_NAME).read_text())["key"] == "a-newer-generator"


def test_concurrent_builders_agree(tmp_path):
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: tinymodel.ensure_tiny_model(tmp_path), range(3)))
    assert len(set(paths)) == 1
    assert cachedir.is_complete(paths[0], tinymodel._generator_key(0))
    assert sorted(p.name for p in paths[0].parent.iterdir()) == [".tiny-llama.lock", "tiny-llama"]


def test_default_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    assert tinymodel.model_dir() == tmp_path / "models" / "tiny-llama"
    monkeypatch.delenv("KILN_CACHE_DIR")
    assert tinymodel.model_dir().parts[-4:] == (".kiln", "cache", "models", "tiny-llama")


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_bad_seed_is_a_clear_error(tmp_path, seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        tinymodel.ensure_tiny_model(tmp_path, seed=seed)


def test_cache_path_that_is_a_file(tmp_path):
    (tmp_path / "models").write_text("not a dir")
    with pytest.raises(ValueError, match="is not a directory"):
        tinymodel.ensure_tiny_model(tmp_path)


def test_tokenizer_round_trips(built):
    tok = tokenizers.Tokenizer.from_file(str(built / "tokenizer.json"))
    for text in ["Hello, my name is kiln.", "The capital of France is Paris.\n", "naïve café ✓ 12345"]:
        ids = tok.encode(text).ids
        assert ids[0] == tok.token_to_id("<s>") and ids.count(ids[0]) == 1
        assert tok.decode(ids) == text
    # Role markers are single special tokens, not spelled out byte by byte.
    assert tok.encode("<|user|>", add_special_tokens=False).ids == [tok.token_to_id("<|user|>")]


def test_chat_template_renders_with_jinja(built):
    jinja2 = requires.module("jinja2.sandbox")
    cfg = json.loads((built / "tokenizer_config.json").read_text())
    # The options transformers renders chat templates with.
    env = jinja2.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise ValueError(msg)

    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(cfg["chat_template"])
    kw = {"bos_token": cfg["bos_token"], "eos_token": cfg["eos_token"]}
    assert tmpl.render(messages=MESSAGES, add_generation_prompt=True, **kw) == EXPECTED_CHAT
    with pytest.raises(ValueError, match="unknown chat role: tool"):
        tmpl.render(messages=[{"role": "tool", "content": "x"}], **kw)


def test_autotokenizer_loads_it(built):
    # transformers is in requirements/tests.txt for this test.
    transformers = requires.module("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(built))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == EXPECTED_CHAT
    ids = tok("Hello, my name is kiln.")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, my name is kiln."


def test_cli_prints_the_path(built, tmp_path, capsys):
    _copy(built, tmp_path)  # the CLI's job is the path; building is tested above
    assert models.main(["tiny-llama", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == f"{tmp_path / 'models' / 'tiny-llama'}\n"
    assert models.main(["tiny-llama", "--cache-dir", str(tmp_path), "--seed", "-3"]) == 1
    assert capsys.readouterr().out == ""


def test_manifest_lists_every_file(built):
    manifest = json.loads((built / tinymodel.MANIFEST_NAME).read_text())
    on_disk = {p.name for p in built.iterdir()} - {tinymodel.MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk
    assert all(os.access(built / n, os.R_OK) for n in on_disk)
