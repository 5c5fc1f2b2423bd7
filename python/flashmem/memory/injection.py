"""Memory injection inside generate(): retrieving memories from a MemoryBank, the layout of the
input sequence (the prompt's tokens, caller-given input embeddings and the memories' value
embeddings), and the input assembly the engine runs.

Layouts: "context" (the default) puts the memories where an instruct model reads context: in the
last user message, one per line, before the question (CONTEXT_TEMPLATE); before a text prompt.
"prefix" (CoMEM's) puts them at positions 0..M-1, after a leading BOS, then any inputs_embeds,
then the prompt; "placeholder" splices them where the placeholder text stands in the text prompt
or the chat-formatted messages. When no memory is relevant, the input is exactly the prompt's.

The engine receives `src` (int32, one per position: a token id, or -(row+1) for row `row` of
`embeds`) and `embeds` (rows, d_model) float32, and builds the forward pass's input buffer from
them in C++ (token rows gathered from the embedding table, embedding rows copied in).

Each position also gets a key (the token id, or the hash of its embedding segment and the row
in it), so a later generate() can reuse the KV-cache entries of the longest common prefix
instead of recomputing them (prefix caching).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import retrieval
from .bank import MemoryBank


@dataclass
class Inputs:
    src: np.ndarray                # (T,) int32
    embeds: np.ndarray | None      # (rows, d) float32
    ids: np.ndarray                # (T,) int64 position identities for prefix reuse (KvCache): token ids,
                                   # and <= -2 for embedding rows (their content's hash)
    embed_ids: np.ndarray | None   # (rows,) int64 the identity of each row of embeds
    token_ids: list[int]           # the token positions' ids (for the repetition penalty)
    memories: list[dict] = field(default_factory=list)
    retrieval_s: float = 0.0       # bank search inside generate()
    assemble_s: float = 0.0        # everything before the forward pass (retrieval, tokenization)
    memories_dropped: int = 0      # retrieved memories left out: the input would not fit


class InputBuilder:
    def __init__(self, d_model: int):
        self.d = d_model
        self.src: list[int] = []
        self.rows: list[np.ndarray] = []
        self.ids: list[int] = []
        self.row_ids: list[int] = []
        self.n_rows = 0
        self.token_ids: list[int] = []

    def __len__(self) -> int:
        return len(self.src)

    def tokens(self, ids) -> None:
        ids = [int(t) for t in ids]
        self.src += ids
        self.ids += ids
        self.token_ids += ids

    def embeddings(self, arr, what: str) -> None:
        """Appends the rows of arr (n, d_model) as positions; checked for shape and finite values."""
        a = np.asarray(arr)
        if a.ndim != 2 or a.shape[1] != self.d:
            raise ValueError(f"{what} must have shape (n, {self.d}) (d_model {self.d}), got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{what} must be a float array, got dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        if not np.isfinite(a).all():
            r, c = np.argwhere(~np.isfinite(a))[0]
            raise ValueError(f"{what} has a non-finite value at row {r}, column {c}")
        if not len(a):
            return
        ident = int.from_bytes(hashlib.blake2b(a.tobytes(), digest_size=8).digest(), "little")
        self.src += range(-self.n_rows - 1, -self.n_rows - 1 - len(a), -1)
        rows = [-2 - ((ident + i * 0x9E3779B97F4A7C15) & (2**62 - 1)) for i in range(len(a))]  # <= -2: not a token
        self.ids += rows
        self.row_ids += rows
        self.rows.append(a)
        self.n_rows += len(a)

    def build(self, memories=None) -> Inputs:
        embeds = np.concatenate(self.rows) if self.rows else None
        return Inputs(np.asarray(self.src, np.int32), embeds, np.asarray(self.ids, np.int64),
                      np.asarray(self.row_ids, np.int64) if self.rows else None, self.token_ids, memories or [])


def chat_text(prompt) -> bool:
    """Whether `prompt` is chat messages (a non-empty list of dicts)."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def default_query(prompt, placeholder: str) -> str:
    """The text to retrieve with: the text prompt, or the last user message, without the placeholder."""
    if isinstance(prompt, str):
        query = prompt
    elif chat_text(prompt):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        query = users[-1] if users else prompt[-1].get("content", "")
    else:
        raise ValueError("memory retrieval needs a text or chat prompt, or memory_query")
    return query.replace(placeholder, " ").strip() or query


