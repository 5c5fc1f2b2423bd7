"""Tiny random-weight Llama-family models (odd sizes) against HF transformers: logits of a
batched prefill and of step-by-step decode."""
import numpy as np
import pytest

import flashmem
from flashmem.checkpoints.safetensors_io import from_f32, to_f32

from conftest import assert_close, make_tiny_hf

torch = pytest.importorskip("torch")

CASES = {
    "gqa-untied": dict(heads=4, kv_heads=2, tied=False),
    "mha-tied": dict(heads=4, kv_heads=4, tied=True),
    "mqa-odd": dict(hidden=36, ff=50, heads=3, kv_heads=1, vocab=61),
    "qwen2-bias": dict(model_type="qwen2", heads=4, kv_heads=2),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def rounded_copy(model, dtype):
    """The HF model with its weights rounded to the storage dtype (computation stays f32)."""
    import copy

    m = copy.deepcopy(model)
    if dtype != "f32":
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.dim() == 2:  # matrices are stored in dtype; norms and biases stay f32
                    p.copy_(torch.from_numpy(to_f32(from_f32(p.numpy(), dtype), dtype)))
    return m


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_hf(tmp_path, monkeypatch, case, dtype):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = rounded_copy(make_tiny_hf(folder, **CASES[case]), dtype)
    vocab = hf.config.vocab_size
    model = flashmem.load(folder, dtype=dtype, threads=2, max_context=64)
    ids = np.random.default_rng(3).integers(0, vocab, 37).tolist()
    ref = hf_logits(hf, ids)
    assert_close(model.logits(ids), ref, 1e-4, f"{case}/{dtype} prefill")
    # decode: prefill 5 tokens, then one at a time through the KV cache
    eng = model._engine
    eng.forward(np.asarray(ids[:5], np.int32), 0)
    for t in range(5, len(ids)):
        step = eng.forward(np.asarray([ids[t]], np.int32), t)
        assert_close(step, ref[t], 1e-4, f"{case}/{dtype} decode step {t}")


def test_chunked_prefill_and_threads_agree(tmp_path, monkeypatch):
    """A prompt longer than one prefill chunk (256), 1 vs 2 threads: same logits."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_hf(folder, vocab=50)
    hf.config.max_position_embeddings = 600
    ids = np.random.default_rng(5).integers(0, 50, 300).tolist()
    m1 = flashmem.load(folder, threads=1, max_context=400)
    m2 = flashmem.load(folder, threads=2, max_context=400)
    a, b = m1.logits(ids), m2.logits(ids)
    assert_close(a, b, 1e-5, "1 vs 2 threads")
    assert_close(a, hf_logits(hf, ids), 1e-4, "chunked prefill vs HF")


def gguf_writer(path, hf):
    """A GGUF writer for the HF model's config: llama metadata and a byte-level tokenizer of its
    vocabulary size (one merge), ready for the tensors."""
    import gguf

    c = hf.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    from flashmem.checkpoints.gguf_file import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars[: c.vocab_size - 1] + [chars[0] + chars[1]]
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([f"{chars[0]} {chars[1]}"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    return w


def _write_tiny_gguf(path, hf, qtype_name):
    """Writes the HF model as a llama GGUF the way llama.cpp's converter does (Q/K rows permuted)."""
    import gguf

    c = hf.config
    w = gguf_writer(path, hf)

    def permute(x, n_head):
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in hf.state_dict().items():
        x = p.numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            gname = f"blk.{i}.{sub[rest]}.weight"
            if rest == "self_attn.q_proj":
                x = permute(x, c.num_attention_heads)
            elif rest == "self_attn.k_proj":
                x = permute(x, c.num_key_value_heads)
        else:
            gname = names[name]
        if x.ndim == 2 and qtype_name != "F32":
            w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_gguf_path_matches_hf_folder(tmp_path, monkeypatch, qtype):
    """Same weights through GGUF (permuted Q/K, quantized) and through the HF folder."""
    import gguf

    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    hf = make_tiny_hf(folder, hidden=64, ff=256, heads=4, kv_heads=2, vocab=80)  # d_ff 4x d_model: down's rows are long
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    _write_tiny_gguf(path, hf, qtype)
    if qtype != "F32":  # the reference sees the same rounding: dequantize(quantize(w))
        qt = getattr(gguf.GGMLQuantizationType, qtype)
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qt), qt)))
    model = flashmem.load(path, dtype="f32", threads=2, max_context=64)
    ids = np.random.default_rng(9).integers(0, 80, 21).tolist()
    assert_close(model.logits(ids), hf_logits(hf, ids), 1e-4, f"gguf {qtype}")
    if qtype in ("F32", "F16", "BF16"):  # kept as stored: the FFN as float matrices, down's rows d_ff long
        kept = flashmem.load(path, dtype="gguf", threads=2, max_context=64, kv_dtype="f32")
        assert_close(kept.logits(ids), hf_logits(hf, ids), 1e-4, f"gguf {qtype} kept")


