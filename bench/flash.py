"""Flash-offloaded FFN streaming: the "LLM in a flash" table on SmolLM2-135M (f16, or with
--dtype gguf the shipped Q4_1 file's own blocks in the bundles), and a scale test with Llama-2-7B
shapes. Direct I/O throughout (the page cache is bypassed).

    python bench/flash.py [--threads 2] [--new-tokens 48] [--repeats 3] [--sparsity 0.8]
                          [--scale-dir DIR] [--skip-scale] [--dtype f16|gguf]

1. Raw random-read bandwidth of the disk through the engine's own reader (queue depth 32) at
   4 KiB to 256 KiB requests.
2. Perplexity on the last 4096 tokens of tinyshakespeare (the predictors are fitted on its
   start, by this script) at the sparsities used, windows 1, 4 and 5 (the default), all in DRAM
   (the window's neurons all available).
   Each flash row of the table also reports the perplexity of its own decode path (one token
   at a time over the last --ppl-tokens tokens: the neuron cache limits which window neurons
   are in DRAM).
3. The paper's table, at neuron-cache shares of 25% and 50% of the FFN's bytes (budget = the
   resident minimum + that share): (a) naive, every FFN weight read every token; (b) predictor
   only (no cache); (c) predictor + windowing (neuron cache); (d) + row-column bundling; and the
   all-in-DRAM dense engine. (a)-(c) read the unbundled layout (gate, up, down apart: three
   reads per neuron), (d) the bundled one; (d) is also run with eviction="hot" (the cache keeps
   the most often picked neurons instead of the most recent). Per decoded token: I/O ms, bytes
   and requests read, total ms; medians over repeats. With --dtype gguf the bundles are the only
   layout (block-format rows have no unbundled copy), so (a)-(c) read bundles too and (c) is
   (d); results then go to flash_q4.json|png and the scale test is skipped.
4. Scale: a random-weight model with Llama-2-7B shapes (d_model 4096, d_ff 11008, 32 layers, f16,
   about 13 GB on disk; the vocabulary is SmolLM2's), at the resident minimum + 25% of the FFN,
   eviction --scale-eviction (default hot), replaying SmolLM2's real predictor selections mapped
   onto the larger layers (layer l of 32 takes SmolLM2 layer l*30//32, neuron i becomes neurons
   floor(i*11008/1536) + 0..6). Reports tok/s, bytes per token and effective read bandwidth
   beside the raw bandwidth at the same request size.
Writes bench/results/flash.json and flash.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare  # noqa: E402

import flashmem  # noqa: E402
from flashmem import _core  # noqa: E402
from flashmem.checkpoints import safetensors_io as st  # noqa: E402
from flashmem.flash.calibrate import calibrate, load_parts, predict  # noqa: E402
from flashmem.flash import PREDICTOR_FILE, write_unbundled  # noqa: E402
from flashmem.flash.streaming import bundle_bytes  # noqa: E402


def raw_bandwidth(path, sizes_kib, total_mb=48):
    out = {}
    for kib in sizes_kib:
        n = max(64, int(total_mb * 1024 // kib))
        secs = [_core.disk_random_read(path, kib * 1024, n, 32, seed)[0] for seed in (1, 2, 3)]
        out[kib] = kib * 1024 * n / median(secs) / 1e9
    return out


def decode_run(model, prompt, n_new, repeats):
    """Median decode ms per token and the flash figures of the median run."""
    runs = []
    for _ in range(repeats):
        r = model.generate(prompt, max_new_tokens=n_new, eos_token_id=[])
        runs.append((1e3 / r.decode_tokens_per_s, r.flash))
    runs.sort(key=lambda x: x[0])
    ms, fl = runs[len(runs) // 2]
    return ms, fl


def paper_table(folder, prompt, args, ffn_bytes, held):
    def minimum(layout):
        m = flashmem.load(folder, threads=args.threads, max_context=512, offload="flash", cache_rows=0,
                          ffn_layout=layout)
        return m.flash_stats()["minimum_budget"]

    block = bool(json.load(open(os.path.join(folder, "config.json")))["flashmem"]["ffn"].get("bundle_format"))
    unbundled = "bundled" if block else "unbundled"  # block-format rows are only written as bundles
    mins = {k: minimum(k) for k in {"bundled", unbundled}}
    rows = []
    dense = flashmem.load(folder, threads=args.threads, max_context=512)
    ms, _ = decode_run(dense, prompt, args.new_tokens, args.repeats)
    dense_ppl = dense.perplexity(held, stepwise=True)
    rows.append(dict(config="all in DRAM (dense)", share=None, sparsity=0.0, total_ms=ms, io_ms=0.0,
                     bytes_per_token=0, requests_per_token=0, dram_bytes=dense.owned_bytes, stepwise_ppl=dense_ppl,
                     ppl_increase=0.0))
    del dense
    common = dict(threads=args.threads, max_context=512, offload="flash")
    ppls = {}
    def measure(name, share, **kw):
        sparsity = kw["sparsity"]
        m = flashmem.load(folder, **common, **kw)
        ms, fl = decode_run(m, prompt, args.new_tokens, args.repeats)
        key = (sparsity, share, kw.get("eviction"))  # the unbundled layout picks and caches exactly as the bundled one
        if key not in ppls:
            ppls[key] = m.perplexity(held, stepwise=True) if sparsity else dense_ppl  # the decode path, cache included
        ppl = ppls[key]
        rows.append(dict(config=name, share=share, sparsity=sparsity, stepwise_ppl=ppl, ppl_increase=ppl / dense_ppl - 1,
                         total_ms=ms, io_ms=fl["io_ms_per_token"],
                         bytes_per_token=fl["bytes_read_per_token"], requests_per_token=fl["requests_per_token"],
                         hit_rate=fl["neuron_cache_hit_rate"], read_gbps=fl["read_bandwidth_gbps"],
                         budget=kw.get("dram_budget"), dram_bytes=m.owned_bytes, cache_rows=fl["cache_rows_per_layer"]))
        print(rows[-1], flush=True)

    measure("naive (all FFN weights every token)", None, sparsity=0.0, ffn_layout=unbundled, cache_rows=0)
    for s in args.sparsity:
        measure("predictor", None, sparsity=s, ffn_layout=unbundled, cache_rows=0)
        for share in (0.25, 0.5):
            for name, layout, eviction in (("predictor + windowing", "unbundled", "lru"),
                                           ("predictor + windowing + bundling", "bundled", "lru"),
                                           ("predictor + windowing + bundling, hot eviction", "bundled", "hot")):
                if layout not in mins:
                    continue
                budget = int(mins[layout] + share * ffn_bytes)
                measure(name, share, sparsity=s, window=args.window, ffn_layout=layout, dram_budget=budget,
                        eviction=eviction)
    for r in rows:
        r["ffn_fraction_read"] = r["bytes_per_token"] / ffn_bytes
    return rows, mins


def selection_trace(folder, text, sparsity, n_tokens, ahead=0):
    """SmolLM2's predictor picks for n_tokens tokens of text: (n_tokens, layers, k) neuron ids.
    With ahead > 0 also what a predictor a layer ahead reads (layer l's predictor on layer l - 1's
    FFN input, as the engine's read_ahead scores it): (n_tokens, layers, ahead) neuron ids, most
    likely first, -1 for layer 0 (nothing before it to score on). Returns (picks, ff) or
    (picks, ahead ids, ff)."""
    m = flashmem.load(folder, threads=2, max_context=512)
    ids = np.asarray(m.tokenizer.encode(text)[:n_tokens], np.int32)
    X = m._engine.ffn_inputs(ids)  # (layers, T, d)
    path = os.path.join(folder, PREDICTOR_FILE)
    ff = m.config["intermediate_size"]
    k = max(1, int((1 - sparsity) * ff + 0.5))
    picks, early = [], []
    for l in range(X.shape[0]):
        parts = load_parts(path, l)
        sc = predict(parts, X[l])
        picks.append(np.sort(np.argpartition(-sc, k - 1, axis=1)[:, :k], axis=1))
        if ahead:
            early.append(np.argsort(-predict(parts, X[l - 1]), axis=1, kind="stable")[:, :ahead] if l else
                         np.full((len(ids), ahead), -1, np.int64))
    if ahead:
        return np.stack(picks, axis=1), np.stack(early, axis=1), ff
    return np.stack(picks, axis=1), ff


def write_synthetic_7b(out, tokenizer_src, d=4096, ff=11008, layers=32, heads=32, seed=0):
    """A flashmem folder with Llama-2-7B shapes and random f16 weights (rows of a random block,
    tiled: the values do not matter for I/O)."""
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tmp = out + ".part"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    rng = np.random.default_rng(seed)
    vocab = json.load(open(os.path.join(tokenizer_src, "config.json")))["vocab_size"]
    block = (rng.standard_normal((1024, 3 * d)) * 0.02).astype(np.float16)

    def mat(rows, cols):
        reps = -(-rows // block.shape[0])
        return np.tile(block[:, :cols], (reps, 1))[:rows]

    resident = [("model.embed_tokens.weight", "f16", (vocab, d))]
    for l in range(layers):
        p = f"model.layers.{l}."
        resident += [(p + "input_layernorm.weight", "f32", (d,)), (p + "self_attn.q_proj.weight", "f16", (d, d)),
                     (p + "self_attn.k_proj.weight", "f16", (d, d)), (p + "self_attn.v_proj.weight", "f16", (d, d)),
                     (p + "self_attn.o_proj.weight", "f16", (d, d)), (p + "post_attention_layernorm.weight", "f32", (d,))]
    resident += [("model.norm.weight", "f32", (d,)), ("lm_head.weight", "f16", (vocab, d))]
    w = st.Writer(os.path.join(tmp, "model.safetensors"), resident, {"format": "pt"})
    for name, tag, shape in resident:
        w.write(name, np.ones(shape, np.float32) if tag == "f32" else mat(*shape))
    w.close()
    stride = 3 * d  # 24576 bytes: already a multiple of 4096
    specs = [(f"model.layers.{l}.mlp.bundles", "f16", (ff, stride)) for l in range(layers)]
    w = st.Writer(os.path.join(tmp, "ffn_bundles.safetensors"), specs, {"layout": "gate_up_down"}, align=4096)
    layer_block = mat(ff, stride)
    for name, _, _ in specs:
        w.write(name, layer_block)
    w.close()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d, "intermediate_size": ff,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False,
           "flashmem": {"format_version": 1, "dtype": "f16", "source": "synthetic Llama-2-7B shapes",
                        "ffn": {"file": "ffn_bundles.safetensors", "layout": "gate_up_down", "align": 4096,
                                "stride": stride}}}
    json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"), indent=1)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_src, f), tmp)
    os.replace(tmp, out)
    return out


def scale_test(small_folder, text, args):
    d, ff, layers = 4096, 11008, 32
    t0 = time.perf_counter()
    folder = write_synthetic_7b(args.scale_dir, small_folder)
    write_s = time.perf_counter() - t0
    ffn_bytes = layers * ff * 3 * d * 2
    trace, small_ff = selection_trace(small_folder, text, args.sparsity[-1], args.scale_tokens + 8)
    small_layers = trace.shape[1]
    src_layer = [l * small_layers // layers for l in range(layers)]
    base = np.floor(trace[:, src_layer, :].astype(np.float64) * ff / small_ff).astype(np.int64)
    big = (base[..., None] + np.arange(7)).reshape(trace.shape[0], layers, -1).astype(np.int32)
    probe = flashmem.load(folder, threads=args.threads, max_context=256, offload="flash", cache_rows=0)
    minimum = probe.flash_stats()["minimum_budget"]
    del probe
    budget = int(minimum + 0.25 * ffn_bytes)
    t0 = time.perf_counter()
    m = flashmem.load(folder, threads=args.threads, max_context=256, offload="flash", dram_budget=budget,
                      window=args.window, sparsity=0.0, eviction=args.scale_eviction)
    load_s = time.perf_counter() - t0
    m._engine.set_trace(np.ascontiguousarray(big))
    r = m.generate([1, 2, 3, 4], max_new_tokens=args.scale_tokens, eos_token_id=[])
    fl = r.flash
    req_kib = max(4, int(round(fl["bytes_read_per_token"] / max(fl["requests_per_token"], 1) / 4096)) * 4)
    raw = raw_bandwidth(os.path.join(folder, "ffn_bundles.safetensors"), [req_kib], total_mb=96)[req_kib]
    return dict(sparsity=args.sparsity[-1], eviction=args.scale_eviction, d_model=d, d_ff=ff, layers=layers, ffn_gb=ffn_bytes / 1e9, budget_gb=budget / 1e9,
                minimum_gb=minimum / 1e9, engine_owns_gb=m.owned_bytes / 1e9, write_s=write_s, load_s=load_s,
                tokens_per_s=r.decode_tokens_per_s, ms_per_token=1e3 / r.decode_tokens_per_s,
                bytes_per_token=fl["bytes_read_per_token"], ffn_fraction_read=fl["bytes_read_per_token"] / ffn_bytes,
                requests_per_token=fl["requests_per_token"], io_ms_per_token=fl["io_ms_per_token"],
                hit_rate=fl["neuron_cache_hit_rate"], effective_read_gbps=fl["read_bandwidth_gbps"],
                mean_request_kib=req_kib, raw_read_gbps_same_size=raw,
                effective_over_raw=fl["read_bandwidth_gbps"] / raw, picked_per_layer=big.shape[2],
                cache_rows_per_layer=fl["cache_rows_per_layer"])


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(18, 6), gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    rows = result["table"]
    labels = [r["config"].replace(" + ", "\n+ ").replace(" (", "\n(").replace(", ", "\n") +
              (f"\ns={r['sparsity']}" if r.get("sparsity") else "") +
              (f", {int(r['share'] * 100)}% cache" if r["share"] else "") for r in rows]
    io = [r["io_ms"] for r in rows]
    rest = [r["total_ms"] - r["io_ms"] for r in rows]
    x = np.arange(len(rows))
    ax.bar(x, io, color="tab:red", label="I/O")
    ax.bar(x, rest, bottom=io, color="tab:blue", label="compute and the rest")
    ax.set_xticks(x, labels, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("ms per decoded token (log)")
    ax.set_title(f"SmolLM2-135M {result.get('dtype', 'f16')}, window {result['window']}: per-token latency")
    ax.legend()
    ax = axes[1]
    raw = result["raw_read_gbps"]
    ks = sorted(int(k) for k in raw)
    ax.plot(ks, [raw[str(k)] if str(k) in raw else raw[k] for k in ks], "o-", label="raw random reads (QD 32)")
    for r in rows:
        if r.get("requests_per_token"):
            size = r["bytes_per_token"] / r["requests_per_token"] / 1024
            ax.plot(size, r["read_gbps"], "x", color="tab:red")
    if result.get("scale"):
        s = result["scale"]
        ax.plot(s["mean_request_kib"], s["effective_read_gbps"], "*", ms=14, color="tab:green",
                label="7B-shape replay (effective)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("request size (KiB)")
    ax.set_ylabel("GB/s")
    ax.set_title("read bandwidth: raw vs effective (x: SmolLM2 configurations)")
    ax.legend()
    fig.suptitle(f"flashmem flash streaming, {result['machine']['cores']} cores, threads {result['threads']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sparsity", type=lambda v: [float(x) for x in v.split(",")], default=[0.5, 0.8],
                    help="comma-separated sparsities for the table; the scale test uses the last")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--scale-dir", default=os.path.join(os.environ.get("FLASHMEM_CACHE", os.path.expanduser(
        "~/.cache/flashmem")), "synthetic-llama2-7b-shapes"))
    ap.add_argument("--scale-tokens", type=int, default=16)
    ap.add_argument("--scale-eviction", default="hot", help="neuron cache policy of the scale test (lru or hot)")
    ap.add_argument("--ppl-tokens", type=int, default=256, help="held-out tokens for each row's stepwise perplexity")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--only-scale", action="store_true", help="rerun the scale test into an existing flash.json")
    ap.add_argument("--dtype", default="f16", choices=["f16", "gguf"],
                    help="f16 bundles, or gguf: the shipped Q4_1 blocks (split down columns)")
    args = ap.parse_args()
    name = "flash" if args.dtype == "f16" else "flash_q4"
    args.skip_scale = args.skip_scale or args.dtype != "f16"

    text = shakespeare()
    folder = flashmem.load(dtype=args.dtype, threads=args.threads, max_context=512).path
    if args.only_scale:
        result = json.loads((RESULTS / "flash.json").read_text())
        result["scale"] = scale_test(folder, text, args)
        print("scale", result["scale"], flush=True)
        save("flash", result)
        plot(result, RESULTS / "flash.png")
        return
    calibrate(flashmem.load(folder, threads=args.threads), text, tokens=8192, progress=False)  # current format
    cfg = json.load(open(os.path.join(folder, "config.json")))
    if args.dtype == "f16":
        write_unbundled(folder, cfg)
    ffn_bytes = bundle_bytes(cfg) * cfg["intermediate_size"] * cfg["num_hidden_layers"]
    result = dict(machine=machine(), threads=args.threads, sparsity=args.sparsity, window=args.window,
                  new_tokens=args.new_tokens, repeats=args.repeats, ffn_bytes=ffn_bytes, model=folder,
                  dtype=args.dtype, bundle_format=cfg["flashmem"]["ffn"].get("bundle_format"))
    raw = raw_bandwidth(os.path.join(folder, "ffn_bundles.safetensors"), [4, 8, 16, 32, 64, 128, 256])
    result["raw_read_gbps"] = {str(k): v for k, v in raw.items()}
    print("raw GB/s", raw, flush=True)

    dense = flashmem.load(folder, threads=args.threads, max_context=1024)
    held = dense.tokenizer.encode(text)[-4096:]
    dense_ppl = dense.perplexity(held)
    del dense
    ppl = {}
    for s in args.sparsity:
        for w in sorted({1, 4, args.window}):
            m = flashmem.load(folder, threads=args.threads, max_context=1024, sparsity=s, window=w)
            ppl[f"{s}/w{w}"] = m.perplexity(held)
    result["dense_ppl"] = dense_ppl
    result["perplexity_window"] = {k: dict(ppl=v, increase=v / dense_ppl - 1) for k, v in ppl.items()}
    print("perplexity", result["perplexity_window"], flush=True)

    prompt = text[-1500:-1000]
    result["table"], result["minimum_budget"] = paper_table(folder, prompt, args, ffn_bytes, held[-args.ppl_tokens:])
    dense_ms = result["table"][0]["total_ms"]
    naive_ms = result["table"][1]["total_ms"]
    for r in result["table"]:
        r["vs_dense"] = r["total_ms"] / dense_ms
        r["speedup_vs_naive"] = naive_ms / r["total_ms"]
    save(name, result)  # the table is kept if the scale test fails
    if not args.skip_scale:
        result["scale"] = scale_test(folder, text, args)
        print("scale", result["scale"], flush=True)
    save(name, result)
    plot(result, RESULTS / f"{name}.png")
    print(json.dumps(result["table"], indent=1))


if __name__ == "__main__":
    main()