def retrieve(bank, k, query: Callable[[], str], embed_key: Callable, d_model: int, min_score: float | None = None,
             relevance: Callable[[str, str], float] | None = None, order_by: str = "best_last"):
    """The memories of `bank` to inject for query(): up to k of the best candidates (dense key and
    BM25, fused) whose relevance reaches min_score (memory/retrieval.py); their value rows and
    descriptions (id, score, relevance, text, slots), in order_by's order. An empty bank gives none (and
    asks for no query)."""
    if not isinstance(bank, MemoryBank):
        raise TypeError(f"memory must be a flashmem.MemoryBank, got {type(bank).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"memory_k must be a positive integer, got {k!r}")
    if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))
                                  or not np.isfinite(min_score)):
        raise ValueError(f"memory_min_score must be a finite number or None, got {min_score!r}")
    if bank.dim != d_model:
        raise ValueError(f"memory bank keys have dimension {bank.dim}, the model's embed_key gives {d_model}")
    if len(bank) == 0:
        return [], []  # documented fallback: nothing to inject
    text = query()
    chosen = retrieval.select(bank, text, embed_key(text), k, min_score, relevance)
    rows, memories = [], []
    for c, m in chosen:
        if m.value is None:
            raise ValueError(f"memory {c.id} has no value embeddings to inject (add it with bank.add_text)")
        rows.append(np.asarray(m.value, np.float32))
        memories.append({"id": c.id, "score": c.score, "relevance": c.relevance, "text": m.text,
                         "slots": int(m.value.shape[0])})
    # "id" (the "prefix" layout): the same set lands at the same positions whatever the query, so
    # its KV-cache entries can be reused; "best_last" ("context", "placeholder"): the most relevant
    # next to the question
    field = {"id": "id", "best_last": "score"}[order_by]
    order = sorted(range(len(memories)), key=lambda j: memories[j][field])
    return [rows[j] for j in order], [memories[j] for j in order]


# The "context" layout of a chat prompt: the last user message becomes this, the memories (one per
# line) standing for {memories}.
CONTEXT_TEMPLATE = "{memories}\n\n{question}"
_SLOT = "\ue000memories\ue000"  # stands for the memories in the text until it is tokenized
POSITIONS = ("context", "prefix", "placeholder")


def _context_messages(messages: list[dict]) -> list[dict] | None:
    """The chat messages with _SLOT before the last user message's content (None: no user message)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        return None
    out = [dict(m) for m in messages]
    out[last]["content"] = CONTEXT_TEMPLATE.format(memories=_SLOT, question=str(out[last].get("content", "")))
    return out


def _add_memories(b: InputBuilder, rows, memories, sep: list[int]) -> None:
    """The memories' value rows as positions, each followed by the separator tokens."""
    for r, m in zip(rows, memories):
        m["position"] = len(b)
        b.embeddings(r, f"value of memory {m['id']}")
        b.tokens(sep)


