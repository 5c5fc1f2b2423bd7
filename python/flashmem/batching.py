"""Continuous batching: many generations decoded together over one model's KV-cache slots.

A BatchRunner holds requests: waiting ones, and active ones, each in a KV slot of its own
(flashmem.load(max_batch=N) gives the engine N slots). Every step() admits waiting requests into
free slots (their prompts are prefilled, and their first token sampled) and then decodes one token
of every other active request in one engine call (Model.forward_batch in the core: one pass over
the weights for the whole batch; with flash offloading, the union of the batch's neurons is read
once). A finished or cancelled request leaves its slot at once; the next waiting request takes it
at the next step. A slot keeps what its KV cache holds after its request ends: a later request
whose prompt starts the same way (a chat's next turn, a shared system prompt) is put in the slot
that holds most of it, and that part is not computed again.

generate() with a list of prompts runs one; so does the OpenAI-compatible server (serving/).
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import numpy as np

from .generation import Decoding, GenerationResult, make_result, prefill_start
from .memory import injection, retrieval


class Request:
    """One generation in a BatchRunner. Read its fields from the thread that runs step(), or once
    it is done: id; prompt_tokens; completion_tokens; text (so far); finish_reason ("stop", "length",
    "cancelled" or "error"; None while running); error (the exception, with "error"); result (a
    GenerationResult once done)."""

    def __init__(self, rid: int, prompt, options: dict, prompt_tokens: int):
        self.id, self.prompt, self.options, self.prompt_tokens = rid, prompt, options, prompt_tokens
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.result: GenerationResult | None = None
        self.slot: int | None = None
        self.submitted = time.perf_counter()
        self._cancel = False
        self._decoding: Decoding | None = None
        self._inputs = None
        self._ids = None  # the prompt's token ids (int64), as submit() encoded them
        self._next = 0  # the token the next step runs, at position _position
        self._position = 0
        self._start = 0  # prefill: the first position run (the ones before came from the KV cache)
        self._t0 = self._t_first = 0.0

    @property
    def text(self) -> str:
        return self._decoding.text if self._decoding else ""

    @property
    def completion_tokens(self) -> int:
        return len(self._decoding.new) if self._decoding else 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return f"Request(id={self.id}, slot={self.slot}, finish_reason={self.finish_reason!r})"


class BatchRunner:
    """Continuous batching over `model`'s KV slots (module docstring). submit() and cancel() may be
    called from any thread; step() from one thread at a time."""

    def __init__(self, model, max_batch: int | None = None):
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool)
                                      or not 1 <= max_batch <= model.max_batch):
            raise ValueError(f"max_batch must be an integer in [1, {model.max_batch}] (the model's KV slots), "
                             f"got {max_batch!r}")
        self.model = model
        self.max_batch = max_batch or model.max_batch
        self._waiting: deque[Request] = deque()
        self._active: dict[int, Request] = {}  # slot -> request
        self._lock = threading.Lock()
        self._ids = itertools.count()

    # --- any thread -------------------------------------------------------------------------
    def submit(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, eos_token_id: int | list[int] | None = None, memory=None,
               memory_k: int = 1, memory_position: str = "context", memory_placeholder: str = "<memory>",
               memory_query: str | None = None, memory_min_score: float | None = retrieval.MIN_SCORE,
               reuse_cache: bool = True) -> Request:
        """Queues a generation (Model.generate's arguments). Bad arguments raise ValueError or
        TypeError here; a prompt that does not fit max_context too."""
        model = self.model
        sampler, stop, eos = model._generation_options(max_new_tokens, temperature, top_k, top_p, min_p,
                                                        repetition_penalty, seed, stop, eos_token_id)
        if memory_position not in injection.POSITIONS:
            raise ValueError(f"memory_position must be one of {', '.join(injection.POSITIONS)}, "
                             f"got {memory_position!r}")
        ids = model.encode_prompt(prompt)
        if len(ids) >= model.max_context:
            raise ValueError(f"prompt has {len(ids)} tokens; max_context {model.max_context} leaves no room "
                             "for a new token")
        options = dict(sampler=sampler, stop=stop, eos=eos, max_new_tokens=max_new_tokens, memory=memory,
                       memory_k=memory_k, memory_position=memory_position, memory_placeholder=memory_placeholder,
                       memory_query=memory_query, memory_min_score=memory_min_score, reuse_cache=reuse_cache)
        with self._lock:
            req = Request(next(self._ids), prompt, options, len(ids))
            req._ids = np.asarray(ids, np.int64)  # the prompt's own tokens: which slot holds most of them
            self._waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stops a request: it ends with finish_reason "cancelled" at the next step, which frees its slot."""
        req._cancel = True

    def pending(self) -> int:
        """Requests waiting or active."""
        with self._lock:
            return len(self._waiting) + len(self._active)

    # --- the stepping thread --------------------------------------------------------------------
    def step(self) -> list[tuple[Request, str, bool]]:
        """Admits waiting requests into free slots, then decodes one token of every other active
        request. Returns (request, text piece, done) events in order; a request's last event has
        done=True (and its finish_reason, result or error set)."""
        events: list[tuple[Request, str, bool]] = []
        with self._lock:
            for req in [r for r in self._waiting if r._cancel]:
                self._waiting.remove(req)
                self._finish(req, "cancelled", events)
            if not self._waiting and not self._active:
                return events
        model = self.model
        with model._use():
            for slot, req in list(self._active.items()):
                if req._cancel:
                    req._decoding.end("cancelled")
                    self._finish(req, "cancelled", events)
            decoding = list(self._active.values())  # admitted before this step
            while True:
                with self._lock:
                    free = [s for s in range(self.max_batch) if s not in model._held]
                    if not free or not self._waiting:
                        break
                    req = self._waiting.popleft()
                self._admit(req, self._best_slot(req, free), events)
            if decoding:
                self._decode(decoding, events)
        return events

    def run(self):
        """Steps until no request is left, yielding every event (generate() with a list of prompts)."""
        while self.pending():
            yield from self.step()

    def _best_slot(self, req: Request, free: list[int]) -> int:
        """The free slot whose KV cache holds the longest start of the prompt (ties: the lowest)."""
        return max(free, key=lambda s: (self.model._engine.reusable(req._ids, s), -s))

    def _admit(self, req: Request, slot: int, events: list) -> None:
        model, o = self.model, req.options
        req.slot = slot
        model._held.add(slot)
        self._active[slot] = req
        try:
            req._t0 = time.perf_counter()
            model._slot = slot  # memory retrieval's side sequences run in this slot's rows
            inputs = injection.assemble(req.prompt, None, model.tokenizer, model.encode_prompt, model.d_model,
                                        memory=o["memory"], memory_k=o["memory_k"], position=o["memory_position"],
                                        placeholder=o["memory_placeholder"], query=o["memory_query"],
                                        embed_key=model._key_encoder, min_score=o["memory_min_score"],
                                        relevance=model._relevance, max_positions=model.max_context - 1)
            inputs.assemble_s = time.perf_counter() - req._t0
            model._check_fits(len(inputs.src))
            req._inputs, n_in = inputs, len(inputs.src)
            req._decoding = Decoding(model.tokenizer, o["sampler"], inputs.token_ids, o["stop"], set(o["eos"]),
                                     min(o["max_new_tokens"], model.max_context - n_in), model.vocab_size)
            req._start = prefill_start(model._engine, inputs, slot, o["reuse_cache"])
            t0 = time.perf_counter()
            logits = model._engine.forward_inputs(inputs.src[req._start:], inputs.embeds, req._start, False, slot,
                                                  inputs.embed_ids)
            req._t0, req._t_first = t0, time.perf_counter()
            req.prompt_tokens, req._position = n_in, n_in
            self._take(req, req._decoding.sample(logits), events)
        except Exception as e:  # noqa: BLE001 (the request reports it; the runner goes on)
            req.error = e
            self._finish(req, "error", events)
        finally:
            model._slot = 0

    def _decode(self, batch: list[Request], events: list) -> None:
        model = self.model
        tokens = np.asarray([r._next for r in batch], np.int32)
        slots = np.asarray([r.slot for r in batch], np.int32)
        positions = np.asarray([r._position for r in batch], np.int32)
        try:  # one call: the batch's forward pass and each sequence's sampling
            sampled = model._engine.decode_step(tokens, slots, positions, [r.options["sampler"] for r in batch])
        except Exception as e:  # noqa: BLE001 (every request of the batch reports it)
            for r in batch:
                r.error = e
                self._finish(r, "error", events)
            return
        for r, token in zip(batch, sampled.tolist()):
            r._position += 1
            self._take(r, token, events)

    def _take(self, req: Request, token: int, events: list) -> None:
        """The request's next token; the text it completes is an event."""
        dec = req._decoding
        req._next = token
        piece = dec.push(token)
        if dec.done:
            self._finish(req, dec.finish_reason, events, piece)
        elif piece:
            events.append((req, piece, False))

    def _finish(self, req: Request, reason: str, events: list, piece: str = "") -> None:
        req.finish_reason = reason
        if req.slot is not None and self._active.get(req.slot) is req:
            del self._active[req.slot]
            self.model._held.discard(req.slot)
        if req._decoding is not None and req.error is None:
            req.result = make_result(req._decoding, req._inputs, req._start, req._t0, req._t_first,
                                     time.perf_counter(), {})
            req.result.finish_reason = reason
        events.append((req, piece, True))


class BatchStream:
    """generate([...], stream=True): iterates (prompt index, text piece); `results` holds the
    GenerationResults (in prompt order) at the end."""

    def __init__(self, runner: BatchRunner, requests: list[Request]):
        self.runner, self.requests = runner, requests
        self.results: list[GenerationResult] | None = None
        self._index = {r.id: i for i, r in enumerate(requests)}

    def __iter__(self):
        try:
            for req, piece, _ in self.runner.run():
                if req.error is not None:
                    raise req.error
                if piece:
                    yield self._index[req.id], piece
        finally:
            for r in self.requests:  # a stream closed early frees the slots of the unfinished ones
                self.runner.cancel(r)
            while self.runner.pending():
                self.runner.step()
        self.results = [r.result for r in self.requests]

    def close(self) -> None:
        for r in self.requests:
            self.runner.cancel(r)
        while self.runner.pending():
            self.runner.step()
