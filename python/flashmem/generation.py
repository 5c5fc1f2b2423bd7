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


class Decoding:
    """The text side of one sequence's generation: samples the next token, detokenizes
    incrementally (each step decodes only the tokens since the last complete character, not the
    whole text again), and ends at an EOS token, a stop string or the token budget. push() returns
    the text that can be shown now: text that may still turn into a stop string, or an incomplete
    UTF-8 character, is held back until it cannot."""

    def __init__(self, tokenizer, sampler, prompt_ids: list[int], stop: list[str], eos: set[int], budget: int,
                 vocab_size: int):
        self.tok, self.sampler, self.stop, self.eos, self.budget = tokenizer, sampler, stop, eos, budget
        sampler.begin(np.asarray(prompt_ids, np.int32), vocab_size)  # the repetition penalty's history
        self.new: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" once done
        self._emitted = 0
        self._prefix = self._read = 0  # new[_prefix:_read]: the tokens last decoded; text ends with them
        self._hold = max((len(x) for x in stop), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: np.ndarray) -> int:
        """The next token from logits (vocab,) (the core sampler; in a batch, decode_step samples)."""
        return self.sampler.sample(logits)

    def push(self, token: int) -> str:
        """Takes the sampled token; returns the text to show now (maybe empty)."""
        self.new.append(token)
        if token in self.eos:  # kept in new, as HF does; its text is not shown
            self.finish_reason = "stop"
            return self._flush()
        before = len(self.text)
        complete = self._detokenize(final=False)
        if complete and self.stop:
            start = max(0, before - self._hold)  # a stop string may begin in text held back before
            cut = min((i for i in (self.text.find(x, start) for x in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
                return self._flush()
        if len(self.new) >= self.budget:
            return self.end("length")
        if not complete:
            return ""
        safe = len(self.text) - self._hold
        if safe <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted:safe], safe
        return piece

    def end(self, reason: str) -> str:
        """Ends early (the context is full, or the caller stops it); returns the text held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self._detokenize(final=True)
            cut = min((i for i in (self.text.find(x) for x in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
        return self._flush()

    def _flush(self) -> str:
        self._detokenize(final=True)  # the tokens of an incomplete character, if it ended there
        piece, self._emitted = self.text[self._emitted:], len(self.text)
        return piece

    def _detokenize(self, final: bool) -> bool:
        """Appends the text of the tokens since the last complete character; False while the last
        ones end in an incomplete UTF-8 character (unless final)."""
        ids = [t for t in self.new if t not in self.eos] if final else self.new
        if self._read >= len(ids):
            return True
        known = self.tok.decode(ids[self._prefix:self._read])
        full = self.tok.decode(ids[self._prefix:])
        if full.endswith("\ufffd") and not final:
            return False
        if full.startswith(known):
            self.text += full[len(known):]
        else:  # a decoder whose text of a prefix is not a prefix of the text: decode it all
            self.text = self.tok.decode(ids)
        self._prefix, self._read = self._read, len(ids)
        return True


class Generation:
    """One generation, iterable as text pieces (its `result` is set at the end). The loop: prefill
    the inputs from the first position the KV cache does not hold already (with reuse_cache), then
    one token at a time until an EOS token, a stop string, max_new_tokens or max_context."""

    def __init__(self, engine, tokenizer, vocab_size: int, slot: int, max_context: int, inputs: Inputs,
                 reuse_cache: bool, max_new_tokens: int, sampler, stop: list[str], eos: set[int],
                 flash_summary: Callable[[int], dict]):
        self.engine, self.tok, self.vocab_size, self.slot, self.max_context = (
            engine, tokenizer, vocab_size, slot, max_context)
        self.inputs, self.reuse_cache, self.max_new, self.sampler, self.stop, self.eos = (
            inputs, reuse_cache, max_new_tokens, sampler, stop, eos)
        self.flash_summary = flash_summary
        self.hold = contextlib.nullcontext  # the model's EngineLock, for a stream
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        with self.hold():
            yield from self.steps()

    def steps(self) -> Iterator[str]:
        inp, engine, slot = self.inputs, self.engine, self.slot
        n_in = len(inp.src)
        # what the slot's KV cache holds now (another call may have run since generate() returned a stream)
        start = prefill_start(engine, inp, slot, self.reuse_cache)
        dec = Decoding(self.tok, self.sampler, inp.token_ids, self.stop, self.eos,
                       min(self.max_new, self.max_context - n_in), self.vocab_size)
        t0 = time.perf_counter()
        logits = engine.forward_inputs(inp.src[start:], inp.embeds, start, False, slot, inp.embed_ids)
        t_first = time.perf_counter()
        engine.reset_sparse_stats()  # the flash figures are per decoded token
        nxt = dec.sample(logits)
        sampler, slots = [self.sampler], np.asarray([slot], np.int32)
        while True:
            piece = dec.push(nxt)
            if piece:
                yield piece
            if dec.done:
                break
            pos = np.asarray([n_in + len(dec.new) - 1], np.int32)
            nxt = int(engine.decode_step(np.asarray([nxt], np.int32), slots, pos, sampler)[0])
        t_end = time.perf_counter()
        decode_steps = max(len(dec.new) - 1, 0)
        self.result = make_result(dec, inp, start, t0, t_first, t_end, self.flash_summary(decode_steps))


def prefill_start(engine, inp: Inputs, slot: int, reuse_cache: bool) -> int:
    """The first input position to run: what the slot's KV cache holds already (its prefix
    identities, csrc/model/kv_cache.h) is reused; at least the last position runs, for its logits."""
    start = min(engine.reusable(inp.ids, slot), len(inp.src) - 1) if reuse_cache else 0
    if start < engine.slot_earliest_restart(slot):  # sliding-window layers no longer hold what it needs
        start = 0
    return start


def make_result(dec: Decoding, inp: Inputs, start: int, t0: float, t_first: float, t_end: float,
                flash: dict) -> GenerationResult:
    n_in, decode_steps = len(inp.src), max(len(dec.new) - 1, 0)
    return GenerationResult(
        text=dec.text, token_ids=dec.new, finish_reason=dec.finish_reason, prompt_tokens=n_in,
        time_to_first_token_s=t_first - t0 + inp.assemble_s,
        decode_tokens_per_s=decode_steps / (t_end - t_first) if decode_steps and t_end > t_first else 0.0,
        prefill_tokens_per_s=(n_in - start) / (t_first - t0) if t_first > t0 else 0.0,
        cached_tokens=start, memories=inp.memories,
        timings={"retrieval_s": inp.retrieval_s, "assemble_s": inp.assemble_s,
                 "memories_dropped": inp.memories_dropped, "prefill_s": t_first - t0,
                 "decode_s": t_end - t_first, "total_s": t_end - t0 + inp.assemble_s},
        flash=flash)
