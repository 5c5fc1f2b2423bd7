"""Conversational long-term memory (MemGPT-, mem0-, Think-in-Memory-style) over a MemoryBank.

    chat = flashmem.memory.ChatMemory(model, "me.bank")     # the bank file persists across runs
    chat.send("My favourite colour is blue.")
    ...                                                      # hundreds of turns later
    chat.send("What is my favourite colour?").text           # the memory is retrieved and injected

Each turn is answered from the system prompt, the last `recent_turns` exchanges (default 0) as
plain chat history, and the memories retrieved for the new message (generate(memory=bank) with the
"context" layout and the relevance check at `min_score`, generate()'s default). Then the exchange
is stored:
- what is stored is the user's message (what the user states is what later questions ask
  about); the assistant's reply goes in the memory's metadata, not in its text. Questions (a
  message ending in "?") and requests (a message that starts with a verb of asking, "Tell me
  ...", "Write ...", "Can you ...": is_request) are not stored: they state nothing. "Remember
  (that) X" stores X.
- merge (TiM): a message that repeats a memory (its words nearly the same, word Jaccard >=
  MERGE_JACCARD) replaces it, and the count of times it was said carries over.
- supersede: a message about the same thing as an older memory replaces it: "my favourite colour
  is now green" removes "my favourite colour is blue". The same thing: at least SUPERSEDE_SHARED
  of each one's content words (stemmed, without stop words) recur in the other, the rest being
  the value, and their keys' cosine is at least SUPERSEDE_COSINE.
- forget (TiM): beyond `capacity` memories, the least useful goes: the fewest uses (times it was
  injected), then the oldest.
The bank is saved (atomically) after every stored turn.

Measured on the 104-turn conversation of bench/memory_qa.py (SmolLM2-135M, the 12 questions at its
end, 24 new tokens): 7 of 12 answered, the right memory injected for 11 (plain history with
context shift: 0 of 12).
- recent_turns: the last exchange makes the small model copy its previous reply into the next
  answer ("Odette." to three questions in a row); 0 exchanges answered 7 of 12 and 1 exchange 6
  (with the forward-only relevance check of the time at 1.0).
- the relevance threshold: the two-way check at generate()'s 1.3 passes every statement for its
  question but "What is my job?" against "I work as a surveyor." (1.10 on SmolLM2, 1.15 on
  Gemma 3); of 92 general and small-talk questions asked against the 14 statements, one passes
  (SmolLM2: violin strings against "I play the oboe.", 1.40).
"""
from __future__ import annotations

import os
import re
import time

import numpy as np

from .bank import MemoryBank, metadata_of
from .retrieval import MIN_SCORE, stemmer

MERGE_JACCARD = 0.8
SUPERSEDE_COSINE = 0.4
SUPERSEDE_SHARED = 0.5
STOPWORDS = frozenset("""a an the is are was were be been am i me my mine you your we our it its of in on at to for
and or but now also still no longer not this that these those has have had do does did with as by from so just
really actually""".split())


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def content_words(text: str) -> set[str]:
    return set(stemmer().stemWords([w for w in words(text) if w not in STOPWORDS]))


REQUEST_VERBS = frozenset("""tell give write describe suggest explain list name show help make find recommend
translate summarize summarise compare calculate create draft plan define teach generate share provide
recite sing draw fix correct rewrite rephrase continue imagine pretend compose brainstorm""".split())
REQUEST_OPENINGS = ("please", "can you", "could you", "would you", "will you", "let's", "let us")
REMEMBER = re.compile(r"^(?:please\s+)?(?:remember|note|keep in mind)\s*(?:that\b|:)?\s*", re.I)


def is_request(text: str) -> bool:
    """A message that asks for something rather than stating it: a question, an imperative
    ("Tell me a joke."), or a polite request ("Can you ...")."""
    t = text.strip().lower()
    w = words(t)
    return t.endswith("?") or not w or w[0] in REQUEST_VERBS or t.startswith(REQUEST_OPENINGS)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


