"""Memory that helps by default, on the real SmolLM2 (f32), greedy: fact questions (direct and
paraphrased) answered through generate(memory=bank) with default arguments against the fact
written in the prompt; general questions keep their reply with a bank attached; paraphrase
retrieval; the relevance check running beside a cached conversation; ChatMemory's merge,
supersede, forget and persistence. bench/memory_qa.py has the full figures."""
from __future__ import annotations

import numpy as np
import pytest

import flashmem
from flashmem.memory import ChatMemory, retrieval

import facts as F


@pytest.fixture(scope="module")
def model(smollm2_f32):
    return smollm2_f32


@pytest.fixture(scope="module")
def household(model):
    bank = flashmem.MemoryBank(model.d_model)
    fs = F.household_set()
    for f, *_ in fs:
        bank.add_text(model, f)
    return fs, bank


def chat(q):
    return [{"role": "user", "content": q}]


def correct(answer, text):
    return answer.lower() in text.lower().replace(",", "")


def test_defaults_answer_fact_questions(model, household):
    """Household facts (200 in the bank), 10 questions, direct and paraphrased: defaults reach at
    least 0.8x the accuracy of the fact written in the prompt; without memory ~0."""
    fs, bank = household
    asked = [(i * 37 + i // 5) % len(fs) for i in range(10)]
    score = {"none": 0, "default": 0, "in_prompt": 0}
    for col in (1, 2):
        for qi in asked:
            fact, q, a = fs[qi][0], fs[qi][col], fs[qi][3]
            score["none"] += correct(a, model.generate(chat(q), max_new_tokens=20).text)
            score["default"] += correct(a, model.generate(chat(q), memory=bank, max_new_tokens=20).text)
            score["in_prompt"] += correct(a, model.generate(chat(f"{fact}\n\n{q}"), max_new_tokens=20).text)
    print(f"\nhousehold facts, 20 questions: {score}")
    assert score["none"] <= 2
    assert score["default"] >= 0.8 * score["in_prompt"] - 1


def test_paraphrases_find_their_facts(model, household):
    """Retrieval hit@1 on questions worded away from their facts ("How do I get online at X's
    apartment?" for "The wifi password in X's flat is ..."): the fused dense + BM25 ranking."""
    fs, bank = household
    hits = 0
    asked = range(0, len(fs), 5)
    for qi in asked:
        q = fs[qi][2]
        best = retrieval.candidates(bank, q, model.embed_key(q))[0]
        hits += best.id == bank.ids()[qi]
    print(f"\nparaphrase hit@1 {hits / len(asked):.2f}")
    assert hits >= 0.7 * len(asked)


def test_relevance_is_two_way_pmi(model):
    """memory_relevance against a plain reference: log-softmax of each sequence's full logits
    (model.logits, an empty cache), forward PMI over the query's tokens and backward PMI over the
    memory's, averaged. Also the order of magnitude that MIN_SCORE assumes: a fact passes for its
    question, and a general question on the same topic stays below it."""
    tok = model.tokenizer

    def logp(context, scored):
        ctx = tok.encode(context)
        lg = model.logits(ctx + scored).astype(np.float64)
        lg -= lg.max(1, keepdims=True)
        lp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return lp[np.arange(len(ctx) - 1, len(ctx) + len(scored) - 1), scored]

    def reference(memory, query):
        q = tok.encode(" " + query, add_special_tokens=False)
        m = tok.encode(" " + memory, add_special_tokens=False)
        fwd = logp(f"Context: {memory}\nQuestion:", q) - logp("Context: none\nQuestion:", q)
        bwd = logp(f"Question: {query}\nFact:", m) - logp("Question: none\nFact:", m)
        return (fwd.mean() + bwd.mean()) / 2

    fact, question, general = "Jana lives in Kyoto.", "Where does Jana live?", "Which city is the capital of Japan?"
    for memory, query in ((fact, question), (fact, general)):
        assert model.memory_relevance(memory, query) == pytest.approx(reference(memory, query), abs=2e-3)
    assert model.memory_relevance(fact, question) >= retrieval.MIN_SCORE > model.memory_relevance(fact, general)
    assert model.memory_relevance("", question) == float("-inf")


def test_general_questions_keep_their_reply(model, household):
    _, bank = household
    same = sum(model.generate(chat(q), memory=bank, max_new_tokens=16).text ==
               model.generate(chat(q), max_new_tokens=16).text for q in F.GENERAL_QUESTIONS[::2])
    assert same >= 18


def test_no_relevant_memory_means_the_plain_prompt(model, household):
    _, bank = household
    r = model.generate(chat("What is the capital of France?"), memory=bank, max_new_tokens=8)
    assert r.memories == []
    plain = model.generate(chat("What is the capital of France?"), max_new_tokens=8, reuse_cache=False)
    assert r.token_ids == plain.token_ids and r.prompt_tokens == plain.prompt_tokens


def test_min_score_none_and_layouts(model, household):
    fs, bank = household
    q = fs[3][1]
    r = model.generate(chat(q), memory=bank, memory_k=3, memory_min_score=None, max_new_tokens=4)
    assert len(r.memories) == 3 and all(np.isnan(m["relevance"]) for m in r.memories)
    assert r.memories[-1]["text"] == fs[3][0]  # best last: next to the question
    # "context" in a chat puts the memories inside the last user message
    chat_text = model.tokenizer.apply_chat_template(chat(q))
    user_at = len(model.tokenizer.encode(chat_text.split(q)[0], add_special_tokens=False))
    assert r.memories[0]["position"] >= user_at - 2
    for pos in ("prefix", "context"):
        t = model.generate(q, memory=bank, memory_position=pos, max_new_tokens=4)
        assert t.memories and t.memories[0]["position"] <= 1
    with pytest.raises(ValueError, match="memory_min_score"):
        model.generate(chat(q), memory=bank, memory_min_score="high")
    with pytest.raises(ValueError, match="memory_position"):
        model.generate(chat(q), memory=bank, memory_position="middle")


def test_retrieval_keeps_the_cached_conversation(model, household):
    """The key and relevance passes run in the KV cache's last rows: the next turn of a
    conversation reuses the cached prefix."""
    _, bank = household
    msgs = chat("Tell me about bridges.")
    first = model.generate(msgs, max_new_tokens=8)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "What does Aurelio drive?"}]
    r = model.generate(msgs, memory=bank, max_new_tokens=8)
    assert r.memories and r.cached_tokens >= first.prompt_tokens - 1


