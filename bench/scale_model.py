"""A 7B-class test model for the limited-DRAM benchmarks: Llama-3-8B shapes (d_model 4096, d_ff
14336, 32 layers, 32 query heads, 8 KV heads, head_dim 128, untied LM head) with SmolLM2's
vocabulary and tokenizer (49152 tokens), every weight Q4_0 with random bytes everywhere: no block
repeats, so a deduplicating virtual disk cannot serve the reads from its own cache. Norm weights
are ones; each matrix's block scales are drawn so that its outputs keep unit scale
(d ~ N(0, 1 / (4.6 sqrt(K))), 4.6 the spread of a q4_0 weight's q - 8), so the residual stream stays
finite through the 32 layers.

Written once as a GGUF that llama.cpp loads (SmolLM2's tokenizer metadata copied), then converted
once to a flashmem folder (`flashmem.convert`, dtype "gguf": the same Q4_0 blocks), both into a
cache folder that later runs reuse:

    python bench/scale_model.py [--out DIR]   # prints the two paths

DIR defaults to $FLASHMEM_CACHE/scale (or ~/.cache/flashmem/scale). About 4.2 GB for the GGUF
and as much again for the folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

SHAPES = dict(d_model=4096, d_ff=14336, layers=32, heads=32, kv_heads=8, rope_theta=500000.0)
NAME = "llama3-8b-shapes-smollm2-vocab-q4_0"


def default_dir() -> str:
    base = os.environ.get("FLASHMEM_CACHE", os.path.expanduser("~/.cache/flashmem"))
    return os.path.join(base, "scale")


def random_q4_0(rng, rows: int, cols: int) -> np.ndarray:
    """(rows, cols / 32 * 18) bytes of Q4_0 blocks: random nibbles, scales N(0, 1 / (4.6 sqrt(cols)))."""
    import gguf

    nb = cols // 32
    raw = rng.integers(0, 256, (rows, nb, 18), dtype=np.uint8)
    d = (rng.standard_normal((rows, nb)) / (4.6 * np.sqrt(cols))).astype(np.float16)
    raw[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q4_0] == (32, 18)
    return raw.reshape(rows, nb * 18)


def tensor_specs(vocab: int, s=SHAPES) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
    """(name, (rows, cols) or (n,), 'q4_0' or 'f32') in llama.cpp's names and order."""
    d, ff, kv = s["d_model"], s["d_ff"], s["kv_heads"] * (s["d_model"] // s["heads"])
    specs = [("token_embd.weight", (vocab, d), "q4_0")]
    for l in range(s["layers"]):
        b = f"blk.{l}."
        specs += [(b + "attn_norm.weight", (d,), "f32"), (b + "attn_q.weight", (d, d), "q4_0"),
                  (b + "attn_k.weight", (kv, d), "q4_0"), (b + "attn_v.weight", (kv, d), "q4_0"),
                  (b + "attn_output.weight", (d, d), "q4_0"), (b + "ffn_norm.weight", (d,), "f32"),
                  (b + "ffn_gate.weight", (ff, d), "q4_0"), (b + "ffn_up.weight", (ff, d), "q4_0"),
                  (b + "ffn_down.weight", (d, ff), "q4_0")]
    specs += [("output_norm.weight", (d,), "f32"), ("output.weight", (vocab, d), "q4_0")]
    return specs


def write_gguf(path: str, tokenizer_gguf: str, seed: int = 0, s=SHAPES) -> str:
    """The GGUF at `path` (kept if it exists), tensors streamed to disk one at a time."""
    import gguf

    if os.path.isfile(path):
        return path
    src = gguf.GGUFReader(tokenizer_gguf)
    vocab = int(src.fields["llama.vocab_size"].contents())
    w = gguf.GGUFWriter(path + ".part", "llama")
    for key, field in src.fields.items():  # the tokenizer and its chat template
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            w.add_key_value(key, field.contents(), vtype,
                            sub_type=field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    w.add_name(NAME)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_vocab_size(vocab)
    w.add_context_length(8192)
    w.add_embedding_length(s["d_model"])
    w.add_feed_forward_length(s["d_ff"])
    w.add_block_count(s["layers"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_rope_dimension_count(s["d_model"] // s["heads"])
    w.add_rope_freq_base(s["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    specs = tensor_specs(vocab, s)
    for name, shape, kind in specs:
        if kind == "f32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * shape[0])
        else:
            rows, cols = shape
            w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18,
                              raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, kind in specs:
        w.write_tensor_data(np.ones(shape, np.float32) if kind == "f32" else random_q4_0(rng, *shape))
    w.close()
    os.replace(path + ".part", path)
    return path


def build(out: str | None = None) -> tuple[str, str]:
    """(GGUF path, flashmem folder), each made once."""
    import flashmem
    from flashmem.checkpoints.convert import FORMAT_VERSION
    from flashmem.checkpoints.default_model import default_gguf

    out = out or default_dir()
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, NAME + ".gguf")
    if not os.path.isfile(path):
        t0 = time.perf_counter()
        write_gguf(path, default_gguf())
        print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    folder = os.path.join(out, NAME)
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config) and json.load(open(config))["flashmem"]["format_version"] != FORMAT_VERSION:
        shutil.rmtree(folder)  # written by an older flashmem: convert again (split down columns since 3)
    if not os.path.isfile(config):
        t0 = time.perf_counter()
        flashmem.convert(path, folder, dtype="gguf")
        print(f"converted to {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path, folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="cache folder (default $FLASHMEM_CACHE/scale)")
    gguf_path, folder = build(ap.parse_args().out)
    print(gguf_path)
    print(folder)


if __name__ == "__main__":
    main()
