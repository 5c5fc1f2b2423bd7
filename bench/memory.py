"""Memory-bank lookup: recall@10 vs queries/s, single thread, flashmem's four indexes next to
faiss-cpu (IndexFlatIP, IndexLSH, IndexIVFFlat, IndexHNSWFlat) and hnswlib, on three sets of real
SmolLM2-135M vectors (d = 576, cosine):
  embeddings  its 49,152 token-embedding rows; queries: 1000 rows moved by Gaussian noise of half
              their norm (cosine about 0.89 to the row they came from)
  hidden      final hidden states over Tiny Shakespeare; 1000 held out of the build set as queries
  keys        its memory keys (embed_key, default pooling) of Tiny Shakespeare's sentences; 1000
              held out as queries
For each set: flashmem at its defaults (the search settings tuned by the bank itself for its
recall target, see csrc/memory/tuning.h), then sweeps of every engine's search parameter.
Ground truth: flashmem flat, checked against numpy first. Also build time and memory per vector.

    python bench/memory.py [--sets embeddings,hidden,keys] [--n-hidden 30000] [--n-keys 5000]

Writes bench/results/memory.json and memory.png.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, save, shakespeare  # noqa: E402
from memory_data import hidden_states, text_keys, token_embeddings  # noqa: E402

K = 10


def recall(found, truth):
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth)]))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


TUNING = ("target_recall", "tuned_recall", "tuned_exact", "tuned_us_per_query", "exact_us_per_query")
SETTING = {"hnsw": ["ef_search"], "ivf": ["nprobe"], "lsh": ["probes", "rerank_per_k"], "flat": []}


def run_defaults(base, queries, truth, index):
    """flashmem as a user gets it: MemoryBank(d, "cosine", index), add, search."""
    import flashmem

    bank = flashmem.MemoryBank(base.shape[1], "cosine", index)
    _, build = timed(lambda: bank.add(base))  # includes the bank's own tuning
    (ids, _), dt = timed(lambda: bank.search(queries, K))
    tuning = {k: bank.get_param(k) for k in TUNING} if index != "flat" else {}
    return {"engine": "flashmem", "index": index, "defaults": True, "build_s": build,
            "bytes_per_vector": bank.memory_bytes / len(bank), "tuning": tuning,
            "setting": {k: bank.get_param(k) for k in SETTING[index]},
            "points": [{"param": "defaults", "value": None, "recall": recall(ids, truth), "qps": len(queries) / dt}]}


def run_flashmem(base, queries, truth, index, sweep_name, sweep, **params):
    import flashmem

    bank = flashmem.MemoryBank(base.shape[1], "cosine", index, target_recall=0, **params)  # the raw index
    _, build = timed(lambda: bank.add(base))
    points = []
    for v in sweep:
        if sweep_name:
            bank.set_params(**{sweep_name: v})
        (ids, _), dt = timed(lambda: bank.search(queries, K))
        points.append({"param": sweep_name, "value": v, "recall": recall(ids, truth), "qps": len(queries) / dt})
    return {"engine": "flashmem", "index": index, "params": params, "build_s": build,
            "bytes_per_vector": bank.memory_bytes / len(bank), "points": points}


def run_faiss(base, queries, truth, kind, sweep, nbits=None):
    import faiss

    faiss.omp_set_num_threads(1)
    d = base.shape[1]
    xb = base / np.linalg.norm(base, axis=1, keepdims=True)
    xq = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    nlist = int(round(4 * np.sqrt(len(base))))
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "lsh":
        index = faiss.IndexLSH(d, nbits)
    elif kind == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(d, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 200

    def build():
        if not index.is_trained:
            index.train(xb)
        index.add(xb)

    _, build_s = timed(build)
    points = []
    for v in sweep:
        if kind == "ivf":
            index.nprobe = v
        elif kind == "hnsw":
            index.hnsw.efSearch = v
        (_, ids), dt = timed(lambda: index.search(xq, K))
        points.append({"param": {"ivf": "nprobe", "hnsw": "efSearch"}.get(kind, ""), "value": v,
                       "recall": recall(ids, truth), "qps": len(queries) / dt})
    return {"engine": "faiss", "index": kind + (f"-{nbits}bits" if nbits else ""),
            "build_s": build_s, "bytes_per_vector": len(faiss.serialize_index(index)) / len(base), "points": points}


def run_hnswlib(base, queries, truth, sweep):
    import hnswlib

    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=16, ef_construction=200)
    _, build_s = timed(lambda: index.add_items(base, num_threads=1))
    points = []
    for ef in sweep:
        index.set_ef(max(ef, K))
        (ids, _), dt = timed(lambda: index.knn_query(queries, K, num_threads=1))
        points.append({"param": "ef", "value": ef, "recall": recall(ids.astype(np.int64), truth),
                       "qps": len(queries) / dt})
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        index.save_index(f.name)
        size = os.path.getsize(f.name)
    return {"engine": "hnswlib", "index": "hnsw", "build_s": build_s, "bytes_per_vector": size / len(base),
            "points": points}


def qps_at(result, target):
    """Best QPS among the sweep points with recall >= target (None if none reaches it)."""
    ok = [p["qps"] for p in result["points"] if p["recall"] >= target]
    return max(ok) if ok else None


def perturbed(x, n, scale, seed=0):
    rng = np.random.default_rng(seed)
    rows = x[rng.choice(len(x), n, replace=False)]
    g = rng.standard_normal(rows.shape).astype(np.float32)
    g *= scale * np.linalg.norm(rows, axis=1, keepdims=True) / np.linalg.norm(g, axis=1, keepdims=True)
    return np.ascontiguousarray(rows + g)


def held_out(x, n, seed=0):
    x = x[np.random.default_rng(seed).permutation(len(x))]
    return np.ascontiguousarray(x[:-n]), np.ascontiguousarray(x[-n:])


def vector_set(name, a):
    """(base, queries, description) of one of the three sets."""
    text = shakespeare()
    if name == "embeddings":
        x = token_embeddings()
        return np.ascontiguousarray(x), perturbed(x, a.queries, 0.5), \
            f"{len(x)} token embeddings, {a.queries} rows + noise (0.5 of the norm) as queries"
    if name == "hidden":
        base, q = held_out(hidden_states(a.n_hidden, text), a.queries)
        return base, q, f"{len(base)} final hidden states over Tiny Shakespeare, {a.queries} held out as queries"
    if name == "keys":
        base, q = held_out(text_keys(a.n_keys, text), a.queries)
        return base, q, f"{len(base)} embed_key keys of Tiny Shakespeare sentences, {a.queries} held out as queries"
    raise SystemExit(f"unknown set {name!r} (embeddings, hidden, keys)")


def run_set(name, a, kinds):
    import flashmem

    base, queries, about = vector_set(name, a)
    print(f"== {name}: {about} (d={base.shape[1]}), k={K}", flush=True)
    ref = flashmem.MemoryBank(base.shape[1], "cosine", "flat")
    ref.add(base)
    truth, truth_scores = ref.search(queries, K)
    nb = base / np.linalg.norm(base, axis=1, keepdims=True)
    nq = queries[:20] / np.linalg.norm(queries[:20], axis=1, keepdims=True)
    assert np.allclose(-np.sort(-(nq @ nb.T), axis=1)[:, :K], truth_scores[:20], atol=1e-4), "flat disagrees with numpy"

    results = []

    def report(r):
        results.append(r)
        extra = f"  tuned {r['setting']} {r['tuning']}" if r.get("defaults") else ""
        print(f"{r['engine']:>8} {r['index']:<14}{' defaults' if r.get('defaults') else ''} build {r['build_s']:6.1f} s  "
              f"{r['bytes_per_vector']:7.0f} B/vec  "
              + "  ".join(f"{p['value']}:{p['recall']:.3f}@{p['qps']:.0f}" for p in r["points"]) + extra, flush=True)

    for index in ("lsh", "ivf", "hnsw"):
        if index in kinds:
            report(run_defaults(base, queries, truth, index))
    if "flat" in kinds:
        report(run_flashmem(base, queries, truth, "flat", None, [None]))
        report(run_faiss(base, queries, truth, "flat", [None]))
    if "lsh" in kinds:
        report(run_flashmem(base, queries, truth, "lsh", "probes", [2, 4, 8, 16, 32, 64, 128, 256]))
        for nbits in (1024, 4608):
            report(run_faiss(base, queries, truth, "lsh", [None], nbits=nbits))
    if "ivf" in kinds:
        report(run_flashmem(base, queries, truth, "ivf", "nprobe", [4, 8, 16, 32, 64, 128]))
        report(run_faiss(base, queries, truth, "ivf", [4, 8, 16, 32, 64, 128]))
    if "hnsw" in kinds:
        sweep = [16, 32, 64, 128, 256, 512, 1024]
        report(run_flashmem(base, queries, truth, "hnsw", "ef_search", sweep))
        report(run_faiss(base, queries, truth, "hnsw", sweep))
        report(run_hnswlib(base, queries, truth, sweep))

    sweeps = [r for r in results if not r.get("defaults")]
    summary = {"defaults": {r["index"]: {"recall": r["points"][0]["recall"], "qps": r["points"][0]["qps"],
                                         "setting": r["setting"], "exact": bool(r["tuning"].get("tuned_exact"))}
                            for r in results if r.get("defaults")}}
    for target in (0.9, 0.95):
        summary[f"qps_at_recall_{target}"] = {f"{r['engine']} {r['index']}": qps_at(r, target) for r in sweeps}
    print(summary, flush=True)
    return {"set": name, "about": about, "n": len(base), "dim": base.shape[1], "queries": len(queries),
            "results": results, "summary": summary}


def plot(sets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 5.5), squeeze=False)
    color = {"flat": "black", "lsh": "tab:green", "ivf": "tab:orange", "hnsw": "tab:blue"}
    style = {"flashmem": "-o", "faiss": "--s", "hnswlib": ":^"}
    for ax, st in zip(axes[0], sets):
        series = {}  # faiss's LSH code lengths form one series
        for r in st["results"]:
            family = r["index"].split("-")[0]
            if r.get("defaults"):
                p = r["points"][0]
                ax.plot([p["recall"]], [p["qps"]], "*", color=color[family], markersize=16, markeredgecolor="k",
                        label=f"flashmem {family} defaults" + (" (exact)" if r["tuning"].get("tuned_exact") else ""))
                continue
            label = f"{r['engine']} {family}" + (" (bits)" if r["index"].startswith("lsh-") else "")
            series.setdefault((r["engine"], family, label), []).extend(r["points"])
        for (engine, family, label), pts in series.items():
            pts = sorted(pts, key=lambda p: p["recall"])
            ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], style[engine], color=color[family],
                    label=label, markersize=4)
        ax.axvline(0.95, color="gray", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 (vs exact)")
        ax.set_ylabel("queries / s (1 thread, log scale)")
        ax.set_title(f"{st['set']}: {st['about']}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Memory lookup on real SmolLM2 vectors (d=576, cosine, k=10): recall vs speed; stars = defaults",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="embeddings,hidden,keys")
    ap.add_argument("--n-hidden", type=int, default=30000, help="hidden states in the hidden set (with its queries)")
    ap.add_argument("--n-keys", type=int, default=5000, help="sentences in the keys set (with its queries)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma list of index kinds (flat,lsh,ivf,hnsw)")
    a = ap.parse_args()
    kinds = a.only.split(",") if a.only else ["flat", "lsh", "ivf", "hnsw"]
    sets = [run_set(name, a, kinds) for name in a.sets.split(",")]
    out = {"benchmark": "memory", "k": K, "metric": "cosine", "threads": 1, "machine": machine(), "sets": sets}
    save("memory", out)
    plot(sets, RESULTS / "memory.png")
    print(f"wrote {RESULTS / 'memory.json'} and memory.png")


if __name__ == "__main__":
    main()
