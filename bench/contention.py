"""Decode on a busy machine: flashmem beside llama.cpp (llama-cpp-python) on the same GGUF files, at
1 and 2 threads, with the machine idle and with another process keeping one core busy (a
single-threaded busy loop, as a phone or laptop always has other work running).

    python bench/contention.py [--files f16,q4_1] [--new-tokens 64] [--rounds 3]

Each engine runs in a child process of bench/decode.py (one at a time; the competitor starts
before the child and stops after it). Reported: median decode tok/s per (file, engine, threads,
load), and for each engine and file under load, threads=2 against threads=1 (the target: at least
0.9x; a step that waits at a barrier for a descheduled thread falls far below). Writes
bench/results/contention.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, machine, median, save, shakespeare, write_dequantized_gguf  # noqa: E402

DECODE = os.path.join(os.path.dirname(__file__), "decode.py")


def child(engine, path, dtype, threads, new_tokens, prompt, busy: bool) -> dict | None:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        cmd = [sys.executable, DECODE, "--one", engine, "--file", path, "--dtype", dtype, "--threads", str(threads),
               "--new-tokens", str(new_tokens), "--repeats", "2", "--prompt", json.dumps(prompt)]
        out = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    if out.returncode != 0:
        print(f"{engine} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default="f16,q4_1")
    ap.add_argument("--engines", default="flashmem,llama.cpp")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import flashmem
    from flashmem.checkpoints.default_model import default_gguf
    from flashmem.checkpoints.store import store_dir

    src = default_gguf()
    files = {"q4_1": (src, "gguf")}
    for dt in ("f32", "f16"):
        if dt in a.files:
            files[dt] = (write_dequantized_gguf(src, os.path.join(store_dir(), f"SmolLM2-135M-Instruct.{dt.upper()}.gguf"),
                                                dt), dt)
    prompt = flashmem.load(src, threads=1, max_context=16).tokenizer.encode(shakespeare())[:a.prompt_tokens]
    for name in a.files.split(","):  # converted into the store before anything is timed
        flashmem.load(files[name][0], dtype=files[name][1], threads=1, max_context=16)

    runs = {}
    for _ in range(a.rounds):
        for name in a.files.split(","):
            path, dtype = files[name]
            for engine in a.engines.split(","):
                for threads in (1, 2):
                    for busy in (False, True):
                        r = child(engine, path, dtype, threads, a.new_tokens, prompt, busy)
                        if r:
                            runs.setdefault((name, engine, threads, busy), []).extend(r["decode_runs"])
                            print(f"{engine:>9} {name:>5} threads={threads} {'busy' if busy else 'idle'}: "
                                  f"{median(r['decode_runs']):6.1f} tok/s", flush=True)
    rows = [{"file": n, "engine": e, "threads": t, "load": "busy" if b else "idle", "decode_tok_s": median(v),
             "runs": v} for (n, e, t, b), v in runs.items()]
    ratios = {}
    for name in a.files.split(","):
        for engine in a.engines.split(","):
            get = {(r["threads"], r["load"]): r["decode_tok_s"] for r in rows if r["file"] == name and r["engine"] == engine}
            if (1, "busy") in get and (2, "busy") in get:
                ratios[f"{engine} {name}"] = {"busy_2_over_1": get[(2, "busy")] / get[(1, "busy")],
                                              "busy_over_idle_2": get[(2, "busy")] / get[(2, "idle")]}
    for k, v in ratios.items():
        print(f"{k}: under load threads=2 / threads=1 = {v['busy_2_over_1']:.2f}, "
              f"threads=2 busy / idle = {v['busy_over_idle_2']:.2f}")
    save("contention", {"machine": machine(), "new_tokens": a.new_tokens, "rows": rows, "ratios": ratios})
    plot(rows, os.path.join(RESULTS, "contention.png"))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = sorted({(r["file"], r["engine"]) for r in rows})
    cols = [(t, load) for t in (1, 2) for load in ("idle", "busy")]
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(groups))
    for j, (t, load) in enumerate(cols):
        vals = [next((r["decode_tok_s"] for r in rows if (r["file"], r["engine"], r["threads"], r["load"]) ==
                      (f, e, t, load)), 0) for f, e in groups]
        ax.bar(x + (j - 1.5) * 0.2, vals, 0.2, label=f"threads={t}, {load}", hatch="//" if load == "busy" else None)
    ax.set_xticks(x, [f"{e}\n{f}" for f, e in groups])
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title("SmolLM2-135M decode, idle and with one core busy (2-core machine)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
