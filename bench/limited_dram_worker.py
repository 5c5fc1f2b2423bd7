"""The child of bench/limited_dram.py: one engine, one generation, one JSON line on stdout.

    python bench/limited_dram_worker.py --mode MODE --model PATH --prompt '[ids]' [--new-tokens 48] ...
    python bench/limited_dram_worker.py --prepare --gguf FILE --dtypes gguf,f16 --prompt-tokens 64
    python bench/limited_dram_worker.py --make-trace OUT.npy --model FOLDER --sparsity 0.5 --steps N --text FILE

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
  ..._sNN_hot         either, with the neuron cache's eviction="hot" (keeps the neurons picked most
                      often) instead of the default "lru"
  ..._noahead         either, with read_ahead=0: no neuron read a layer ahead (the default reads
                      the likeliest eighth of the next layer's while a layer computes)
With --trace FILE.npy a sparse mode replays those selections ((steps, layers, k) neuron ids,
make_trace) instead of its predictor's: the model is loaded at the mode's sparsity with the
folder's predictor (a random one on random weights, limited_dram.write_random_predictor), which
holds its DRAM and scores every token as a fitted one would, and the trace is set before the
first token (the trace array is loaded before the model, so that dram_budget "auto" leaves room
for the engine's copy of it). Beside FILE.npy, FILE.ahead.npy (make_trace) holds what the
predictor a layer ahead reads, replayed with it.

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


def disk_read_bytes() -> int:
    """Bytes this process has had read from storage (/proc/self/io read_bytes: page-cache misses
    and direct reads, every thread)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


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
        read0 = disk_read_bytes()
        out = []
        while True:
            tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
            out.append(tok)
            if len(out) == n:
                break
            llm.eval([tok])
        t2 = time.perf_counter()
        return out, t1 - t0, t2 - t1, disk_read_bytes() - read0

    gen(min(WARMUP_TOKENS, a.new_tokens))
    toks, prefill_s, decode_s, decode_read = gen(a.new_tokens)
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
            # what the kernel read from the disk for the decode steps (page faults of the mapped file)
            "disk_read_per_token": decode_read / (len(toks) - 1) if len(toks) > 1 else None,
            "use_extra_bufts": bool(llm.model_params.use_extra_bufts),
            "llama_buffers_mib": buffers,  # from llama.cpp's log: model (CPU_Mapped / CPU_REPACK), KV, compute
            "repack_refused": "cannot be used with preferred buffer type CPU_REPACK" in text}


# --- flashmem -------------------------------------------------------------------------------
def flash_mode(mode: str):
    """(offload, sparsity in %, eviction) of a mode flashmem_{flash|all}_sNN[_hot][_noahead]; None for
    others. _noahead: read_ahead=0 (nothing read a layer ahead; see read_ahead_of)."""
    for offload in ("flash", "all"):
        rest = mode.removeprefix(f"flashmem_{offload}_s").removesuffix("_noahead")
        if rest == mode:
            continue
        nn, _, eviction = rest.partition("_")
        if nn.isdigit() and eviction in ("", "hot"):
            return offload, int(nn), eviction or "lru"
    return None


def read_ahead_of(mode: str):
    """load()'s read_ahead for a flash mode: 0 with the _noahead suffix, else the default (None)."""
    return 0 if mode.endswith("_noahead") else None


def run_flashmem(a, ids: list[int], sparsity: float | None, offload: str = "flash", eviction: str = "lru",
                 read_ahead=None) -> dict:
    import flashmem

    kw = dict(dtype=a.dtype, threads=a.threads, max_context=a.max_context)
    trace = ahead = None
    if sparsity is not None:
        if sparsity > 0 and a.trace:
            import numpy as np

            trace = np.load(a.trace)  # the trace picks; the folder's predictor still runs (its cost)
            if read_ahead != 0 and os.path.isfile(ahead_path(a.trace)):
                ahead = np.load(ahead_path(a.trace))
        kw.update(offload=offload, sparsity=sparsity, dram_budget=a.dram_budget, eviction=eviction,
                  read_ahead=read_ahead)
    t0 = time.perf_counter()
    m = flashmem.load(a.model, **kw)
    load_s = time.perf_counter() - t0
    if trace is not None:
        m._engine.set_trace(trace, score=True, ahead=ahead)
        trace = ahead = None  # the engine holds its copies
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
        elif flash_mode(a.mode):
            offload, nn, eviction = flash_mode(a.mode)
            r = run_flashmem(a, ids, nn / 100, offload=offload, eviction=eviction, read_ahead=read_ahead_of(a.mode))
        else:
            raise ValueError(f"unknown mode {a.mode!r}")
    except Exception as e:  # noqa: BLE001 - the parent records it for this mode and limit
        emit({**base, "status": "error", "message": f"{type(e).__name__}: {e}", "peak_rss_mb": peak_rss_mb(),
              "traceback": traceback.format_exc()[-2000:]})
        return 3
    emit({**base, "status": "ok", "new_tokens": len(r["tokens"]), "peak_rss_mb": peak_rss_mb(), **r})
    return 0


