"""Decode and prefill speed on SmolLM2-135M and Gemma 3 270M, flashmem beside llama.cpp
(llama-cpp-python) and HF transformers, each on the same GGUF file in one run:

- F32 and F16: the shipped SmolLM2 Q4_1 file dequantized (flashmem converts it with dtype f32 / f16);
- the shipped Q4_1, and Q8_0, Q4_0, Q4_K_M made from the F16 file by llama.cpp's own quantizer
  (llama_cpp.llama_model_quantize): flashmem keeps the blocks as they are (dtype "gguf");
- gemma3_q4_k_m: Gemma 3 270M as published in Q4_K_M (Q5_0, Q4_K, Q6_K and Q8_0 tensors; its
  262k-row Q8_0 embedding table is also its LM head), in its own formats.

    python bench/decode.py [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--repeats 2] [--rounds 3]

Every engine runs in a subprocess of its own (one at a time), so its peak resident memory
(VmHWM, which counts the pages of a memory-mapped model it touched) is its own. Each first
decodes greedily from the same prompt; its tokens are compared with flashmem's on the same file
(`same_tokens_as_flashmem`: how many of the first new tokens are equal). Then prefill and decode
are timed `repeats` times. The whole sweep runs `rounds` times, engines and files interleaved,
so that a noisy minute on this shared machine falls on every engine alike; the medians of all
runs are reported. Writes bench/results/decode.json and .png.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare, write_dequantized_gguf  # noqa: E402

QUANTIZED = ("q8_0", "q4_0", "q4_k_m")  # made from the F16 file, beside the shipped q4_1


def run_flashmem(gguf, dtype, threads, prompt, n_new):
    import flashmem

    m = flashmem.load(gguf, dtype=dtype, threads=threads, max_context=1024)

    def once():
        r = m.generate(prompt, max_new_tokens=n_new, eos_token_id=[], reuse_cache=False)  # prefill every time
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


def one(a):
    """The child: one engine on one file; prints its figures as JSON."""
    prompt = json.loads(a.prompt)
    if a.engine == "flashmem":
        once = run_flashmem(a.file, a.dtype, a.threads, prompt, a.new_tokens)
    elif a.engine == "llama.cpp":
        once = run_llamacpp(a.file, a.threads, prompt, a.new_tokens)
    else:
        once = run_hf(a.file, a.dtype, a.threads, prompt, a.new_tokens)
    toks, _, _ = once()  # warm-up and the tokens to compare
    runs = [once() for _ in range(a.repeats)]
    print(json.dumps({"tokens": toks, "prefill_runs": [r[1] for r in runs], "decode_runs": [r[2] for r in runs],
                      "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def quantize_with_llamacpp(src_f16: str, dst: str, kind: str) -> str:
    import llama_cpp

    if os.path.isfile(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    if llama_cpp.llama_model_quantize(src_f16.encode(), (dst + ".part").encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dst}")
    os.replace(dst + ".part", dst)
    return dst


def plot(rows, path, subtitle=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(13, 10))
    labels = [f"{r['engine']}\n{r['file']}" for r in rows]
    colors = {"flashmem": "tab:blue", "llama.cpp": "tab:orange", "transformers": "tab:gray"}
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s (median, higher is better)"),
                           (axes[1], "prefill_tok_s", "prefill tok/s (median, higher is better)"),
                           (axes[2], "peak_rss_mb", "peak resident memory, MB (lower is better)")):
        vals = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), vals, color=[colors[r["engine"]] for r in rows])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(f"SmolLM2-135M {title}", fontsize=10)
    fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default="flashmem,llama.cpp,transformers")
    ap.add_argument("--files", default="f32,f16,q4_1," + ",".join(QUANTIZED) + ",gemma3_q4_k_m")
    ap.add_argument("--one", dest="engine", help=argparse.SUPPRESS)  # the child's arguments
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.engine:
        return one(a)

    import flashmem
    from flashmem.checkpoints.default_model import default_gguf, gemma3_270m_gguf
    from flashmem.checkpoints.store import store_dir

    src = default_gguf()
    files = {"q4_1": src, "gemma3_q4_k_m": gemma3_270m_gguf()}
    for dt in ("f32", "f16"):
        files[dt] = write_dequantized_gguf(src, os.path.join(store_dir(), f"SmolLM2-135M-Instruct.{dt.upper()}.gguf"), dt)
    engines = a.engines.split(",")
    try:
        import llama_cpp  # noqa: F401

        for q in QUANTIZED:
            files[q] = quantize_with_llamacpp(files["f16"], os.path.join(store_dir(), f"SmolLM2-135M-Instruct.{q.upper()}.gguf"), q)
    except ImportError:
        print("llama-cpp-python not installed: skipping llama.cpp and the files its quantizer makes", file=sys.stderr)
        engines = [e for e in engines if e != "llama.cpp"]
    # the same text as each model's tokens
    prompts = {path: flashmem.load(path, threads=1, max_context=16).tokenizer.encode(shakespeare())[: a.prompt_tokens]
               for path in {src, files["gemma3_q4_k_m"]}}
    for name, path in files.items():  # into the store first: a child's peak memory is its run's, not a conversion's
        if name in a.files.split(",") and "flashmem" in engines:
            flashmem.load(path, dtype=name if name in ("f32", "f16") else "gguf", threads=1, max_context=16)

    runs = {}  # (file, engine) -> the child's figures, every round
    for _ in range(a.rounds):
        for name in a.files.split(","):
            if name not in files:
                continue
            dtype = name if name in ("f32", "f16") else "gguf"
            for engine in engines:
                if engine == "transformers" and dtype == "gguf":
                    continue  # transformers dequantizes every GGUF: its f32 and f16 rows stand for it
                cmd = [sys.executable, __file__, "--one", engine, "--file", files[name], "--dtype", dtype,
                       "--threads", str(a.threads), "--new-tokens", str(a.new_tokens), "--repeats", str(a.repeats),
                       "--prompt", json.dumps(prompts.get(files[name], prompts[src]))]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{engine} on {name} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault((name, engine), []).append(r)
                print(f"{engine:>12} {name:>6}: decode {median(r['decode_runs']):6.1f} tok/s", flush=True)

    rows = []
    for (name, engine), rs in runs.items():
        reference = runs.get((name, "flashmem"), rs)[0]["tokens"]
        toks = rs[0]["tokens"]
        same = next((i for i, (x, y) in enumerate(zip(toks, reference)) if x != y), len(toks))
        decode = [x for r in rs for x in r["decode_runs"]]
        prefill = [x for r in rs for x in r["prefill_runs"]]
        row = {"engine": engine, "file": name, "dtype": name if name in ("f32", "f16") else "gguf",
               "threads": a.threads, "prefill_tok_s": median(prefill), "decode_tok_s": median(decode),
               "decode_runs": decode, "prefill_runs": prefill, "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
               "same_tokens_as_flashmem": same}
        rows.append(row)
        print(f"{engine:>12} {name:>6}: prefill {row['prefill_tok_s']:7.1f} tok/s  decode {row['decode_tok_s']:6.1f} "
              f"tok/s  peak RSS {row['peak_rss_mb']:5.0f} MB  (first {same}/{len(toks)} tokens equal flashmem's)")

    ratios = {}
    for name in files:
        fm = next((r for r in rows if r["engine"] == "flashmem" and r["file"] == name), None)
        for r in rows:
            if fm and r["file"] == name and r["engine"] != "flashmem":
                ratios[f"{name} flashmem/{r['engine']} decode"] = fm["decode_tok_s"] / r["decode_tok_s"]
                ratios[f"{name} flashmem/{r['engine']} prefill"] = fm["prefill_tok_s"] / r["prefill_tok_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    from flashmem import _core

    out = {"benchmark": "decode", "models": ["SmolLM2-135M-Instruct", "Gemma 3 270M"],
           "files": {k: os.path.basename(v) for k, v in files.items()}, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "threads": a.threads, "repeats": a.repeats,
           "rounds": a.rounds,
           "isa": _core.isa(), "machine": machine(), "rows": rows, "ratios": ratios}
    save("decode", out)
    plot(rows, RESULTS / "decode.png",
         f"{a.threads} threads, {a.prompt_tokens}-token prompt, {a.new_tokens} new tokens, median of "
         f"{a.repeats * a.rounds} runs in {a.rounds} interleaved rounds, "
         f"kernels {_core.isa()}; every engine on the same file, in its own process")
    print(f"wrote {RESULTS / 'decode.json'} and decode.png")


if __name__ == "__main__":
    main()