def assemble(prompt, inputs_embeds, tokenizer, encode_prompt: Callable, d_model: int, memory=None, memory_k=4,
             position="context", placeholder="<memory>", query=None, embed_key: Callable | None = None,
             min_score: float | None = None, relevance: Callable | None = None,
             max_positions: int | None = None) -> Inputs:
    """The input sequence of a generate() call. encode_prompt: text, ids or chat messages -> checked
    token ids; embed_key: text -> a key for the bank; relevance: (memory text, query) -> nats.
    Memories that would make the input longer than max_positions are left out, the least relevant
    first (Inputs.memories_dropped counts them)."""
    if prompt is None and inputs_embeds is None:
        raise ValueError("generate needs a prompt, inputs_embeds, or both")
    memories, rows = [], []
    t0 = time.perf_counter()
    if memory is not None:
        if position not in POSITIONS:
            raise ValueError(f"memory_position must be one of {POSITIONS}, got {position!r}")
        ask = (lambda: default_query(prompt, placeholder)) if query is None else (lambda: query)
        rows, memories = retrieve(memory, memory_k, ask, embed_key, d_model, min_score, relevance,
                                  "id" if position == "prefix" else "best_last")
    retrieval_s = time.perf_counter() - t0
    dropped = 0
    while True:
        inputs = _layout(prompt, inputs_embeds, tokenizer, encode_prompt, d_model, memory is not None, rows,
                         [dict(m) for m in memories], position, placeholder)
        if max_positions is None or len(inputs.src) <= max_positions or not memories:
            break
        worst = min(range(len(memories)), key=lambda j: memories[j]["score"])
        del rows[worst], memories[worst]
        dropped += 1
    inputs.retrieval_s, inputs.memories_dropped = retrieval_s, dropped
    return inputs


def _layout(prompt, inputs_embeds, tokenizer, encode_prompt, d_model, with_memory, rows, memories, position,
            placeholder) -> Inputs:
    b = InputBuilder(d_model)
    sep = tokenizer.encode("\n", add_special_tokens=False)
    if position == "placeholder" and with_memory:
        if prompt is None:
            raise ValueError("memory_position='placeholder' needs a prompt holding the placeholder")
        text = tokenizer.apply_chat_template(prompt) if chat_text(prompt) else prompt
        if not isinstance(text, str) or text.count(placeholder) != 1:
            raise ValueError(f"memory_position='placeholder' needs the text prompt or chat messages to hold "
                             f"{placeholder!r} exactly once")
        return _split_at(b, text, placeholder, not isinstance(prompt, str), tokenizer, inputs_embeds, rows, memories,
                         sep)
    if position == "context" and rows and chat_text(prompt):
        messages = _context_messages(prompt)
        if messages is not None:
            text = tokenizer.apply_chat_template(messages)
            return _split_at(b, text, _SLOT, True, tokenizer, inputs_embeds, rows, memories, sep)
    # "prefix", and "context" for a text prompt: the memories first (after a leading BOS), one per line
    ids = encode_prompt(prompt) if prompt is not None else []
    bos = tokenizer.bos_token_id
    if rows and ids and bos is not None and ids[0] == bos:  # memories go after a leading BOS
        b.tokens(ids[:1])
        ids = ids[1:]
    _add_memories(b, rows, memories, sep if position == "context" else [])
    if inputs_embeds is not None:
        b.embeddings(inputs_embeds, "inputs_embeds")
        if not len(np.asarray(inputs_embeds)) and not ids:
            raise ValueError("inputs_embeds is empty")
    b.tokens(ids)
    return b.build(memories)


def _split_at(b: InputBuilder, text: str, slot: str, is_chat: bool, tokenizer, inputs_embeds, rows, memories,
              sep) -> Inputs:
    """The text around `slot` as tokens, the memories where it stood (each followed by sep but the last)."""
    before, after = text.split(slot)
    if inputs_embeds is not None:
        b.embeddings(inputs_embeds, "inputs_embeds")
    b.tokens(tokenizer.encode(before, add_special_tokens=not is_chat) if before else [])
    _add_memories(b, rows, memories, sep)
    if sep and memories:  # the template's own text follows the last memory
        del b.src[-len(sep):], b.ids[-len(sep):], b.token_ids[-len(sep):]
    b.tokens(tokenizer.encode(after, add_special_tokens=False) if after else [])
    return b.build(memories)
