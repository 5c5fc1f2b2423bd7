"""Generation: the decode loop and its result, and what the KV cache holds between calls."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .memory.injection import Inputs


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens only (ending with the EOS token when one stopped generation)
    finish_reason: str  # "stop" (eos or stop string) or "length"
    prompt_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    timings: dict = field(default_factory=dict)
    flash: dict = field(default_factory=dict)  # sparse FFN figures per decoded token (flash/streaming.summarize)
    cached_tokens: int = 0  # input positions whose KV-cache entries were reused (OpenAI's name for it)
    memories: list = field(default_factory=list)  # injected memories: id, score, text, slots, position


class KvPositions:
    """The identity of each position the engine's KV cache holds (a token id, or the hash of an
    embedding segment and the row in it; see memory/injection.py), so that a later generate()
    reuses the entries of the longest common prefix instead of recomputing them."""

    def __init__(self):
        self.positions: list = []

    def forget(self) -> None:
        """The KV cache is being overwritten: nothing in it can be reused."""
        self.positions = []

    def reusable(self, keys: list) -> int:
        """How many leading positions of `keys` the KV cache already holds."""
        n = min(len(self.positions), len(keys))
        i = 0
        while i < n and self.positions[i] == keys[i]:
            i += 1
        return i


class Generation:
    """One generation, iterable as text pieces (its `result` is set at the end). The loop: prefill
    the inputs from the first position the KV cache does not hold already (with reuse_cache), then
    one token at a time until an EOS token, a stop string, max_new_tokens or max_context."""

    def __init__(self, engine, tokenizer, kv: KvPositions, max_context: int, inputs: Inputs, reuse_cache: bool,
                 max_new_tokens: int, sampler, stop: list[str], eos: set[int], flash_summary: Callable[[int], dict]):
        self.engine, self.tok, self.kv, self.max_context = engine, tokenizer, kv, max_context
        self.inputs, self.reuse_cache, self.max_new, self.sampler, self.stop, self.eos = (
            inputs, reuse_cache, max_new_tokens, sampler, stop, eos)
        self.flash_summary = flash_summary
        self.hold = contextlib.nullcontext  # the model's EngineLock, for a stream
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        with self.hold():
            yield from self.steps()

    def steps(self) -> Iterator[str]:
        inp, engine, tok, kv = self.inputs, self.engine, self.tok, self.kv
        n_in = len(inp.src)
        # what the KV cache holds now (another call may have run since generate() returned a stream)
        start = min(kv.reusable(inp.keys), n_in - 1) if self.reuse_cache else 0
        if start < engine.earliest_restart:  # sliding-window layers no longer hold what it needs
            start = 0
        prompt = inp.token_ids  # for the repetition penalty: the token positions
        budget = min(self.max_new, self.max_context - n_in)
        kv.forget()  # the KV cache is being rewritten from `start`; set again once this succeeds
        t0 = time.perf_counter()
        logits = engine.forward_inputs(inp.src[start:], inp.embeds, start, False)
        t_first = time.perf_counter()
        kept = inp.keys[:]
        engine.reset_sparse_stats()  # the flash figures are per decoded token
        new, text, emitted, reason = [], "", 0, "length"
        hold = max((len(s) for s in self.stop), default=1) - 1  # text that may still become a stop string
        while True:
            nxt = self.sampler(logits, prompt + new)
            new.append(nxt)
            if nxt in self.eos:  # kept in token_ids, as HF does; decode() drops it from the text
                reason = "stop"
                break
            text = tok.decode(new)
            cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, reason = text[:cut], "stop"
                break
            safe = len(text) - hold if not text.endswith("\ufffd") else len(text.rstrip("\ufffd")) - hold
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(new) >= budget:
                break
            logits = engine.forward(np.asarray([nxt], np.int32), n_in + len(new) - 1, False)
            kept.append(nxt)
            kv.positions = kept  # valid up to here, also when the caller stops iterating early
        kv.positions = kept
        if len(text) > emitted:
            yield text[emitted:]
        t_end = time.perf_counter()
        decode_steps = max(len(new) - 1, 0)
        self.result = GenerationResult(
            text=text, token_ids=new, finish_reason=reason, prompt_tokens=n_in,
            time_to_first_token_s=t_first - t0 + inp.assemble_s,
            decode_tokens_per_s=decode_steps / (t_end - t_first) if decode_steps else 0.0,
            prefill_tokens_per_s=(n_in - start) / (t_first - t0),
            cached_tokens=start, memories=inp.memories,
            timings={"retrieval_s": inp.retrieval_s, "assemble_s": inp.assemble_s,
                     "memories_dropped": inp.memories_dropped, "prefill_s": t_first - t0,
                     "decode_s": t_end - t_first, "total_s": t_end - t0 + inp.assemble_s},
            flash=self.flash_summary(decode_steps))
