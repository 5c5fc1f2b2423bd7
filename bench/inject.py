"""Memory injection in generate() on SmolLM2-135M (f16): time to first token (TTFT) and decode
speed with no memory, with k = 1, 4, 16 memories injected as embeddings, with the same facts as
text in the prompt, and with repeated injection reusing the KV cache; and retrieval latency
inside generate() for banks of 10k and 100k entries.

    python bench/inject.py [--threads 2] [--repeats 5] [--new-tokens 32]

Every configuration runs `repeats` times; medians are reported. The memories are the 200
facts of tests/facts.py (their token embeddings, lossless); the 10k/100k banks hold them plus
random keys with one-slot values, flat and HNSW. Retrieval uses the question as the query
(memory_query). Writes bench/results/inject.json and .png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import RESULTS, machine, median, save  # noqa: E402
from facts import facts  # noqa: E402

import flashmem  # noqa: E402

QUESTION = "Question: {q}\nAnswer in a few words."
FIXED = {"memory_min_score": None}  # exactly k memories: the cost of k, not of the relevance check
PREFIX = {"memory_position": "prefix", **FIXED}  # CoMEM's layout, whose KV entries are reused


def timed(model, n, repeats, **kw):
    rs = [model.generate(max_new_tokens=n, eos_token_id=[], **kw) for _ in range(repeats)]
    return dict(ttft_ms=median([1e3 * r.time_to_first_token_s for r in rs]),
                decode_tok_s=median([r.decode_tokens_per_s for r in rs]),
                positions=rs[0].prompt_tokens, cached=rs[-1].cached_tokens,
                retrieval_ms=median([1e3 * r.timings.get("retrieval_s", 0.0) for r in rs]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--bank-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10_000, 100_000])
    args = ap.parse_args()
    model = flashmem.load(dtype="f16", threads=args.threads, max_context=2048)
    fs = facts()
    bank = flashmem.MemoryBank(model.config["hidden_size"], index="flat")
    for f, _, _ in fs:
        bank.add_text(model, f)
    _, q, _ = fs[37]
    chat = lambda content: [{"role": "user", "content": content}]  # noqa: E731
    n, rep = args.new_tokens, args.repeats
    rows = {}
    rows["no memory"] = timed(model, n, rep, prompt=chat(QUESTION.format(q=q)), reuse_cache=False)
    for k in (1, 4, 16):
        rows[f"k={k} as embeddings"] = timed(model, n, rep, prompt=chat("Facts: <memory>\n" + QUESTION.format(q=q)),
                                             memory=bank, memory_k=k, memory_position="placeholder", **FIXED,
                                             memory_query=q, reuse_cache=False)
        retrieved = [m["text"] for m in model.generate(chat("Facts: <memory>\n" + QUESTION.format(q=q)), memory=bank,
                                                       **FIXED, memory_k=k, memory_position="placeholder", memory_query=q,
                                                       max_new_tokens=1).memories]
        rows[f"k={k} as text"] = timed(model, n, rep, prompt=chat("Facts: " + " ".join(retrieved) + "\n" +
                                                                   QUESTION.format(q=q)), reuse_cache=False)
    others = [fs[i][1] for i in (3, 91, 150, 7, 64, 120, 33)]
    for k in (4, 16):  # the same memories injected again before a different question: KV reuse of the prefix
        prompt = QUESTION.format(q=q)
        rs = []
        for i in range(rep):
            model.generate(QUESTION.format(q=others[i % len(others)]), memory=bank, memory_k=k, memory_query=q,
                           **PREFIX, max_new_tokens=n, eos_token_id=[])
            rs.append(model.generate(prompt, memory=bank, memory_k=k, memory_query=q, **PREFIX, max_new_tokens=n,
                                     eos_token_id=[]))
        rows[f"k={k} again, new question, KV reuse"] = dict(
            ttft_ms=median([1e3 * r.time_to_first_token_s for r in rs]),
            decode_tok_s=median([r.decode_tokens_per_s for r in rs]), positions=rs[0].prompt_tokens,
            cached=rs[-1].cached_tokens, retrieval_ms=median([1e3 * r.timings["retrieval_s"] for r in rs]))
        rows[f"k={k} prefix, no reuse"] = timed(model, n, rep, prompt=prompt, memory=bank, memory_k=k, **PREFIX,
                                                memory_query=q, reuse_cache=False)
    rows["prompt alone (prefix layout)"] = timed(model, n, rep, prompt=QUESTION.format(q=q), reuse_cache=False)

    retrieval = {}
    rng = np.random.default_rng(0)
    d = model.config["hidden_size"]
    for size in args.bank_sizes:
        for index in ("flat", "hnsw"):
            t0 = time.perf_counter()
            big = flashmem.MemoryBank(d, index=index)
            for f, _, _ in fs:
                big.add_text(model, f)
            keys = rng.standard_normal((size - len(fs), d)).astype(np.float32)
            big.add(keys, values=[np.zeros((1, d), np.float16)] * len(keys))
            build_s = time.perf_counter() - t0
            ts = []
            for _ in range(rep):
                r = model.generate(QUESTION.format(q=q), memory=big, memory_k=4, memory_query=q, max_new_tokens=1)
                ts.append(1e3 * r.timings["retrieval_s"])
            retrieval[f"{index} {size}"] = dict(retrieval_ms=median(ts), hit=fs[37][0] in [m["text"] for m in r.memories],
                                                build_s=build_s)
            print(index, size, retrieval[f"{index} {size}"], flush=True)
    base = rows["prompt alone (prefix layout)"]["ttft_ms"]
    for r in rows.values():
        r["ttft_vs_prompt_alone"] = r["ttft_ms"] / base
    result = dict(machine=machine(), threads=args.threads, new_tokens=n, repeats=rep, rows=rows, retrieval=retrieval)
    save("inject", result)
    plot(result, RESULTS / "inject.png")
    for k, v in rows.items():
        print(f"{k:32s} ttft {v['ttft_ms']:7.1f} ms  decode {v['decode_tok_s']:6.1f} tok/s  positions {v['positions']:4d}"
              f"  cached {v['cached']:4d}  x{v['ttft_vs_prompt_alone']:.2f}")


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2.5, 1]})
    ax = axes[0]
    names = list(rows)
    x = np.arange(len(names))
    ax.bar(x, [rows[k]["ttft_ms"] for k in names],
           color=["tab:gray" if "text" in k else "tab:green" if "KV reuse" in k else "tab:blue"
                  for k in names])
    for i, k in enumerate(names):
        ax.text(i, rows[k]["ttft_ms"], f"{rows[k]['positions']} pos", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [k.replace(" as ", "\nas ").replace(", ", "\n") for k in names], fontsize=6)
    ax.set_ylabel("time to first token (ms, median)")
    ax.set_title("TTFT: blue memories as embeddings, grey the same as text, green KV reuse")
    ax = axes[1]
    ret = result["retrieval"]
    ax.bar(range(len(ret)), [v["retrieval_ms"] for v in ret.values()], color="tab:purple")
    ax.set_xticks(range(len(ret)), list(ret), fontsize=8)
    ax.set_ylabel("retrieval inside generate() (ms)")
    ax.set_title("retrieval latency by bank size")
    fig.suptitle(f"flashmem memory injection, SmolLM2-135M f16, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
