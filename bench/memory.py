"""Memory-bank lookup: recall@10 vs queries/s, single thread, flashmem's four indexes next to
faiss-cpu (IndexFlatIP, IndexLSH, IndexIVFFlat, IndexHNSWFlat) and hnswlib, on the same real
vectors: SmolLM2-135M token embeddings + final hidden states over Tiny Shakespeare (d = 576,
cosine), with 1000 queries held out of the build set. Ground truth: flashmem flat, checked
against numpy first. Also build time and memory per vector.

    python bench/memory.py [--n-hidden 53000] [--queries 1000]

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
from memory_data import real_vectors  # noqa: E402

K = 10


def recall(found, truth):
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth)]))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_flashmem(base, queries, truth, index, sweep_name, sweep, **params):
    import flashmem

    bank = flashmem.MemoryBank(base.shape[1], "cosine", index, **params)
    _, build = timed(lambda: bank.add(base))
    if index == "ivf":
        bank.search(queries[:1], K)  # (trains on the first add past train_size; nothing to do here)
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


def plot(results, path, subtitle):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    color = {"flat": "black", "lsh": "tab:green", "ivf": "tab:orange", "hnsw": "tab:blue"}
    style = {"flashmem": "-o", "faiss": "--s", "hnswlib": ":^"}
    series = {}  # faiss's LSH code lengths form one series
    for r in results:
        family = r["index"].split("-")[0]
        label = f"{r['engine']} {family}" + (" (256..9216 bits)" if r["index"].startswith("lsh-") else "")
        series.setdefault((r["engine"], family, label), []).extend(r["points"])
    for (engine, family, label), pts in series.items():
        pts = sorted(pts, key=lambda p: p["recall"])
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], style[engine], color=color[family],
                label=label, markersize=4)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 (vs exact)")
    ax.set_ylabel("queries / s (1 thread, log scale)")
    ax.set_title("Memory lookup: recall vs speed (up and right is better)\n" + subtitle, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-hidden", type=int, default=53000, help="hidden-state vectors added to the 49152 embeddings")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--only", default="", help="comma list of index kinds (flat,lsh,ivf,hnsw)")
    a = ap.parse_args()
    kinds = a.only.split(",") if a.only else ["flat", "lsh", "ivf", "hnsw"]

    import flashmem

    x = real_vectors(a.n_hidden, shakespeare())
    base, queries = np.ascontiguousarray(x[: -a.queries]), np.ascontiguousarray(x[-a.queries:])
    print(f"{len(base)} vectors (d={base.shape[1]}), {len(queries)} held-out queries, k={K}", flush=True)

    ref = flashmem.MemoryBank(base.shape[1], "cosine", "flat")
    ref.add(base)
    (truth, truth_scores), dt = timed(lambda: ref.search(queries, K))
    nb = base / np.linalg.norm(base, axis=1, keepdims=True)
    nq = queries[:20] / np.linalg.norm(queries[:20], axis=1, keepdims=True)
    np_scores = -np.sort(-(nq @ nb.T), axis=1)[:, :K]
    assert np.allclose(np_scores, truth_scores[:20], atol=1e-4), "flat search disagrees with numpy"

    results = []

    def report(r):
        results.append(r)
        best = max(r["points"], key=lambda p: p["recall"])
        print(f"{r['engine']:>8} {r['index']:<14} build {r['build_s']:6.1f} s  {r['bytes_per_vector']:7.0f} B/vec  "
              + "  ".join(f"{p['value']}:{p['recall']:.3f}@{p['qps']:.0f}" for p in r["points"]), flush=True)

    if "flat" in kinds:
        report(run_flashmem(base, queries, truth, "flat", None, [None]))
        report(run_faiss(base, queries, truth, "flat", [None]))
    if "lsh" in kinds:
        report(run_flashmem(base, queries, truth, "lsh", "probes", [2, 4, 8, 16, 32, 64, 128, 256]))
        for nbits in (256, 1024, 2304, 4608, 9216):
            report(run_faiss(base, queries, truth, "lsh", [None], nbits=nbits))
    if "ivf" in kinds:
        report(run_flashmem(base, queries, truth, "ivf", "nprobe", [4, 8, 16, 32, 64, 128]))
        report(run_faiss(base, queries, truth, "ivf", [4, 8, 16, 32, 64, 128]))
    if "hnsw" in kinds:
        sweep = [16, 32, 64, 128, 256, 512]
        report(run_flashmem(base, queries, truth, "hnsw", "ef_search", sweep))
        report(run_faiss(base, queries, truth, "hnsw", sweep))
        report(run_hnswlib(base, queries, truth, sweep))

    summary = {}
    get = lambda e, i: next((r for r in results if r["engine"] == e and r["index"] == i), None)
    if get("flashmem", "flat") and get("faiss", "flat"):
        summary["flat_qps_ratio_vs_faiss"] = get("flashmem", "flat")["points"][0]["qps"] / get("faiss", "flat")["points"][0]["qps"]
    if get("flashmem", "lsh"):
        faiss_lsh = [r for r in results if r["engine"] == "faiss" and r["index"].startswith("lsh")]
        best_faiss = max((p for r in faiss_lsh for p in r["points"]), key=lambda p: p["recall"])
        fm = qps_at(get("flashmem", "lsh"), best_faiss["recall"])
        fm90 = qps_at(get("flashmem", "lsh"), 0.9)
        faiss90 = max((p["qps"] for r in faiss_lsh for p in r["points"] if p["recall"] >= 0.9), default=None)
        summary["lsh"] = {"faiss_best_recall": best_faiss["recall"], "faiss_qps_at_best_recall": best_faiss["qps"],
                          "flashmem_qps_at_equal_or_better_recall": fm,
                          "ratio_at_faiss_best_recall": fm / best_faiss["qps"] if fm else None,
                          "flashmem_qps_at_recall_0.9": fm90, "faiss_qps_at_recall_0.9": faiss90,
                          "ratio_at_recall_0.9": fm90 / faiss90 if fm90 and faiss90 else None}
    for target in (0.9, 0.95):
        summary[f"qps_at_recall_{target}"] = {f"{r['engine']} {r['index']}": qps_at(r, target) for r in results}
    print(summary)
    out = {"benchmark": "memory", "n": len(base), "dim": base.shape[1], "queries": len(queries), "k": K,
           "metric": "cosine", "threads": 1, "machine": machine(), "results": results, "summary": summary}
    save("memory", out)
    plot(results, RESULTS / "memory.png",
         f"{len(base)} real SmolLM2 vectors (d={base.shape[1]}, cosine), {len(queries)} held-out queries, 1 thread")
    print(f"wrote {RESULTS / 'memory.json'} and memory.png")


if __name__ == "__main__":
    main()
