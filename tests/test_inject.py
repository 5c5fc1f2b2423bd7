"""Continuous-embedding memory injection in generate() on the real SmolLM2 (f32): HF
transformers' generate(inputs_embeds=...) as the reference, lossless injection of token
embeddings, retrieval from a MemoryBank inside generate(), KV-cache prefix reuse, a 200-facts
long-conversation test, and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest

import flashmem

QUESTION = [{"role": "user", "content": "Facts: <memory>\nQuestion: What is the capital of Norway?"}]


@pytest.fixture(scope="module")
def model(smollm2_f32):
    return smollm2_f32


def test_inputs_embeds_greedy_matches_hf(model, smollm2_hf):
    torch = pytest.importorskip("torch")
    hf, _ = smollm2_hf
    ids = model.tokenizer.encode("The three most important inventions of the last century were")
    rng = np.random.default_rng(0)
    emb = model.input_embeddings(ids)
    emb = (emb + 0.02 * rng.standard_normal(emb.shape) * np.abs(emb).mean()).astype(np.float32)
    ours = model.generate(inputs_embeds=emb, max_new_tokens=24, eos_token_id=[])
    with torch.no_grad():
        x = torch.from_numpy(emb)[None]
        ref = hf.generate(inputs_embeds=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[0].tolist()
        ref_logits = hf(inputs_embeds=x).logits[0].numpy()
    assert ours.token_ids == ref
    got = model._engine.forward_inputs(-np.arange(1, len(ids) + 1, dtype=np.int32), emb, 0, True)
    err = np.abs(got - ref_logits).max() / np.abs(ref_logits).max()
    assert err < 2e-3, err


def test_injected_token_embeddings_equal_text_in_prompt(model):
    before = model.tokenizer.encode("Remember this:")
    fact = "The secret code of the vault is 4471."
    after = model.tokenizer.encode(" What is the secret code?", add_special_tokens=False)
    fact_ids = model.tokenizer.encode(fact, add_special_tokens=False)
    as_text = model.logits(before + fact_ids + after)
    src = np.asarray(before + list(range(-1, -len(fact_ids) - 1, -1)) + after, np.int32)
    as_embeds = model._engine.forward_inputs(src, model.embed_memory(fact), 0, True)
    np.testing.assert_array_equal(as_embeds, as_text)


def test_generate_with_memory_bank(model, tmp_path):
    bank = flashmem.MemoryBank(576, index="flat")
    facts = ["The capital of Norway is Oslo.", "Bananas are yellow when ripe.", "The Nile flows into the sea."]
    ids = [bank.add_text(model, f, metadata={"n": i}) for i, f in enumerate(facts)]
    r = model.generate(QUESTION, memory=bank, memory_k=1, memory_position="placeholder", max_new_tokens=12,
                       memory_min_score=None)
    assert [m["id"] for m in r.memories] == [ids[0]] and r.memories[0]["text"] == facts[0]
    assert r.memories[0]["slots"] == len(model.tokenizer.encode(facts[0], add_special_tokens=False))
    # the same as writing the fact into the prompt
    text = [{"role": "user", "content": QUESTION[0]["content"].replace("<memory>", facts[0])}]
    plain = model.generate(text, max_new_tokens=12, reuse_cache=False)
    chat = model.tokenizer.apply_chat_template(QUESTION)
    a, b = chat.split("<memory>")
    spliced = (model.tokenizer.encode(a, add_special_tokens=False) +
               model.tokenizer.encode(facts[0], add_special_tokens=False) +
               model.tokenizer.encode(b, add_special_tokens=False))
    assert r.token_ids == model.generate(spliced, max_new_tokens=12, reuse_cache=False).token_ids
    assert "Oslo" in r.text and "Oslo" in plain.text
    # prefix layout: the memory before the prompt
    p = model.generate("Question: what is the capital of Norway? Answer:", memory=bank, memory_k=2, max_new_tokens=8,
                       memory_position="prefix", memory_min_score=None)
    assert [m["position"] for m in p.memories] == [0, p.memories[0]["slots"]]
    assert [m["id"] for m in p.memories] == sorted(m["id"] for m in p.memories)
    # persisted with the bank
    bank.save(str(tmp_path / "bank.fm"))
    again = flashmem.MemoryBank.load(str(tmp_path / "bank.fm"))
    r2 = model.generate(QUESTION, memory=again, memory_k=1, memory_position="placeholder", max_new_tokens=12,
                        reuse_cache=False, memory_min_score=None)
    assert r2.token_ids == r.token_ids


def test_kv_prefix_reuse(model):
    bank = flashmem.MemoryBank(576)
    for f in ["The capital of Norway is Oslo.", "Paris is in France.", "Water boils at 100 degrees."]:
        bank.add_text(model, f)
    prompt = "Answer: the capital of Norway is"
    kw = dict(memory_position="prefix", memory_min_score=None)  # CoMEM's layout, in id order
    first = model.generate(prompt, memory=bank, memory_k=3, max_new_tokens=6, **kw)
    second = model.generate(prompt, memory=bank, memory_k=3, max_new_tokens=6, **kw)
    n_mem = sum(m["slots"] for m in first.memories)
    assert first.cached_tokens == 0 or first.cached_tokens < n_mem
    assert second.cached_tokens == second.prompt_tokens - 1  # everything but the last position
    assert second.token_ids == first.token_ids
    other = model.generate("Answer: the capital of France is", memory=bank, memory_k=3, max_new_tokens=6, **kw)
    assert n_mem <= other.cached_tokens < other.prompt_tokens
    fresh = model.generate("Answer: the capital of France is", memory=bank, memory_k=3, max_new_tokens=6,
                           reuse_cache=False, **kw)
    assert fresh.token_ids == other.token_ids and fresh.cached_tokens == 0
    model.logits([1, 2, 3])  # other uses of the cache end the reuse
    assert model.generate(prompt, memory=bank, memory_k=3, max_new_tokens=2, **kw).cached_tokens == 0


def test_compressed_memory(model):
    e = model.embed_memory("The capital of Norway is Oslo, a city by the fjord.")
    c = model.embed_memory("The capital of Norway is Oslo, a city by the fjord.", slots=4)
    assert c.shape == (4, 576) and e.shape[0] > 4
    np.testing.assert_allclose(c.mean(0), e.mean(0), atol=0.2 * np.abs(e).max())
    k = model.embed_key("Oslo is the capital of Norway")
    assert k.shape == (576,) and abs(np.linalg.norm(k) - 1) < 1e-5


def test_bad_inputs(model):
    bank = flashmem.MemoryBank(576)
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(n, 576\)"):
        model.generate(inputs_embeds=np.zeros((3, 512), np.float32))
    bad = np.zeros((3, 576), np.float32)
    bad[2, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite value at row 2, column 5"):
        model.generate(inputs_embeds=bad)
    with pytest.raises(ValueError, match="prompt, inputs_embeds, or both"):
        model.generate()
    small = flashmem.load(model.path, threads=2, max_context=64)
    bank.add_text(small, " ".join(["word"] * 70))  # longer than the context: documented fallback, left out
    r = small.generate("Hi", memory=bank, memory_min_score=None, max_new_tokens=2)
    assert r.memories == [] and r.timings["memories_dropped"] == 1
    empty = flashmem.MemoryBank(576)  # documented fallback: nothing injected
    r = model.generate("Hello there", memory=empty, max_new_tokens=4)
    assert r.memories == [] and r.token_ids == model.generate("Hello there", max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match="exactly once"):
        model.generate("no placeholder here", memory=bank, memory_position="placeholder")
    with pytest.raises(ValueError, match="memory_k"):
        model.generate("Hi", memory=bank, memory_k=0)
    with pytest.raises(ValueError, match="memory_position"):
        model.generate("Hi", memory=bank, memory_position="middle")
    with pytest.raises(ValueError, match="dimension 32"):
        model.generate("Hi", memory=flashmem.MemoryBank(32))
    nov = flashmem.MemoryBank(576)
    nov.add(np.ones((1, 576), np.float32), texts=["no value"])
    with pytest.raises(ValueError, match="has no value embeddings"):
        model.generate("Hi", memory=nov, memory_min_score=None)
    with pytest.raises(TypeError, match="MemoryBank"):
        model.generate("Hi", memory={"a": 1})


def test_long_conversation_200_facts(model):
    """200 facts stored as memories; 20 questions answered greedily with memory injection (k=4,
    at a placeholder in the chat message), without memory, and with all 200 facts in the prompt.
    Prints the accuracies and the retrieval hit rate (the asked fact among the retrieved)."""
    from facts import facts, questions

    fs = facts()
    bank = flashmem.MemoryBank(576, index="flat")
    for f, _, _ in fs:
        bank.add_text(model, f)
    all_facts = " ".join(f for f, _, _ in fs)

    def ask(q, content, **kw):
        msgs = [{"role": "user", "content": content + f"\nQuestion: {q}\nAnswer in a few words."}]
        return model.generate(msgs, max_new_tokens=12, **kw)

    score = {"memory": 0, "none": 0, "all_in_prompt": 0}
    hits, reused = 0, 0
    for qi in questions(20):
        fact, q, ans = fs[qi]
        r = ask(q, "Facts: <memory>", memory=bank, memory_k=4, memory_position="placeholder", memory_query=q,
                memory_min_score=None)
        hits += fact in [m["text"] for m in r.memories]
        score["memory"] += ans.lower() in r.text.lower()
    for qi in questions(20):
        score["none"] += fs[qi][2].lower() in ask(fs[qi][1], "").text.lower()
    for qi in questions(20):  # the long facts prefix is computed once, then reused from the KV cache
        r = ask(fs[qi][1], "Facts: " + all_facts)
        score["all_in_prompt"] += fs[qi][2].lower() in r.text.lower()
        reused += r.cached_tokens
    print(f"\n200 facts, 20 questions: accuracy {score}, retrieval hit rate {hits / 20:.2f}")
    assert hits >= 12
    assert score["memory"] >= score["none"] + 5
    assert score["memory"] > score["all_in_prompt"]
    n_facts = len(model.tokenizer.encode(all_facts, add_special_tokens=False))
    assert reused >= 19 * n_facts  # prefix caching: the facts prompt is computed once


def test_injection_with_flash_offloading(model):
    """Memory injection on the flash-offloaded engine gives the all-in-DRAM engine's tokens."""
    bank = flashmem.MemoryBank(576)
    for f in ["The capital of Norway is Oslo.", "Bananas are yellow when ripe."]:
        bank.add_text(model, f)
    flash = flashmem.load(model.path, threads=2, max_context=256, offload="flash", dram_budget="290MB")
    kw = dict(memory=bank, memory_k=2, memory_position="placeholder", max_new_tokens=10)
    a = flash.generate(QUESTION, **kw)
    b = model.generate(QUESTION, reuse_cache=False, **kw)
    assert a.token_ids == b.token_ids and a.flash["bytes_read_per_token"] > 0
    # the same memories, at the same positions; scores from each engine's own passes (the flash
    # engine's bundles compute down with f32 activations, so its keys differ in the last digits)
    same = ("id", "text", "slots", "position")
    assert a.memories and [[m[k] for k in same] for m in a.memories] == [[m[k] for k in same] for m in b.memories]
    for x, y in zip(a.memories, b.memories):
        assert x["score"] == pytest.approx(y["score"], abs=1e-3) and x["relevance"] == pytest.approx(y["relevance"], abs=1e-2)