# --- preparation (no cgroup limit) ----------------------------------------------------------------
def ahead_path(trace: str) -> str:
    """Where make_trace writes the trace's picks a layer ahead."""
    return trace.removesuffix(".npy") + ".ahead.npy"


def make_trace(a) -> int:
    """Real predictor selections for a large model that has no predictor of its own (the 7B-class
    test model's weights are random): SmolLM2's picks at `a.sparsity` over `a.steps` tokens of
    text, replayed onto the large model's layers (layer l takes the small model's layer
    l * small_layers // layers) and neurons (small neuron i stands for the large neurons
    [i * ff / small_ff, (i + 1) * ff / small_ff)), then trimmed or topped up at random to exactly
    round((1 - sparsity) * ff) per token and layer. Writes (steps, layers, k) int32 to a.make_trace,
    and beside it (ahead_path) what SmolLM2's predictor a layer ahead reads, the same way: its
    likeliest eighth of each layer's neurons, scored on the layer before's input, most likely first,
    (steps, layers, m) with -1 where there is none (the engine's read_ahead replays them)."""
    import numpy as np

    import flashmem
    from flashmem.checkpoints.default_model import default_gguf
    from flashmem.checkpoints.store import converted_folder, store_dir

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from flash import selection_trace

    small = os.path.join(store_dir(), "replay", "smollm2")  # a linked copy: the store's folder keeps no predictor
    src = converted_folder(default_gguf(), None)
    if not os.path.isfile(os.path.join(small, "predictor.safetensors")):
        import shutil

        shutil.rmtree(small, ignore_errors=True)
        os.makedirs(small)
        for f in os.listdir(src):
            (os.symlink if f.endswith(".safetensors") else shutil.copy)(os.path.join(src, f), os.path.join(small, f))
        from flashmem.flash.calibrate import calibrate

        with open(a.text, encoding="utf-8") as f:
            calibrate(flashmem.load(small, threads=a.threads, max_context=512), f.read()[:200_000], tokens=4096,
                      progress=False)
    with open(a.text, encoding="utf-8") as f:
        text = f.read()[300_000:400_000]  # past the calibration text
    # (steps, small layers, k_small), and a layer ahead (steps, small layers, small_ff / 8)
    with open(os.path.join(small, "config.json")) as f:
        eighth = json.load(f)["intermediate_size"] // 8  # the engine's default read_ahead
    picks, early, small_ff = selection_trace(small, text, a.sparsity, a.steps, ahead=eighth)
    with open(os.path.join(a.model, "config.json")) as f:
        cfg = json.load(f)
    ff, layers = cfg["intermediate_size"], cfg["num_hidden_layers"]
    k = int(round((1 - a.sparsity) * ff))
    rng = np.random.default_rng(0)
    lo = np.floor(np.arange(small_ff + 1) * ff / small_ff).astype(np.int64)
    out = np.empty((picks.shape[0], layers, k), np.int32)
    for t in range(picks.shape[0]):
        for l in range(layers):
            sel = picks[t, l * picks.shape[1] // layers]
            ids = np.concatenate([np.arange(lo[i], lo[i + 1]) for i in sel])
            if len(ids) > k:
                ids = rng.choice(ids, k, replace=False)
            elif len(ids) < k:
                rest = np.setdiff1d(np.arange(ff), ids)
                ids = np.concatenate([ids, rng.choice(rest, k - len(ids), replace=False)])
            out[t, l] = np.sort(ids)
    m = int(np.max(np.diff(lo))) * early.shape[2]
    ahead = np.full((picks.shape[0], layers, m), -1, np.int32)
    for t in range(picks.shape[0]):
        for l in range(layers):
            ids = [np.arange(lo[i], lo[i + 1]) for i in early[t, l * picks.shape[1] // layers] if i >= 0]
            if ids:
                ids = np.concatenate(ids)
                ahead[t, l, :len(ids)] = ids
    np.save(ahead_path(a.make_trace), ahead)
    np.save(a.make_trace, out)
    emit({"trace": a.make_trace, "shape": list(out.shape), "small_ff": small_ff, "small_layers": picks.shape[1]})
    return 0



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
    ap.add_argument("--trace", default=None, help="sparse modes: replay these selections (.npy) instead of the predictor")
    ap.add_argument("--make-trace", default=None, help="write replayed SmolLM2 selections for --model to this .npy")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--gguf")
    ap.add_argument("--dtypes", default="gguf")
    ap.add_argument("--text")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    a = ap.parse_args()
    if a.make_trace:
        return make_trace(a)
    return prepare(a) if a.prepare else one(a)


if __name__ == "__main__":
    sys.exit(main())
