"""How much of a model's FFN can a token leave out? The quality bound of 50% sparsity, with the
engine's predictor and with an oracle that knows each token's exact contributions.

    python bench/sparsity_bound.py [--model smollm2|gemma3] [--tokens 256] [--sparsity 0.5,0.6,0.7]

On the shipped SmolLM2 Q4_1 GGUF, or Gemma 3 270M Q4_K_M (--model gemma3; its activation is gelu
where SmolLM2's is silu: act below) (blocks kept; the predictor fitted by `flashmem calibrate`
on the first 8,192 tokens of tinyshakespeare if the folder has none), over the last `tokens`
tokens of tinyshakespeare, teacher-forced, all in DRAM:

- `predictor`: the engine's picks (csrc/ffn/predictor.h), the token's own only (window 1) and
  with the neurons picked in the last 5 tokens (window 5, the default);
- `oracle`: each token and layer computes with its true top neurons by |act(gate.x) * (up.x)|,
  from the dense model's FFN inputs, replayed through the engine (set_trace);
- `oracle_down`: the same ranked by each neuron's contribution to the output,
  |act(gate.x) * (up.x)| * |down column|.

Then the flash decode path the issue measures: offload="flash", sparsity 0.5, a DRAM budget of the
engine's minimum plus a quarter of the quantized FFN, perplexity stepwise (one token at a time,
the neuron cache deciding which window neurons are in DRAM), with the predictor and with the
oracle's picks. And each layer's recall@50 (the share of a token's true top half among the
picks) of the predictor and of two larger ones it could become: the exact gate (a resident gate
matrix) with the predictor's 1-bit up, and 2-bit copies of gate and up.

Writes bench/results/sparsity_bound.json and .png (sparsity_bound_gemma3.* for Gemma 3).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, save, shakespeare  # noqa: E402

import flashmem  # noqa: E402
from flashmem.checkpoints.default_model import gemma3_270m_gguf  # noqa: E402
from flashmem.flash.calibrate import activation, calibrate, estimate, fit_layer, predict, recall  # noqa: E402
from flashmem.flash.streaming import PREDICTOR_FILE, bundle_gate_up, bundle_path  # noqa: E402


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    lg = logits.astype(np.float64)
    lg -= lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return math.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def down_norms(folder: str, config: dict, layer: int) -> np.ndarray:
    """|down column i| of every neuron of `layer`, from its bundles."""
    import gguf

    from flashmem.checkpoints import safetensors_io as st

    d = config["hidden_size"]
    path = bundle_path(folder, config)
    info = st.read_header(path)[0][f"model.layers.{layer}.mlp.bundles"]
    raw = st.load_tensor(path, info)
    gate_fmt, up_fmt, down_fmt = config["flashmem"]["ffn"]["bundle_format"]
    at = 0
    for fmt in (gate_fmt, up_fmt):
        block, block_bytes = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, fmt.upper())]
        at += d // block * block_bytes
    qtype = getattr(gguf.GGMLQuantizationType, down_fmt.upper())
    n = d // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1]
    down = np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw[:, at:at + n]), qtype), np.float32)
    return np.linalg.norm(down, axis=1)


def two_bit(W: np.ndarray) -> np.ndarray:
    """W with each group of 32 weights rounded to 4 levels (+-0.5, +-1.5 times a scale)."""
    g = W.reshape(W.shape[0], -1, 32)
    scale = np.abs(g).max(axis=2, keepdims=True) / 2 + 1e-12
    return ((np.clip(np.floor(g / scale), -2, 1) + 0.5) * scale).reshape(W.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256, help="held-out tokens (the end of tinyshakespeare)")
    ap.add_argument("--sparsity", default="0.5,0.6,0.7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    args = ap.parse_args()
    text = shakespeare()
    source = gemma3_270m_gguf() if args.model == "gemma3" else None
    dense = flashmem.load(source, dtype="gguf", threads=args.threads, max_context=1024)
    folder, cfg = dense.path, dense.config
    act = activation(cfg)
    n_layers, d_ff = cfg["num_hidden_layers"], cfg["intermediate_size"]
    if not os.path.isfile(os.path.join(folder, PREDICTOR_FILE)):
        calibrate(dense, text, tokens=8192, progress=False)
    # the text's last tokens, after the BOS a model expects at position 0 (Gemma's; SmolLM2 adds none)
    bos = dense.tokenizer.encode("")
    ids = np.asarray(bos + dense.tokenizer.encode(text[-40000:], add_special_tokens=False)[-(args.tokens + 1 - len(bos)):],
                     np.int32)
    dense_ppl = perplexity(dense._engine.forward(ids[:-1], 0, True), ids)
    X = dense.ffn_inputs(list(ids[:-1]))  # (layers, T, d_model): the dense model's FFN inputs
    contrib, weighted = [], []
    for l in range(n_layers):
        g, u = bundle_gate_up(folder, cfg, l)
        h = np.abs(act(X[l] @ g.T) * (X[l] @ u.T))
        contrib.append(h)
        weighted.append(h * down_norms(folder, cfg, l))

    def trace(scores, keep):
        out = np.empty((len(ids) - 1, n_layers, keep), np.int32)
        for l in range(n_layers):
            out[:, l] = np.sort(np.argpartition(-scores[l], keep - 1, axis=1)[:, :keep], axis=1)
        return out

    def dram_ppl(sparsity, window, picks=None):
        m = flashmem.load(folder, threads=args.threads, max_context=1024, sparsity=sparsity, window=window)
        if picks is not None:
            m._engine.set_trace(np.ascontiguousarray(picks))
        return perplexity(m._engine.forward(ids[:-1], 0, True), ids)

    rows = []
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        keep = int(round(d_ff * (1 - sparsity)))
        for selection, picks in (("predictor", None), ("oracle", trace(contrib, keep)),
                                 ("oracle_down", trace(weighted, keep))):
            for window in (1, 5):
                ppl = dram_ppl(sparsity, window, picks)
                rows.append(dict(sparsity=sparsity, selection=selection, window=window, path="dram", ppl=ppl,
                                 increase=ppl / dense_ppl - 1))
                print(f"sparsity {sparsity} {selection:12s} window {window}: {ppl:.3f} ({ppl / dense_ppl - 1:+.1%})",
                      flush=True)

    # the flash decode path at the budget: the engine's minimum + a quarter of the FFN
    # (the minimum depends on the budget: read buffers and prefill chunks shrink under small ones)
    ffn_bytes = n_layers * d_ff * int(cfg["flashmem"]["ffn"]["bundle_bytes"])
    budget = None
    for _ in range(3):
        probe = flashmem.load(folder, threads=args.threads, max_context=1024, offload="flash", sparsity=0.5,
                              dram_budget=budget)
        budget = probe.flash_stats()["minimum_budget"] + ffn_bytes // 4
        del probe
    keep = d_ff // 2
    for selection, picks in (("predictor", None), ("oracle_down", trace(weighted, keep))):
        m = flashmem.load(folder, threads=args.threads, max_context=1024, offload="flash", sparsity=0.5, window=5,
                          dram_budget=budget)
        if picks is not None:
            m._engine.set_trace(np.ascontiguousarray(picks))
        ppl = m.perplexity(list(ids), stepwise=True)
        s = m.flash_stats()
        rows.append(dict(sparsity=0.5, selection=selection, window=5, path="flash", ppl=ppl,
                         increase=ppl / dense_ppl - 1, budget=budget, cache_rows=s["cache_rows"],
                         computed_share=s["computed"] / max(s["tokens"] * d_ff, 1)))
        print(f"flash, budget {budget / 2**20:.1f} MiB ({s['cache_rows']} cached neurons per layer), {selection}: "
              f"{ppl:.3f} ({ppl / dense_ppl - 1:+.1%}), computes {rows[-1]['computed_share']:.0%} of the neurons",
              flush=True)

    # recall@50 per layer: the predictor and two larger ones (fitted on the first 2,048 tokens)
    fit_ids = dense.tokenizer.encode(text[:40000])[:2048]
    Xfit = np.concatenate([dense.ffn_inputs(fit_ids[s:s + 512]) for s in range(0, len(fit_ids), 512)], axis=1)
    recalls = []
    for l in range(n_layers):
        g, u = bundle_gate_up(folder, cfg, l)
        x, target = X[l], weighted[l]
        p = fit_layer(g, u, Xfit[l])
        gate_exact = np.abs(act(x @ g.T) * estimate(p, x, "up"))
        two = np.abs(act(x @ two_bit(g).T) * (x @ two_bit(u).T))
        norms = target / np.maximum(contrib[l], 1e-30)
        recalls.append(dict(layer=l, predictor=recall(predict(p, x, act) * norms, target, d_ff // 2),
                            exact_gate_1bit_up=recall(gate_exact * norms, target, d_ff // 2),
                            two_bit_gate_up=recall(two * norms, target, d_ff // 2)))
    mean = {k: float(np.mean([r[k] for r in recalls])) for k in ("predictor", "exact_gate_1bit_up", "two_bit_gate_up")}
    print("mean recall@50:", {k: round(v, 3) for k, v in mean.items()})

    out = dict(benchmark="sparsity_bound", model=os.path.basename(cfg["flashmem"]["source"]), folder=folder,
               tokens=args.tokens, dense_ppl=dense_ppl, rows=rows, recall_at_50=recalls, mean_recall_at_50=mean,
               machine=machine())
    name = "sparsity_bound" + ("_gemma3" if args.model == "gemma3" else "")
    save(name, out)
    plot(out, name, "Gemma 3 270M Q4_K_M" if args.model == "gemma3" else "SmolLM2 Q4_1")


def plot(out: dict, name: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    dram = [r for r in out["rows"] if r["path"] == "dram"]
    for selection in ("predictor", "oracle", "oracle_down"):
        for window, style in ((1, "-"), (5, "--")):
            pts = [(r["sparsity"], 100 * r["increase"]) for r in dram
                   if r["selection"] == selection and r["window"] == window]
            a.plot(*zip(*pts), style, marker="o", label=f"{selection}, window {window}")
    for r, color in zip((r for r in out["rows"] if r["path"] == "flash"), ("black", "gray")):
        a.scatter([0.5], [100 * r["increase"]], marker="*", s=150, zorder=5, color=color,
                  label=f"flash decode path, quarter-FFN cache, {r['selection']}")
    a.axhline(3, color="gray", lw=0.8, ls=":")
    a.set_yscale("symlog", linthresh=10)
    a.set_xlabel("sparsity (share of neurons left out per token)")
    a.set_ylabel("perplexity increase over dense, %")
    a.set_title(f"{model}, {out['tokens']} held-out tokens (dense {out['dense_ppl']:.2f})")
    a.legend(fontsize=7)
    layers = [r["layer"] for r in out["recall_at_50"]]
    for k in ("predictor", "exact_gate_1bit_up", "two_bit_gate_up"):
        b.plot(layers, [r[k] for r in out["recall_at_50"]], marker=".", label=k)
    b.axhline(0.5, color="gray", lw=0.8, ls=":")
    b.set_xlabel("layer")
    b.set_ylabel("recall@50 of the true top half")
    b.set_title("predictors, by contribution |h| * |down|")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
