"""Calibrates the relevance check (memory/retrieval.py): which memory a question gets, and whether it
passes memory_min_score. SmolLM2-135M-Instruct or Gemma 3 270M, f32.

For each fact set of tests/facts.py (personal, household, world; and everyday, held out from the
tests) a bank holds every fact. Questions:
- fact questions: 10 facts per set (all 20 of everyday), direct and paraphrased;
- general questions, which need no memory: the 40 of GENERAL_QUESTIONS and the 40 of
  GENERAL_QUESTIONS_2 (held out), against every set's bank.
For each question, the best candidate of the retrieval (retrieval.candidates) is scored both ways:
forward PMI (the memory makes the question predictable) and backward PMI (the question makes the
memory predictable), nats per token. The report: for the forward score alone and for the mean of
both (what memory_relevance returns), the share of fact questions whose right memory passes and
the share of general questions whose best candidate passes, at thresholds 0.8 to 2.0.
Writes bench/results/memory_relevance[_MODEL].json and .png.

    python bench/memory_relevance.py [--model smollm2|gemma3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import RESULTS, machine, save  # noqa: E402
import facts as F  # noqa: E402

import flashmem  # noqa: E402
from flashmem.memory import retrieval  # noqa: E402

SETS = {"personal": F.personal_set, "household": F.household_set, "world": F.world_set,
        "everyday": lambda: F.EVERYDAY}
THRESHOLDS = [round(t, 1) for t in np.arange(0.8, 2.01, 0.1)]


def score_set(model, facts, asked) -> dict:
    bank = flashmem.MemoryBank(model.d_model)
    for f, *_ in facts:
        bank.add_text(model, f)

    def best(q):
        c = retrieval.candidates(bank, q, model.embed_key(q))[0]
        text = bank.get(c.id).text
        return text, *model._relevance.parts(text, q)

    out = {"facts": [], "general": []}
    for qi in asked:
        for col in (1, 2):
            text, fwd, bwd = best(facts[qi][col])
            out["facts"].append({"question": facts[qi][col], "memory": text, "right": text == facts[qi][0],
                                 "forward": fwd, "backward": bwd})
    for q in F.GENERAL_QUESTIONS + F.GENERAL_QUESTIONS_2:
        text, fwd, bwd = best(q)
        out["general"].append({"question": q, "memory": text, "held_out": q in F.GENERAL_QUESTIONS_2,
                               "forward": fwd, "backward": bwd})
    return out


SCORES = {"forward": lambda x: x["forward"], "two_way": lambda x: (x["forward"] + x["backward"]) / 2}


def pass_rates(sets: dict) -> dict:
    out = {}
    for name, f in SCORES.items():
        facts = [f(x) for s in sets.values() for x in s["facts"] if x["right"]]
        general = [f(x) for s in sets.values() for x in s["general"]]
        out[name] = {str(t): {"facts_pass": float(np.mean([v >= t for v in facts])),
                              "general_pass": float(np.mean([v >= t for v in general]))} for t in THRESHOLDS}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from flashmem.checkpoints import default_model

    path = default_model.default_gguf() if args.model == "smollm2" else default_model.gemma3_270m_gguf()
    model = flashmem.load(path, dtype="f32", threads=args.threads, max_context=2048)
    results = {"machine": machine(), "model": args.model, "min_score": retrieval.MIN_SCORE, "sets": {}}
    for name, make in SETS.items():
        facts = make()
        asked = range(len(facts)) if name == "everyday" else [(i * 37 + i // 5) % len(facts) for i in range(10)]
        results["sets"][name] = score_set(model, facts, asked)
        print(name, flush=True)
    results["pass_rates"] = pass_rates(results["sets"])
    for name, rates in results["pass_rates"].items():
        print(name, {t: (round(r["facts_pass"], 3), round(r["general_pass"], 3)) for t, r in rates.items()})
    suffix = "" if args.model == "smollm2" else f"_{args.model}"
    save(f"memory_relevance{suffix}", results)
    plot(results, os.path.join(RESULTS, f"memory_relevance{suffix}.png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, f) in zip(axes, SCORES.items()):
        facts = [f(x) for s in results["sets"].values() for x in s["facts"] if x["right"]]
        general = [f(x) for s in results["sets"].values() for x in s["general"]]
        bins = np.linspace(-1, 4.5, 45)
        ax.hist(general, bins, alpha=0.6, label=f"general question, best candidate ({len(general)})")
        ax.hist(facts, bins, alpha=0.6, label=f"fact question, its fact ({len(facts)})")
        if name == "two_way":  # what memory_relevance returns
            ax.axvline(results["min_score"], color="k", ls="--", lw=1, label=f"MIN_SCORE {results['min_score']}")
        ax.set_title(f"{results['model']}: {name.replace('_', '-')} PMI", fontsize=9)
        ax.set_xlabel("nats per token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
