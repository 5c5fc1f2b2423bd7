"""The child of bench/limited_dram.py: one engine, one generation, one JSON line on stdout.

    python bench/limited_dram_worker.py --mode MODE --model PATH --prompt '[ids]' [--new-tokens 48] ...
    python bench/limited_dram_worker.py --prepare --gguf FILE --dtypes gguf,f16 --prompt-tokens 64

The parent starts it inside a memory cgroup (the process is moved there by a shell that then
execs Python, so everything this process allocates or maps is charged to the group). It imports
only what its engine needs (no matplotlib, no flashmem for llama.cpp), so that its footprint is
the engine's.

Modes:
  llamacpp            llama_cpp.Llama, mmap'd GGUF, llama.cpp's default weight repacking
  llamacpp_norepack   the same with model_params.use_extra_bufts = False (no CPU_REPACK buffer)
  flashmem_dram       flashmem.load(dtype="gguf"): every weight in the engine's own DRAM buffers
  flashmem_flash_sNN  flashmem.load(offload="flash", sparsity=NN/100, dram_budget="auto" or
                      --dram-budget): the FFN streamed from the model folder with direct I/O; "auto"
                      reads the budget from the cgroup's limit less its usage
  flashmem_all_sNN    the same with offload="all": the attention matrices, embeddings and LM head
                      are read from the folder when a token needs them too

The result line starts with RESULT_TAG so the parent finds it among anything a library prints.
A run that raises (e.g. a dtype whose conversion writes no FFN bundles, a budget below the
resident minimum) prints status "error" with the message and exits 3; an OOM kill prints nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

RESULT_TAG = "LIMITED_DRAM_RESULT "
WARMUP_TOKENS = 4  # an untimed generation first: graphs built, pages touched, neuron cache filled


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, MiB; counts the touched pages of an mmap'd file)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def emit(d: dict) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(d) + "\n")
    sys.stdout.flush()


# --- llama.cpp ------------------------------------------------------------------------------
def llamacpp_logs():
    """Collects llama.cpp's log (buffer sizes, repacking) without printing it."""
    import ctypes

    import llama_cpp.llama_cpp as L

    lines = []

    @L.llama_log_callback
    def cb(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    L.llama_log_set(cb, ctypes.c_void_p(0))
    return lines, cb  # keep cb referenced while llama.cpp may call it


def no_extra_bufts():
    """llama-cpp-python 0.3.36's Llama() has no argument for use_extra_bufts (its **kwargs swallows
    an unknown one silently), and builds its llama_model_params from llama_model_default_params()
    looked up on the llama_cpp.llama_cpp module at call time: wrap that function."""
    import llama_cpp.llama_cpp as L

    orig = L.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    L.llama_model_default_params = params


def run_llamacpp(a, ids: list[int], repack: bool) -> dict:
    import numpy as np
    from llama_cpp import Llama

    log, _cb = llamacpp_logs()
    if not repack:
        no_extra_bufts()
    t0 = time.perf_counter()
    llm = Llama(model_path=a.model, n_ctx=a.max_context, n_batch=a.n_batch, n_ubatch=a.n_batch, n_threads=a.threads,
                n_threads_batch=a.threads, use_mmap=True, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def gen(n):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        while True:
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            out.append(tok)
            if len(out) == n:
                break
            llm.eval([tok])
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1

    gen(min(WARMUP_TOKENS, a.new_tokens))
    toks, prefill_s, decode_s = gen(a.new_tokens)
    text = "".join(log)
    buffers = {}
    for line in text.splitlines():
        if "buffer size" in line and "=" in line:
            key = line.split(":", 1)[-1].split("buffer size")[0].strip()
            try:
                buffers[key] = float(line.split("=")[1].split()[0])
            except (IndexError, ValueError):
                pass
    return {"decode_tok_s": (len(toks) - 1) / decode_s if len(toks) > 1 else 0.0,
            "prefill_tok_s": len(ids) / prefill_s, "load_s": load_s, "tokens": toks,
            "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
            "llama_buffers_mib": buffers,  # from llama.cpp's log: model (CPU_Mapped / CPU_REPACK), KV, compute
            "repack_refused": "cannot be used with preferred buffer type CPU_REPACK" in text}


# --- flashmem -------------------------------------------------------------------------------
def run_flashmem(a, ids: list[int], sparsity: float | None, offload: str = "flash") -> dict:
    import flashmem

    kw = dict(dtype=a.dtype, threads=a.threads, max_context=a.max_context)
    if sparsity is not None:
        kw.update(offload=offload, sparsity=sparsity, dram_budget=a.dram_budget)
    t0 = time.perf_counter()
    m = flashmem.load(a.model, **kw)
    load_s = time.perf_counter() - t0
    m.generate(ids, max_new_tokens=min(WARMUP_TOKENS, a.new_tokens), eos_token_id=[], reuse_cache=False)
    r = m.generate(ids, max_new_tokens=a.new_tokens, eos_token_id=[], reuse_cache=False)
    out = {"decode_tok_s": r.decode_tokens_per_s, "prefill_tok_s": r.prefill_tokens_per_s, "load_s": load_s,
           "tokens": r.token_ids, "owned_mb": m.owned_bytes / 2 ** 20, "dtype": m.dtype}
    if sparsity is not None:
        out["dram_budget_mb"] = (m.dram_budget or 0) / 2 ** 20
        out["flash"] = r.flash
        out["bytes_read_per_token"] = r.flash.get("bytes_read_per_token")
    return out


def one(a) -> int:
    ids = json.loads(a.prompt)
    base = {"mode": a.mode, "prompt_tokens": len(ids), "pid": os.getpid()}
    try:
        if a.mode in ("llamacpp", "llamacpp_norepack"):
            r = run_llamacpp(a, ids, repack=a.mode == "llamacpp")
        elif a.mode == "flashmem_dram":
            r = run_flashmem(a, ids, None)
        elif a.mode.startswith("flashmem_flash_s"):
            r = run_flashmem(a, ids, int(a.mode.removeprefix("flashmem_flash_s")) / 100)
        elif a.mode.startswith("flashmem_all_s"):
            r = run_flashmem(a, ids, int(a.mode.removeprefix("flashmem_all_s")) / 100, offload="all")
        else:
            raise ValueError(f"unknown mode {a.mode!r}")
    except Exception as e:  # noqa: BLE001 - the parent records it for this mode and limit
        emit({**base, "status": "error", "message": f"{type(e).__name__}: {e}", "peak_rss_mb": peak_rss_mb(),
              "traceback": traceback.format_exc()[-2000:]})
        return 3
    emit({**base, "status": "ok", "new_tokens": len(r["tokens"]), "peak_rss_mb": peak_rss_mb(), **r})
    return 0


# --- preparation (no cgroup limit) ----------------------------------------------------------------
def prepare(a) -> int:
    """Converts the GGUF once per dtype (so no run converts inside a cgroup), and tokenizes the
    prompt. Prints {"folders": {dtype: folder or None}, "errors": {...}, "prompt": ids, "isa": ...}."""
    from flashmem import _core
    from flashmem.checkpoints.store import converted_folder
    from flashmem.tokenizer import Tokenizer

    folders, errors = {}, {}
    for dt in a.dtypes.split(","):
        try:
            folders[dt] = converted_folder(a.gguf, dt)
        except Exception as e:  # noqa: BLE001
            folders[dt], errors[dt] = None, f"{type(e).__name__}: {e}"
    tok_folder = next((f for f in folders.values() if f), None) or converted_folder(a.gguf, "gguf")
    with open(a.text, encoding="utf-8") as f:
        text = f.read(200_000)
    ids = Tokenizer(tok_folder).encode(text)[: a.prompt_tokens]
    emit({"folders": folders, "errors": errors, "prompt": ids, "isa": _core.isa()})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode")
    ap.add_argument("--model", help="GGUF file (llama.cpp) or converted flashmem folder / GGUF (flashmem)")
    ap.add_argument("--dtype", default="gguf", help="flashmem dtype")
    ap.add_argument("--prompt", help="prompt token ids, JSON")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--n-batch", type=int, default=512, help="llama.cpp n_batch (and n_ubatch)")
    ap.add_argument("--dram-budget", default="auto", help="flashmem dram_budget of the flash modes (\"auto\" or bytes)")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--gguf")
    ap.add_argument("--dtypes", default="gguf")
    ap.add_argument("--text")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    return prepare(a) if a.prepare else one(a)


if __name__ == "__main__":
    sys.exit(main())