def test_sharded_bf16_checkpoint(tmp_path, monkeypatch):
    """A HF folder saved in bf16 and sharded (index.json): converted with its own dtype by default."""
    import transformers

    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(4)
    cfg = transformers.LlamaConfig(vocab_size=90, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64, initializer_range=0.15)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = str(tmp_path / "sharded")
    import copy

    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    # reference: f32 compute over the bf16-rounded matrices (a bf16 HF model would also round
    # its rotary inv_freq buffer, which is not a weight)
    from conftest import write_word_tokenizer

    write_word_tokenizer(folder, 90)
    import os

    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    model = flashmem.load(folder, threads=2)
    assert model.dtype == "bf16"
    ids = list(range(3, 40))
    assert_close(model.logits(ids), hf_logits(rounded_copy(hf, "bf16"), ids), 1e-4, "sharded bf16")


def test_mistral(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(6)
    cfg = transformers.MistralConfig(vocab_size=70, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                     max_position_embeddings=64, sliding_window=None, initializer_range=0.15)
    hf = transformers.MistralForCausalLM(cfg).eval()
    folder = str(tmp_path / "mistral")
    hf.save_pretrained(folder, safe_serialization=True)
    from conftest import write_word_tokenizer

    write_word_tokenizer(folder, 70)
    model = flashmem.load(folder, threads=2)
    ids = list(range(2, 30))
    assert_close(model.logits(ids), hf_logits(hf, ids), 1e-4, "mistral")


def test_f16_kv_cache(tiny_llama, tmp_path, monkeypatch):
    """kv_dtype="f16" stores keys and values as f16: half the cache, logits within f16 rounding."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder, hf = tiny_llama
    ids = np.random.default_rng(2).integers(0, 97, 30).tolist()
    a = flashmem.load(folder, dtype="f32", threads=2, max_context=64)
    b = flashmem.load(folder, dtype="f32", threads=2, max_context=64, kv_dtype="f16")
    assert_close(b.logits(ids), a.logits(ids), 3e-3, "f16 KV cache")
    long_f32 = flashmem.load(folder, dtype="f32", threads=1, max_context=1024)
    long_f16 = flashmem.load(folder, dtype="f32", threads=1, max_context=1024, kv_dtype="f16")
    kv_f32 = 2 * 2 * 1024 * 20 * 4  # keys and values: layers, positions, kv_dim, f32 (the f32 scratch of a
    assert long_f32._engine.state_bytes - long_f16._engine.state_bytes == kv_f32 // 2  # chunk's new ones: both)
    r1, r2 = a.generate(ids[:5], max_new_tokens=8), b.generate(ids[:5], max_new_tokens=8)
    assert r1.token_ids[:3] == r2.token_ids[:3]
    with pytest.raises(ValueError, match="kv_dtype"):
        flashmem.load(folder, dtype="f32", kv_dtype="bf16")
