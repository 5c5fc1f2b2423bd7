"""Decode and prefill speed on SmolLM2-135M: flashmem vs HF transformers vs llama-cpp-python,
side by side in one run, same weights (the Q4_1 GGUF dequantized) at F32 and F16.

    python bench/decode.py [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--repeats 3]

Each engine first decodes greedily from the same prompt; its tokens are compared with
flashmem's F32 tokens (reported as `agree_with_flashmem_f32`). Then prefill and decode are
timed `repeats` times and the medians reported. Writes bench/results/decode.json and .png.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare, write_dequantized_gguf  # noqa: E402


def run_flashmem(gguf, dtype, threads, prompt, n_new):
    import flashmem

    m = flashmem.load(gguf, dtype=dtype, threads=threads, max_context=1024)

    def once():
        r = m.generate(prompt, max_new_tokens=n_new, eos_token_id=[])
        return r.token_ids, r.prefill_tokens_per_s, r.decode_tokens_per_s

    return once


def run_llamacpp(gguf, threads, prompt, n_new):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)

    n_vocab = llm.n_vocab()

    def last_logits():  # llama-cpp-python keeps no scores without logits_all; read the context's
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(last_logits()))
            out.append(tok)
            if len(out) == n_new:
                break
            llm.eval([tok])
        t2 = time.perf_counter()
        return out, len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1)

    return once


def run_hf(gguf, dtype, threads, prompt, n_new):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    d, f = os.path.split(gguf)
    torch_dtype = torch.float16 if dtype == "f16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch_dtype).eval()

    @torch.no_grad()
    def once():
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        t1 = time.perf_counter()
        past, toks = out.past_key_values, []
        for _ in range(n_new):
            tok = int(out.logits[0, -1].float().argmax())
            toks.append(tok)
            if len(toks) == n_new:
                break
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
        t2 = time.perf_counter()
        return toks, len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1)

    return once


def plot(rows, path, subtitle=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [f"{r['engine']}\n{r['dtype']}" for r in rows]
    colors = {"flashmem": "tab:blue", "llama.cpp": "tab:orange", "transformers": "tab:gray"}
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s", "prefill tok/s")):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=[colors[r["engine"]] for r in rows])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(f"SmolLM2-135M {title} (median, higher is better)")
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def subtitle(out):
    return (f"{out['threads']} threads, {out['prompt_tokens']}-token prompt, {out['new_tokens']} new tokens, "
            f"median of {out['repeats']}, kernels {out['isa']}; same dequantized Q4_1 weights in every engine")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default="flashmem,llama.cpp,transformers")
    a = ap.parse_args()

    import flashmem
    from flashmem.checkpoints.default_model import default_gguf
    from flashmem.checkpoints.store import store_dir

    src = default_gguf()
    ggufs = {dt: write_dequantized_gguf(src, os.path.join(store_dir(), f"SmolLM2-135M-Instruct.{dt.upper()}.gguf"), dt)
             for dt in ("f32", "f16")}
    tok = flashmem.load(src, dtype="f32", threads=1, max_context=256).tokenizer
    prompt = tok.encode(shakespeare())[: a.prompt_tokens]
    engines = a.engines.split(",")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python not installed: skipping llama.cpp", file=sys.stderr)
        engines = [e for e in engines if e != "llama.cpp"]

    rows, reference = [], None
    for dtype in ("f32", "f16"):
        for engine in engines:
            if engine == "flashmem":
                once = run_flashmem(src, dtype, a.threads, prompt, a.new_tokens)
            elif engine == "llama.cpp":
                once = run_llamacpp(ggufs[dtype], a.threads, prompt, a.new_tokens)
            else:
                once = run_hf(src, dtype, a.threads, prompt, a.new_tokens)
            toks, _, _ = once()  # warm-up and correctness check
            if reference is None:
                reference = toks
            agree = next((i for i, (x, y) in enumerate(zip(toks, reference)) if x != y), len(toks))
            runs = [once() for _ in range(a.repeats)]
            row = {"engine": engine, "dtype": dtype, "threads": a.threads,
                   "prefill_tok_s": median([r[1] for r in runs]), "decode_tok_s": median([r[2] for r in runs]),
                   "decode_runs": [r[2] for r in runs], "prefill_runs": [r[1] for r in runs],
                   "agree_with_flashmem_f32": agree}
            rows.append(row)
            del once  # free this engine (and its threads) before the next one runs
            gc.collect()
            print(f"{engine:>12} {dtype}: prefill {row['prefill_tok_s']:7.1f} tok/s  decode {row['decode_tok_s']:6.1f} "
                  f"tok/s  (first {agree}/{len(toks)} tokens equal flashmem f32)", flush=True)

    ratios = {}
    for dtype in ("f32", "f16"):
        fm = next(r for r in rows if r["engine"] == "flashmem" and r["dtype"] == dtype)
        for r in rows:
            if r["dtype"] == dtype and r["engine"] != "flashmem":
                ratios[f"{dtype} flashmem/{r['engine']} decode"] = fm["decode_tok_s"] / r["decode_tok_s"]
                ratios[f"{dtype} flashmem/{r['engine']} prefill"] = fm["prefill_tok_s"] / r["prefill_tok_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    from flashmem import _core

    out = {"benchmark": "decode", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized)",
           "prompt_tokens": len(prompt), "new_tokens": a.new_tokens, "threads": a.threads, "repeats": a.repeats,
           "isa": _core.isa(), "machine": machine(), "rows": rows, "ratios": ratios}
    save("decode", out)
    plot(rows, RESULTS / "decode.png", subtitle(out))
    print(f"wrote {RESULTS / 'decode.json'} and decode.png")


if __name__ == "__main__":
    main()