def test_memory_larger_than_the_context(model):
    small = flashmem.load(model.path, dtype="f32", threads=2, max_context=64)
    bank = flashmem.MemoryBank(small.d_model)
    bank.add_text(small, "Aurelio drives a Toyota. " * 12)
    r = small.generate(chat("What car does Aurelio drive?"), memory=bank, max_new_tokens=4, memory_min_score=None)
    assert r.memories == [] and r.timings["memories_dropped"] == 1  # dropped: it cannot fit


def test_chat_memory_merge_supersede_forget_persist(model, tmp_path):
    path = str(tmp_path / "me.bank")
    cm = ChatMemory(model, path)
    a = cm.remember("My favourite colour is blue.")
    assert cm.remember("My favourite colour is blue!") != a and len(cm.bank) == 1  # merged
    assert cm.bank.get(cm.bank.ids()[0]).metadata["said"] == 2
    cm.remember("I drive a Volvo.")
    cm.remember("My favourite colour is now green.")  # supersedes blue
    texts = sorted(cm.bank.get(i).text for i in cm.bank.ids())
    assert texts == ["I drive a Volvo.", "My favourite colour is now green."]
    assert cm.remember("What is my favourite colour?") is None  # questions state nothing
    assert cm.remember("Tell me a joke about cats.") is None  # nor do requests
    assert cm.remember("Can you write a poem") is None
    again = ChatMemory(model, path)  # persisted
    assert sorted(again.bank.get(i).text for i in again.bank.ids()) == texts
    r = again.send("What is my favourite colour?", max_new_tokens=12)
    assert [m["text"] for m in r.memories] == ["My favourite colour is now green."]
    cm.remember("Remember that the gate code is 4471.")  # stored as the statement itself
    assert "The gate code is 4471." in [cm.bank.get(i).text for i in cm.bank.ids()]
    small = ChatMemory(model, None, capacity=2)
    for s in ["I play the oboe.", "My dog is called Pixel.", "I was born in Riga."]:
        small.remember(s)
    assert len(small.bank) == 2
    with pytest.raises(ValueError, match="capacity"):
        ChatMemory(model, None, capacity=0)


def test_chat_memory_bank_of_another_model(model, tmp_path):
    path = str(tmp_path / "other.bank")
    flashmem.MemoryBank(64).save(path)
    with pytest.raises(ValueError, match="dimension 64"):
        ChatMemory(model, path)


def test_long_conversation_beats_truncated_history(model):
    """The 104-turn conversation of tests/facts.py (facts stated in the first turns, small talk,
    two facts updated midway, all 12 asked at the end) through ChatMemory with its defaults,
    against the same conversation kept as plain history truncated to the 512-token context (as
    llama.cpp's context shift keeps the newer half). Small-talk replies are cut to 4 tokens to
    keep the test short; the history holds those same replies."""
    small = flashmem.load(model.path, dtype="f32", threads=2, max_context=512)
    msgs, questions = F.conversation_script(104)
    asked = {i: a for i, _, a in questions}
    cm = ChatMemory(small, None)
    history, by_memory, by_history = [], 0, 0

    def n_tokens(h):
        return len(small.tokenizer.encode(small.tokenizer.apply_chat_template(h), add_special_tokens=False))

    for i, m in enumerate(msgs):
        r = cm.send(m, max_new_tokens=16 if i in asked else 4)
        history.append({"role": "user", "content": m})
        while n_tokens(history) > 512 - 16:
            history = history[len(history) // 2 // 2 * 2:]  # the newer half, whole exchanges
        if i in asked:
            h = small.generate(history, max_new_tokens=16)
            by_memory += correct(asked[i], r.text)
            by_history += correct(asked[i], h.text)
            history.append({"role": "assistant", "content": h.text})
        else:
            history.append({"role": "assistant", "content": r.text})
    print(f"facts recalled: ChatMemory {by_memory}/12, truncated history {by_history}/12")
    assert by_memory >= 5 and by_memory >= by_history + 3