class ChatMemory:
    def __init__(self, model, path: str | None = None, system: str | None = None, capacity: int = 10_000,
                 recent_turns: int = 0, index: str = "flat", min_score: float = MIN_SCORE):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if isinstance(recent_turns, bool) or not isinstance(recent_turns, int) or recent_turns < 0:
            raise ValueError(f"recent_turns must be a non-negative integer, got {recent_turns!r}")
        self.model, self.path, self.system, self.capacity, self.recent_turns, self.min_score = (
            model, path, system, capacity, recent_turns, min_score)
        if path is not None and os.path.exists(path):
            self.bank = MemoryBank.load(path)
            if self.bank.dim != model.d_model:
                raise ValueError(f"{path}: the memory bank's keys have dimension {self.bank.dim}, this model's "
                                 f"{model.d_model} (a bank made with another model)")
        else:
            self.bank = MemoryBank(model.d_model, index=index)
        self.history: list[dict] = []  # this session's exchanges, as chat messages

    def messages(self, user: str) -> list[dict]:
        recent = self.history[len(self.history) - 2 * self.recent_turns:] if self.recent_turns else []
        return ([{"role": "system", "content": self.system}] if self.system else []) + recent + [
            {"role": "user", "content": user}]

    def send(self, user: str, stream: bool = False, **generate_kw):
        """Answers `user` with the memories it needs; stores the exchange (see the module's text).
        Returns generate()'s GenerationResult (with stream=True an iterator of text pieces whose
        exchange is stored when it ends)."""
        if not isinstance(user, str) or not user.strip():
            raise ValueError("send: the message must be a non-empty string")
        generate_kw.setdefault("memory_min_score", self.min_score)
        run = self.model.generate(self.messages(user), memory=self.bank, stream=True, **generate_kw)
        if stream:
            return self._stream(user, run)
        for _ in run:
            pass
        self._after(user, run.result)
        return run.result

    def _stream(self, user, run):
        yield from run
        self._after(user, run.result)

    def _after(self, user: str, result) -> None:
        for m in result.memories:
            md = self.bank.get(m["id"]).metadata
            self.bank.update(m["id"], metadata={**md, "uses": md.get("uses", 0) + 1, "used": time.time()})
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": result.text}]
        self.remember(user, reply=result.text)

    def remember(self, text: str, reply: str | None = None) -> int | None:
        """Stores a statement as a memory (merging, superseding and forgetting as the module's text
        says); returns its id, or None for a question or request (not stored)."""
        said = " ".join(text.split())
        text = REMEMBER.sub("", said, count=1)
        if text != said:  # "remember that the code is 4471" -> "The code is 4471"
            text = text[:1].upper() + text[1:]
        if is_request(text):
            return None
        key = self.model.embed_key(text)
        value = self.model.embed_memory(text)
        if self.model.dtype == "f16":
            value = value.astype(np.float16)
        md = {"said": 1, "uses": 0, "time": time.time()}
        if reply is not None:
            md["reply"] = reply
        replaced = []
        if len(self.bank):
            ids, scores = self.bank.search(key[None], k=min(8, len(self.bank)))
            mine = content_words(text)
            for i, s in zip(ids[0], scores[0]):
                if i < 0:
                    continue
                old = self.bank.get(int(i))
                theirs = content_words(old.text)
                if jaccard(set(words(text)), set(words(old.text))) >= MERGE_JACCARD:
                    md["said"] += old.metadata.get("said", 1)  # merge: the same statement again
                    md["uses"] += old.metadata.get("uses", 0)
                    replaced.append(int(i))
                elif (s >= SUPERSEDE_COSINE and mine and theirs and len(mine & theirs) / len(theirs) >= SUPERSEDE_SHARED
                      and len(mine & theirs) / len(mine) >= SUPERSEDE_SHARED):
                    md["supersedes"] = md.get("supersedes", []) + [old.text]  # the same thing, a newer value
                    replaced.append(int(i))
        if replaced:
            new_id = self.bank.merge(replaced, key=key, value=value, text=text, metadata=md)
        else:
            new_id = int(self.bank.add(key[None], values=[value], texts=[text], metadata=[md])[0])
        self._forget()
        if self.path is not None:
            self.bank.save(self.path)
        return new_id

    def _forget(self) -> None:
        over = len(self.bank) - self.capacity
        if over <= 0:
            return
        entries = [(i, metadata_of(md, i)) for i, md in self.bank._bank.metadata_all()]
        entries.sort(key=lambda e: (e[1].get("uses", 0), e[1].get("used", e[1].get("time", 0.0))))
        self.bank.remove([i for i, _ in entries[:over]])

    def save(self, path: str | None = None) -> None:
        path = path or self.path
        if path is None:
            raise ValueError("save: no path (pass one, or give ChatMemory a path)")
        self.bank.save(path)
