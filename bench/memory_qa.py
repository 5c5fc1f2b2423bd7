"""Does long-term memory help answers with default arguments? SmolLM2-135M-Instruct (or Gemma 3
270M), greedy, chat prompts.

For each fact set of tests/facts.py (personal, household, world: 120-200 invented facts each) a
bank holds every fact (bank.add_text); questions about n facts are asked in their direct wording
and paraphrased away from it:
- no memory;
- generate(chat, memory=bank) with default arguments;
- the right fact written in the user message before the question (fact in prompt).
Accuracy: the answer appears in the reply. Also: retrieval hit@1 (the injected memory is the
asked fact), how many general questions (which need no memory) keep their exact greedy reply with
the bank attached, and TTFT. Writes bench/results/memory_qa[_MODEL].json and .png.

With --conversation: the scripted conversation of tests/facts.py (104 user turns: 12 facts
stated at the start, small talk, two facts updated midway, every fact asked at the end), answered
by ChatMemory and by the whole conversation as plain chat history in a 512-token context that,
when full, discards its oldest half (llama.cpp's context shift). Writes memory_conversation.json.

    python bench/memory_qa.py [--model smollm2|gemma3] [--questions 20] [--threads 2] [--conversation]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from common import RESULTS, machine, median, save  # noqa: E402
import facts as F  # noqa: E402

import flashmem  # noqa: E402

SETS = {"personal": F.personal_set, "household": F.household_set, "world": F.world_set}


def load(name: str, threads: int):
    from flashmem.checkpoints import default_model

    path = default_model.default_gguf() if name == "smollm2" else default_model.gemma3_270m_gguf()
    return flashmem.load(path, dtype="f32", threads=threads, max_context=2048)


def correct(answer: str, text: str) -> bool:
    return answer.lower() in text.lower().replace(",", "")


def chat(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def run_set(model, facts, n, new_tokens, kw):
    bank = flashmem.MemoryBank(model.d_model)
    t0 = time.perf_counter()
    for f, *_ in facts:
        bank.add_text(model, f)
    add_s = (time.perf_counter() - t0) / len(facts)
    asked = [(i * 37 + i // 5) % len(facts) for i in range(n)]
    out = {"facts": len(facts), "add_ms_per_fact": 1e3 * add_s}
    for wording, col in (("direct", 1), ("paraphrase", 2)):
        acc = {"none": 0, "default": 0, "fact_in_prompt": 0}
        hit, injected, ttft = 0, 0, []
        for qi in asked:
            fact, q, a = facts[qi][0], facts[qi][col], facts[qi][3]
            acc["none"] += correct(a, model.generate(chat(q), max_new_tokens=new_tokens).text)
            r = model.generate(chat(q), memory=bank, max_new_tokens=new_tokens, **kw)
            acc["default"] += correct(a, r.text)
            hit += bool(r.memories) and r.memories[-1]["text"] == fact
            injected += len(r.memories)
            ttft.append(r.time_to_first_token_s)
            acc["fact_in_prompt"] += correct(a, model.generate(chat(f"{fact}\n\n{q}"), max_new_tokens=new_tokens).text)
        out[wording] = {**{k: v / n for k, v in acc.items()}, "hit_at_1": hit / n,
                        "memories_per_question": injected / n, "ttft_ms_median": 1e3 * median(ttft)}
        print(f"  {wording}: {out[wording]}", flush=True)
    same, ttft_g, with_mem = 0, [], 0
    for q in F.GENERAL_QUESTIONS:
        plain = model.generate(chat(q), max_new_tokens=new_tokens)
        r = model.generate(chat(q), memory=bank, max_new_tokens=new_tokens, **kw)
        same += r.text == plain.text
        with_mem += bool(r.memories)
        ttft_g.append(r.time_to_first_token_s)
    out["general"] = {"questions": len(F.GENERAL_QUESTIONS), "same_reply": same / len(F.GENERAL_QUESTIONS),
                      "got_memory": with_mem / len(F.GENERAL_QUESTIONS), "ttft_ms_median": 1e3 * median(ttft_g)}
    print(f"  general: {out['general']}", flush=True)
    return out


def conversation(model_name: str, threads: int, new_tokens: int, recent_turns: int) -> dict:
    from flashmem.memory import ChatMemory

    model = load(model_name, threads)
    small = flashmem.load(model.path, dtype="f32", threads=threads, max_context=512)
    msgs, questions = F.conversation_script(104)
    asked = {i: a for i, _, a in questions}
    cm = ChatMemory(small, None, recent_turns=recent_turns)
    history, right, answers = [], {"memory": 0, "history": 0}, []

    def n_tokens(h):
        return len(small.tokenizer.encode(small.tokenizer.apply_chat_template(h), add_special_tokens=False))

    t0 = time.perf_counter()
    for i, m in enumerate(msgs):
        r = cm.send(m, max_new_tokens=new_tokens)
        history.append({"role": "user", "content": m})
        if n_tokens(history) > 512 - new_tokens:
            history = history[len(history) // 2 // 2 * 2:]  # the newer half, whole exchanges
        h = small.generate(history, max_new_tokens=new_tokens)
        history.append({"role": "assistant", "content": h.text})
        if i in asked:
            right["memory"] += correct(asked[i], r.text)
            right["history"] += correct(asked[i], h.text)
            answers.append({"question": m, "answer": asked[i], "memory": r.text, "history": h.text,
                            "injected": [x["text"] for x in r.memories]})
            print(answers[-1], flush=True)
    out = {"turns": len(msgs), "questions": len(questions), "context": 512, "new_tokens": new_tokens,
           "recent_turns": recent_turns, "correct": right, "memories_at_end": len(cm.bank),
           "seconds": time.perf_counter() - t0, "answers": answers}
    print({k: v for k, v in out.items() if k != "answers"})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--kw", default="", help="extra generate() arguments, e.g. memory_k=1,memory_min_score=1.0")
    ap.add_argument("--conversation", action="store_true", help="the 104-turn conversation instead")
    ap.add_argument("--recent-turns", type=int, default=0, help="ChatMemory's plain history (exchanges)")
    args = ap.parse_args()
    if args.conversation:
        results = {"machine": machine(), "model": args.model, **conversation(
            args.model, args.threads, args.new_tokens, args.recent_turns)}
        save("memory_conversation", results)
        plot_conversation(results, os.path.join(RESULTS, "memory_conversation.png"))
        return
    kw = {k: eval(v) for k, v in (p.split("=") for p in args.kw.split(",") if p)}  # noqa: S307 (a bench flag)
    model = load(args.model, args.threads)
    results = {"machine": machine(), "model": args.model, "questions": args.questions,
               "new_tokens": args.new_tokens, "generate_kwargs": {k: repr(v) for k, v in kw.items()}, "sets": {}}
    for name in args.sets.split(","):
        print(name, flush=True)
        results["sets"][name] = run_set(model, SETS[name](), args.questions, args.new_tokens, kw)
    suffix = "" if args.model == "smollm2" else f"_{args.model}"
    save(f"memory_qa{suffix}", results)
    plot(results, os.path.join(RESULTS, f"memory_qa{suffix}.png"))


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = list(results["sets"])
    cols = [(s, w) for s in sets for w in ("direct", "paraphrase")]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(cols))
    for j, (k, label) in enumerate((("none", "no memory"), ("default", "memory, defaults"),
                                    ("fact_in_prompt", "fact in prompt"))):
        ax.bar(x + (j - 1) * 0.27, [results["sets"][s][w][k] for s, w in cols], 0.27, label=label)
    ax.set_xticks(x, [f"{s}\n{w}" for s, w in cols])
    ax.set_ylabel("answers correct")
    gen = ", ".join(f"{s} {results['sets'][s]['general']['same_reply']:.2f}" for s in sets)
    ax.set_title(f"{results['model']}: fact questions (greedy); general questions unchanged with the bank: {gen}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_conversation(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = ["ChatMemory", "plain history,\ncontext shift"]
    ax.bar(names, [results["correct"]["memory"], results["correct"]["history"]], color=["C1", "C0"])
    ax.set_ylim(0, results["questions"])
    ax.set_ylabel(f"facts answered (of {results['questions']})")
    ax.set_title(f"{results['model']}: {results['turns']}-turn conversation, {results['context']}-token context",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
