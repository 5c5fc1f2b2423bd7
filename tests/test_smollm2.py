"""The real model, SmolLM2-135M-Instruct (Q4_1 GGUF), against HF transformers' GGUF loader."""
import numpy as np
import pytest

import flashmem

from conftest import shared_data

torch = pytest.importorskip("torch")

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_greedy_raw_prompt_matches_hf(smollm2_f32, smollm2_hf, prompt):
    hf, tok = smollm2_hf
    ids = tok(prompt)["input_ids"]
    assert smollm2_f32.encode_prompt(prompt) == ids
    r = smollm2_f32.generate(prompt, max_new_tokens=48)
    assert r.token_ids == hf_greedy(hf, ids, 48)
    assert r.prompt_tokens == len(ids)


@pytest.mark.parametrize("messages", CHAT_PROMPTS)
def test_greedy_chat_matches_hf(smollm2_f32, smollm2_hf, messages):
    hf, tok = smollm2_hf
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert smollm2_f32.encode_prompt(messages) == list(ids)
    r = smollm2_f32.generate(messages, max_new_tokens=48)
    want = hf_greedy(hf, list(ids), 48)
    assert r.token_ids == want
    assert r.text == tok.decode(want, skip_special_tokens=True)


def test_tokenizer_matches_hf(smollm2_f32, smollm2_hf):
    _, tok = smollm2_hf
    text = shared_data("tinyshakespeare.txt").read_text()[:20000]
    for piece in [text, "Ünïcödé ✓ 日本語 🙂  tabs\tand\r\nnewlines", "<|im_start|>user\nhi<|im_end|>", "x = 1234567"]:
        assert smollm2_f32.tokenizer.encode(piece) == tok(piece)["input_ids"]


@pytest.fixture(scope="module")
def shakespeare_ids(smollm2_f32):
    return smollm2_f32.tokenizer.encode(shared_data("tinyshakespeare.txt").read_text()[:8000])[:1024]


def test_perplexity_within_half_percent_of_hf(smollm2_f32, smollm2_hf, shakespeare_ids):
    hf, _ = smollm2_hf
    ids = torch.tensor([shakespeare_ids])
    with torch.no_grad():
        hf_ppl = float(torch.exp(hf(ids, labels=ids).loss))
    text = shared_data("tinyshakespeare.txt").read_text()[:8000]
    ppl = smollm2_f32.perplexity(text, max_tokens=1024)
    assert len(shakespeare_ids) == 1024
    assert abs(ppl / hf_ppl - 1) < 0.005, (ppl, hf_ppl)


def test_f16_top1_agrees_with_f32(smollm2_gguf, smollm2_f32, shakespeare_ids):
    f16 = flashmem.load(smollm2_gguf, dtype="f16", threads=2)
    a = smollm2_f32.logits(shakespeare_ids).argmax(axis=1)
    b = f16.logits(shakespeare_ids).argmax(axis=1)
    agree = float((a == b).mean())
    assert agree >= 0.99, agree


def test_bf16_model_generates_sensibly(smollm2_gguf):
    bf16 = flashmem.load(smollm2_gguf, dtype="bf16", threads=2, max_context=256)
    assert "Paris" in bf16.generate("The capital of France is", max_new_tokens=8).text


def test_logits_match_hf_at_every_position(smollm2_f32, smollm2_hf, shakespeare_ids):
    hf, _ = smollm2_hf
    ids = shakespeare_ids[:300]  # crosses a prefill chunk boundary (256)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = smollm2_f32.logits(ids)
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


def test_hidden_states_match_hf(smollm2_f32, smollm2_hf, shakespeare_ids):
    hf, _ = smollm2_hf
    ids = shakespeare_ids[:100]
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    got = smollm2_f32.hidden_states(ids)
    assert got.shape == (100, 576)
    assert np.abs(got - ref).max() < 1e-3 * np.abs(ref).max()


def test_input_embeddings_match_hf(smollm2_f32, smollm2_hf):
    hf, tok = smollm2_hf
    ids = tok("Carol lives in Lyon.")["input_ids"]
    want = hf.get_input_embeddings()(torch.tensor(ids)).detach().numpy()
    np.testing.assert_array_equal(smollm2_f32.input_embeddings(ids), want)
