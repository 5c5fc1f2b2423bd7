"""Batched decode throughput: aggregate tok/s at batch 1, 2, 4, 8 and 16, with the weights in DRAM
and with the FFN streamed from flash (its neuron cache holding a quarter of the FFN), on SmolLM2
Q4_1 (the default model).

    python bench/throughput.py [--batches 1,2,4,8,16] [--new-tokens 48] [--rounds 3] [--threads 2]

Each batch size runs `rounds` times: B different prompts (lines of tinyshakespeare) go into a
BatchRunner; after the step that prefills them, every step decodes one token of each (EOS off, so
all B run to the end). Reported: aggregate decode tok/s (tokens decoded after the first, over the
decode steps' wall time: sampling and detokenizing included), the median over rounds, and its
ratio to batch 1; in flash mode also bytes read and requests per step. Writes
bench/results/throughput.json and .png.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare  # noqa: E402

import flashmem  # noqa: E402
from flashmem.batching import BatchRunner  # noqa: E402


def prompts(n: int) -> list[str]:
    lines = [ln.strip() for ln in shakespeare().splitlines() if len(ln.strip()) > 30]
    return [lines[(97 * i) % len(lines)] for i in range(n)]


def one_round(model, batch: int, new_tokens: int) -> dict:
    runner = BatchRunner(model, max_batch=batch)
    reqs = [runner.submit(p, max_new_tokens=new_tokens, eos_token_id=[]) for p in prompts(batch)]
    while any(r._decoding is None and not r.done for r in reqs):  # every prompt prefilled
        runner.step()
    stats0 = model.flash_stats()
    io0 = stats0.get("bytes_read", 0), stats0.get("requests", 0)
    decoded0 = sum(r.completion_tokens for r in reqs)
    steps, t0 = 0, time.perf_counter()
    while runner.pending():
        runner.step()
        steps += 1
    dt = time.perf_counter() - t0
    decoded = sum(r.completion_tokens for r in reqs) - decoded0
    assert all(r.finish_reason == "length" for r in reqs), [r.finish_reason for r in reqs]
    out = {"tok_s": decoded / dt, "steps": steps, "ms_per_step": 1000 * dt / steps}
    stats = model.flash_stats()
    if stats:
        out["mb_read_per_step"] = (stats.get("bytes_read", 0) - io0[0]) / steps / 1e6
        out["requests_per_step"] = (stats.get("requests", 0) - io0[1]) / steps
    return out


def run_mode(name: str, model, batches: list[int], new_tokens: int, rounds: int) -> list[dict]:
    rows = []
    one_round(model, 1, 4)  # warm-up: the weights' pages, the neuron cache
    for b in batches:
        runs = [one_round(model, b, new_tokens) for _ in range(rounds)]
        row = {"mode": name, "batch": b, "tok_s": median([r["tok_s"] for r in runs]),
               "ms_per_step": median([r["ms_per_step"] for r in runs]), "rounds": [r["tok_s"] for r in runs]}
        if "mb_read_per_step" in runs[0]:
            row["mb_read_per_step"] = median([r["mb_read_per_step"] for r in runs])
            row["requests_per_step"] = median([r["requests_per_step"] for r in runs])
        rows.append(row)
        base = rows[0]["tok_s"]
        print(f"{name:6s} batch {b:3d}: {row['tok_s']:7.1f} tok/s ({row['tok_s'] / base:.2f}x batch "
              f"{rows[0]['batch']}), {row['ms_per_step']:.1f} ms/step"
              + (f", {row['mb_read_per_step']:.2f} MB read/step" if "mb_read_per_step" in row else ""), flush=True)
    for r in rows:
        r["vs_batch_1"] = r["tok_s"] / rows[0]["tok_s"]
    return rows


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        ax.plot([r["batch"] for r in rs], [r["tok_s"] for r in rs], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title("SmolLM2-135M Q4_1, 2 threads: batched decode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="dram,flash")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    common = dict(threads=a.threads, max_context=256, max_batch=max(batches))
    rows, configs = [], {}
    for mode in a.modes.split(","):
        if mode == "dram":
            model = flashmem.load(**common)
        else:
            d_ff = flashmem.load(max_context=16).config["intermediate_size"]
            model = flashmem.load(**common, offload="flash", cache_rows=d_ff // 4)
        configs[mode] = {"offload": model.offload, "owned_mb": model.owned_bytes / 1e6, "dtype": model.dtype}
        if mode == "flash":
            configs[mode]["cache_share"] = 0.25
        rows += run_mode(mode, model, batches, a.new_tokens, a.rounds)
        del model
    data = {"bench": "throughput", "model": "SmolLM2-135M-Instruct Q4_1", "machine": machine(),
            "threads": a.threads, "new_tokens": a.new_tokens, "rounds": a.rounds, "configs": configs, "rows": rows}
    save("throughput", data)
    plot(rows, RESULTS / "throughput.png")


if __name__ == "__main__":
    main()
