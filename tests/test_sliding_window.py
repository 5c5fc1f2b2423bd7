"""Gemma 3's architecture and sliding-window attention on tiny random-weight models (odd sizes)
against HF transformers: GeGLU, q/k norms, output norms, the embedding scale, local layers with
their own rope; Mistral's window on every layer. Logits of a prefill and of step-by-step decode,
with prefill chunks small enough that the local layers' KV rings wrap many times."""
import numpy as np
import pytest

import flashmem

from conftest import assert_close, write_word_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def make_tiny_gemma3(folder, *, hidden=48, ff=80, layers=4, heads=3, kv_heads=1, head_dim=32, vocab=67, window=6,
                     layer_types=None, scalar=24, seed=0):
    """A random-weight Gemma 3 text model written as an HF folder; norms away from their zero init."""
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, sliding_window=window,
        max_position_embeddings=256, query_pre_attn_scalar=scalar, initializer_range=0.15, rms_norm_eps=1e-6,
        layer_types=layer_types or ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(layers)],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    model = model.float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, vocab)
    return model


def make_tiny_mistral(folder, *, window=5, vocab=53, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(vocab_size=vocab, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=10,
                                     sliding_window=window, max_position_embeddings=256, initializer_range=0.15)
    model = transformers.MistralForCausalLM(cfg).float().eval()
    model.save_pretrained(folder, safe_serialization=True)
    write_word_tokenizer(folder, vocab)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def check_prefill_and_decode(model, ref, ids, what):
    assert_close(model.logits(ids), ref, 1e-4, f"{what}: prefill")
    eng = model._engine
    eng.forward(np.asarray(ids[:3], np.int32), 0)
    for t in range(3, len(ids)):
        assert_close(eng.forward(np.asarray([ids[t]], np.int32), t), ref[t], 1e-4, f"{what}: decode step {t}")


CASES = {
    "gemma3": dict(),
    "gemma3-odd": dict(hidden=36, ff=50, heads=2, head_dim=18, vocab=61, window=7, layers=3,
                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma3-mha": dict(heads=2, kv_heads=2, window=4, scalar=32),
}


@pytest.mark.parametrize("chunk", [None, 4, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_gemma3_matches_hf(tmp_path, monkeypatch, case, chunk):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_gemma3(folder, **CASES[case])
    ids = np.random.default_rng(1).integers(0, hf.config.vocab_size, 41).tolist()
    model = flashmem.load(folder, dtype="f32", threads=2, max_context=64, prefill_chunk=chunk)
    check_prefill_and_decode(model, hf_logits(hf, ids), ids, f"{case}, prefill chunk {chunk}")


def test_gemma3_bf16_and_f16_kv_cache(tmp_path, monkeypatch):
    """bf16 weights rounded as stored, an f16 KV cache: within f16 error of HF."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_gemma3(folder)
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, 30).tolist()
    model = flashmem.load(folder, dtype="f32", threads=2, max_context=64, prefill_chunk=4, kv_dtype="f16")
    assert_close(model.logits(ids), hf_logits(hf, ids), 3e-3, "f16 KV cache")


@pytest.mark.parametrize("chunk", [None, 3])
def test_mistral_sliding_window_matches_hf(tmp_path, monkeypatch, chunk):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_mistral(folder)
    ids = np.random.default_rng(3).integers(0, 53, 33).tolist()
    model = flashmem.load(folder, dtype="f32", threads=2, max_context=64, prefill_chunk=chunk)
    assert model._engine.earliest_restart == 0  # nothing run yet
    check_prefill_and_decode(model, hf_logits(hf, ids), ids, f"mistral window 5, chunk {chunk}")


def test_ring_kv_cache_restarts(tmp_path, monkeypatch):
    """A ring holds the last window + chunk positions: restarting inside it gives the same logits,
    restarting before it raises naming the earliest start, and generate() falls back to a full
    prefill when its cached prefix is too far back."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_gemma3(folder, window=5)
    ids = np.random.default_rng(4).integers(2, 67, 40).tolist()
    ref = hf_logits(hf, ids)
    model = flashmem.load(folder, dtype="f32", threads=2, max_context=64, prefill_chunk=4)
    eng = model._engine
    eng.forward(np.asarray(ids, np.int32), 0)
    first = eng.earliest_restart
    assert 0 < first < len(ids)
    assert_close(eng.forward(np.asarray(ids[first:], np.int32), first), ref[-1], 1e-4, "restart at the earliest")
    with pytest.raises(ValueError, match=f"restart at 0 or at {first}"):
        eng.forward(np.asarray(ids[first - 1:], np.int32), first - 1)
    # generate: a prompt sharing a prefix that the rings no longer hold is prefilled from 0
    text = " ".join(f"w{i}" for i in ids)
    a = model.generate(text, max_new_tokens=4, reuse_cache=False).token_ids
    model.generate(text + " w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", max_new_tokens=8)
    b = model.generate(text, max_new_tokens=4)
    assert b.cached_tokens == 0 and a == b.token_ids


def test_gemma3_config_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    make_tiny_gemma3(folder)
    import json
    import os

    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    for key, value, match in [("layer_types", ["sliding_attention"], "layer_types"),
                              ("sliding_window", -3, "sliding_window"),
                              ("hidden_activation", "relu", "activation 'relu'"),
                              ("final_logit_softcapping", 30.0, "soft-capping")]:
        bad = dict(cfg, **{key: value})
        json.dump(bad, open(cfg_path, "w"))
        with pytest.raises(ValueError, match=match):
            flashmem.load(folder, dtype="f32", threads=1, max_context=32)
        monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / f"cache-{key}"))


def test_gemma3_config_of_transformers_4():
    """An HF Gemma 3 config.json as transformers 4 wrote it (google/gemma-3-270m's keys): the
    window pattern, the local rope base and the query scale come out as from transformers 5's."""
    from flashmem.checkpoints.config import rope_inv_freq
    from flashmem.loading import engine_config

    cfg = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
           "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
           "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
           "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 512,
           "_sliding_window_pattern": 6, "max_position_embeddings": 32768, "tie_word_embeddings": True,
           "flashmem": {"dtype": "f32", "ffn": {}}}
    c = engine_config(cfg, "config.json", 1024)
    assert c.layer_window == [0 if (i + 1) % 6 == 0 else 512 for i in range(18)]
    assert c.activation == "gelu_tanh" and c.qk_norm and c.post_norms
    assert c.attn_scale == pytest.approx(1 / 16) and c.embed_scale == pytest.approx(640 ** 0.5)
    local = np.float32(1) / np.power(np.float32(10000), np.arange(0, 256, 2, dtype=np.float32) / np.float32(256))
    np.testing.assert_array_equal(np.asarray(c.rope_inv_freq_local, np.float32), local)
    np.testing.assert_array_equal(np.asarray(c.rope_inv_freq, np.float32), rope_inv_freq(cfg, 256)[0])
    assert c.rope_inv_freq[1] < c.rope_inv_freq_local[1]  # base 1M: slower than the local 10k
    # the same with transformers 5's keys
    cfg5 = dict(cfg, layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    for k in ("rope_local_base_freq", "rope_theta", "rope_scaling", "_sliding_window_pattern"):
        cfg5.pop(k)
    c5 = engine_config(cfg5, "config.json", 1024)
    assert c5.layer_window == c.layer_window and c5.rope_inv_freq_local == c.rope_inv_freq_local
    assert c5.rope_inv_freq == c.rope_inv_freq


def test_batched_decode_with_rings_matches_hf(tmp_path, monkeypatch):
    """Three sequences of different lengths in three KV slots, decoded together (forward_batch)
    past the window many times over: each slot's rings wrap on their own, and every step's logits
    equal HF's for that sequence."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_gemma3(folder, **CASES["gemma3-odd"])
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, hf.config.vocab_size, n).tolist() for n in (40, 31, 45)]
    refs = [hf_logits(hf, s) for s in seqs]
    model = flashmem.load(folder, dtype="f32", threads=2, max_context=64, prefill_chunk=4, max_batch=3)
    eng = model._engine
    starts = [3, 9, 1]  # prompt lengths: the rest is decoded
    for slot, (s, n) in enumerate(zip(seqs, starts)):
        assert_close(eng.forward(np.asarray(s[:n], np.int32), 0, False, slot), refs[slot][n - 1], 1e-4,
                     f"slot {slot} prefill")
    pos = list(starts)
    while True:
        live = [b for b in range(3) if pos[b] < len(seqs[b])]
        if not live:
            break
        out = eng.forward_batch(np.asarray([seqs[b][pos[b]] for b in live], np.int32),
                                np.asarray(live, np.int32), np.asarray([pos[b] for b in live], np.int32))
        for row, b in enumerate(live):
            assert_close(out[row], refs[b][pos[b]], 1e-4, f"slot {b} position {pos[b]}")
            pos[b] += 1
    assert [eng.slot_length(b) for b in range(3)] == [len(s) for s in seqs]
