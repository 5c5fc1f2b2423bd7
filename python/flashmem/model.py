"""Model: a loaded model (loading.py builds one), its forward passes and generate()."""
from __future__ import annotations

import math
import threading
import time
import weakref
from contextlib import contextmanager

import numpy as np

from .flash import streaming
from .generation import Generation
from .checkpoints.config import layer_windows
from .memory import encoders, injection, retrieval
from .sampling import core_sampler


def is_prompt_list(prompt) -> bool:
    """A list of prompts (texts, token-id lists or chats), not one prompt (a text, token ids, or a
    chat: a list of message dicts)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, str) or (isinstance(p, (list, tuple)) and not isinstance(p, str)) for p in prompt))


class EngineLock:
    """One call at a time on a model's engine: its KV cache, scratch buffers, neuron cache and the
    caches of its memory encoders are shared state. Other threads wait their turn, so each call
    gets the result it would get alone. A thread that calls the model while it holds it already
    (an unfinished generate(stream=True) iterated in the same thread) gets an error, not a deadlock."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holder: int | None = None

    @contextmanager
    def __call__(self):
        me = threading.get_ident()
        if self._holder == me:
            raise RuntimeError("this thread is using the model already: an unfinished generate(stream=True) holds "
                               "it; iterate the stream to its end or close() it first")
        with self._lock:
            self._holder = me
            try:
                yield
            finally:
                self._holder = None


def _weak(method):
    """A callable for a bound method that does not keep its object alive."""
    ref = weakref.WeakMethod(method)

    def call(*args, **kwargs):
        bound = ref()
        if bound is None:
            raise RuntimeError("the model this belongs to has been freed")
        return bound(*args, **kwargs)
    return call


class Model:
    """A Llama-family model in the native engine. Use `flashmem.load()` to make one. Safe to share
    between threads: calls run one at a time (EngineLock); a stream holds the model from its first
    piece to its end.

    The engine's KV cache has `max_batch` slots (flashmem.load(max_batch=)), one sequence each. A
    call runs in the lowest slot no BatchRunner holds (generate() with a list of prompts, and the
    server, decode several slots together; see batching.py)."""

    def __init__(self, engine, tokenizer, path: str, config: dict, max_context: int, eos_token_ids: list[int],
                 offload: str | None = None, dram_budget: int | None = None, sparsity: float = 0.0, window: int = 5,
                 minimum_budget: int | None = None):
        self._engine, self.tokenizer, self.path, self.config = engine, tokenizer, path, config
        self._minimum_budget = minimum_budget  # offload="all": with every matrix streamed (resident_within)
        self.dtype = config["flashmem"]["dtype"]
        self.vocab_size, self.d_model, self.max_context = config["vocab_size"], config["hidden_size"], max_context
        self.eos_token_ids = eos_token_ids
        self.offload, self.dram_budget, self.sparsity, self.window = offload, dram_budget, sparsity, window
        self.max_batch = engine.slots
        self.device = engine.backend  # where the forward pass runs: "cpu"
        self._held: set[int] = set()  # slots a BatchRunner holds sequences in
        self._slot = 0  # the slot this call runs in (set under the lock by _single)
        self._use = EngineLock()
        self._windowed = bool(layer_windows(config, config["num_hidden_layers"], path))
        # weak callables: bound methods would make a cycle (model -> encoder -> model), and the engine's
        # memory would wait for the garbage collector instead of going with the last reference
        self._key_encoder = encoders.KeyEncoder(tokenizer, engine.embed, _weak(self._hidden_states),
                                                _weak(self._sequence_state), self.vocab_size, self.d_model,
                                                config["num_hidden_layers"], max_context)
        self._relevance = retrieval.Relevance(tokenizer, _weak(self._token_logprobs), max_context)

    @contextmanager
    def _single(self):
        """The engine for one call (EngineLock), in the lowest KV slot no BatchRunner holds."""
        with self._use():
            free = [s for s in range(self.max_batch) if s not in self._held]
            if not free:
                raise RuntimeError(f"all {self.max_batch} KV-cache slots hold a BatchRunner's sequences; wait for "
                                   "them, or load the model with a larger max_batch")
            self._slot = free[0]
            yield

    @property
    def owned_bytes(self) -> int:
        """DRAM the engine owns: resident weights, run state, KV cache, predictor, neuron cache."""
        return self._engine.owned_bytes

    def flash_stats(self) -> dict:
        """Raw sparse FFN counters since the last reset (empty for the dense engine)."""
        with self._use():
            stats = dict(self._engine.sparse_stats())
        if self._minimum_budget is not None:  # the smallest budget that works, not this one's configuration
            stats["minimum_budget"] = self._minimum_budget
        return stats

    # --- inputs ---------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        """Text, token ids, or chat messages -> token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif injection.chat_text(prompt):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt), add_special_tokens=False)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = [int(t) for t in np.asarray(prompt).ravel()] if len(prompt) else []
        else:
            raise TypeError(f"prompt must be text, token ids or chat messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.vocab_size})")
        return ids

    def _ids(self, ids) -> np.ndarray:
        """Token ids (checked by encode_prompt) as the engine's int32 array."""
        return np.ascontiguousarray(self.encode_prompt(list(np.asarray(ids).ravel())), dtype=np.int32)

    def _check_fits(self, n: int) -> None:
        if n > self.max_context:
            raise ValueError(f"prompt has {n} tokens, more than max_context {self.max_context}")

    # --- forward ------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Logits (T, vocab) of every position of `ids`, from an empty KV cache."""
        ids = self._ids(ids)
        self._check_fits(len(ids))
        with self._single():
            return self._engine.forward(ids, 0, True, self._slot)

    def input_embeddings(self, ids) -> np.ndarray:
        """The token-embedding rows of ids (what the first layer sees), (T, d_model) float32."""
        ids = self._ids(ids)
        with self._use():
            return self._engine.embed(ids)

    def hidden_states(self, ids) -> np.ndarray:
        """Final hidden states (after the last norm, what the LM head sees), (T, d_model)."""
        with self._single():
            return self._hidden_states(ids)

    def _hidden_states(self, ids) -> np.ndarray:
        ids = self._ids(ids)
        self._check_fits(len(ids))
        return self._engine.hidden_states(ids, 0, self._slot)

    def ffn_inputs(self, ids) -> np.ndarray:
        """Every layer's FFN inputs (after the FFN norm), (n_layers, T, d_model): what the sparsity
        predictor sees (flashmem calibrate fits on them)."""
        ids = self._ids(ids)
        self._check_fits(len(ids))
        with self._single():
            if self._slot != 0:
                raise RuntimeError("ffn_inputs runs in KV slot 0, which a BatchRunner holds; wait for it to finish")
            return self._engine.ffn_inputs(ids)

    def perplexity(self, text, max_tokens: int | None = None, stepwise: bool = False) -> float:
        """exp(mean next-token NLL) over `text` or token ids (first max_tokens tokens, windows of
        max_context). stepwise=True feeds one token at a time, as generation does (with flash
        offloading: the neuron cache, its bias and the window evolve exactly as when decoding)."""
        ids = (self.tokenizer.encode(text) if isinstance(text, str) else [int(t) for t in text])[:max_tokens]
        if len(ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens of text")
        with self._single():
            return self._perplexity(ids, stepwise)

    def _perplexity(self, ids: list[int], stepwise: bool) -> float:
        nll, n = 0.0, 0
        for s in range(0, len(ids) - 1, self.max_context):
            window = np.asarray(ids[s:s + self.max_context + 1], np.int32)
            if stepwise:
                lg = np.stack([self._engine.forward(window[t:t + 1], t, False, self._slot)
                               for t in range(len(window) - 1)]).astype(np.float64)
            else:
                lg = self._engine.forward(np.ascontiguousarray(window[:-1]), 0, True, self._slot).astype(np.float64)
            lg -= lg.max(axis=1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            n += len(window) - 1
        return float(math.exp(nll / n))

    # --- sequences of their own (memory keys and relevance) -------------------------------------
    def _own_rows(self, n: int) -> int:
        """Where a side sequence of n tokens runs in the KV cache: its last rows, past what the
        cached conversation holds (which stays reusable), or else from 0 (the cache is given up)."""
        self._check_fits(n)
        at = self.max_context - n
        if self._windowed or at < self._engine.slot_length(self._slot):
            return 0
        return at

    def _sequence_state(self, ids, layer: int) -> np.ndarray:
        ids = self._ids(ids)
        return self._engine.sequence_state(ids, layer, self._own_rows(len(ids)), self._slot)

    def _token_logprobs(self, ids, first: int) -> np.ndarray:
        """log p(ids[t] | ids[:t]) for t in [first, len(ids)), the tokens run on their own."""
        ids = self._ids(ids)
        lg = self._engine.sequence_logits(ids, self._own_rows(len(ids)), self._slot)[first - 1:-1].astype(np.float64)
        top = lg.max(axis=1)
        return lg[np.arange(len(lg)), ids[first:]] - top - np.log(np.exp(lg - top[:, None]).sum(axis=1))

    # --- memory encoders ------------------------------------------------------------------------
    def embed_key(self, text: str, pooling: str = "prompt") -> np.ndarray:
        """A unit-norm key (d_model,) for a MemoryBank, from the model itself (memory/encoders.py):
        pooling="prompt" (default) is the model's reading of the text's meaning; "embedding" runs no
        layer (matches words); "hidden" averages final hidden states. A bank's keys and its queries
        must come from the same model and pooling."""
        with self._single():
            return self._key_encoder(text, pooling)

    def memory_relevance(self, memory_text: str, query: str) -> float:
        """How much reading `memory_text` makes `query` more predictable to the model, in nats per
        query token (memory/retrieval.py); generate() injects memories that reach memory_min_score."""
        with self._single():
            return self._relevance(memory_text, query)

    def embed_memory(self, text: str, slots: int | None = None) -> np.ndarray:
        """Value embeddings (n, d_model) of a memory: the text's token embeddings (lossless), or with
        slots=m the means of m contiguous chunks of them (compressed, lossy)."""
        with self._use():
            return encoders.memory_value(self.tokenizer, self._engine.embed, text, slots)

    # --- generation -------------------------------------------------------------------------
    def generate(self, prompt=None, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, eos_token_id: int | list[int] | None = None, stream: bool = False,
                 inputs_embeds=None, memory=None, memory_k: int = 1, memory_position: str = "context",
                 memory_placeholder: str = "<memory>", memory_query: str | None = None,
                 memory_min_score: float | None = retrieval.MIN_SCORE, reuse_cache: bool = True):
        """Generates from text, token ids or chat messages, and/or input embeddings. Returns a
        GenerationResult, or with stream=True an iterator of text pieces (its `.result` holds the
        GenerationResult at the end).

        A list of prompts (texts, token-id lists or chats) is decoded as a batch (batching.py: up to
        max_batch at once, one pass over the weights per step for all; the rest join as others
        finish). It returns a list of GenerationResults in prompt order, or with stream=True an
        iterator of (prompt index, text piece) whose `.results` holds them at the end. Each prompt
        has its own sampler (seed + its index, with a seed), stop conditions and memories.

        inputs_embeds (T, d_model): input embeddings placed before the prompt's tokens (alone they
        are the whole prompt, as HF's generate(inputs_embeds=...)). memory: a MemoryBank whose
        values are input embeddings (bank.add_text). The query's key (embed_key) and BM25 over the
        memories' texts find candidates; of the best memory_k, those whose relevance to the query
        (memory_relevance, nats per token) reaches memory_min_score are injected (None: the best
        memory_k, unchecked). memory_position: "context" (default: in the last user message before
        the question, or before a text prompt), "prefix" (CoMEM's layout, before everything) or
        "placeholder" (where `memory_placeholder` occurs in the (chat-formatted) prompt); see
        memory/injection.py and memory/retrieval.py. memory_query: the text to retrieve with
        (default: the text prompt, or the last user message without the placeholder). An empty
        bank, or no relevant memory, injects nothing. reuse_cache: positions equal to the start of
        the previous generation's sequence keep their KV-cache entries."""
        if is_prompt_list(prompt):
            if inputs_embeds is not None:
                raise ValueError("inputs_embeds goes with one prompt, not a list of prompts")
            from .batching import BatchRunner, BatchStream

            runner = BatchRunner(self)
            requests = [runner.submit(p, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                                      seed=None if seed is None else seed + i, stop=stop, eos_token_id=eos_token_id,
                                      memory=memory, memory_k=memory_k, memory_position=memory_position,
                                      memory_placeholder=memory_placeholder, memory_query=memory_query,
                                      memory_min_score=memory_min_score, reuse_cache=reuse_cache)
                        for i, p in enumerate(prompt)]
            batch = BatchStream(runner, requests)
            if stream:
                return batch
            for _ in batch:
                pass
            return batch.results
        sampler, stop, eos = self._generation_options(max_new_tokens, temperature, top_k, top_p, min_p,
                                                      repetition_penalty, seed, stop, eos_token_id)
        t0 = time.perf_counter()
        with self._single():
            inputs = injection.assemble(prompt, inputs_embeds, self.tokenizer, self.encode_prompt, self.d_model,
                                        memory=memory, memory_k=memory_k, position=memory_position,
                                        placeholder=memory_placeholder, query=memory_query,
                                        embed_key=self._key_encoder, min_score=memory_min_score,
                                        relevance=self._relevance, max_positions=self.max_context - 1)
            inputs.assemble_s = time.perf_counter() - t0
            self._check_fits(len(inputs.src))
            run = Generation(self._engine, self.tokenizer, self.vocab_size, self._slot, self.max_context, inputs,
                             reuse_cache, max_new_tokens, sampler, stop, set(eos),
                             lambda tokens: streaming.summarize(self._engine, self.config, tokens))
            if not stream:
                for _ in run.steps():
                    pass
                return run.result
        slot = run.slot  # not run.slot in the lambda: run -> lambda -> run would be a cycle
        run.hold = lambda: self._holding(slot)  # a stream holds the model while it is iterated
        return run

    def _generation_options(self, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop,
                            eos_token_id):
        """generate()'s sampling and stopping arguments, checked: (Sampler, stop strings, EOS ids)."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampler = core_sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        eos = self.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in eos):
            raise ValueError(f"eos_token_id must be token ids in [0, {self.vocab_size}), got {eos_token_id!r}")
        return sampler, stop, eos

    @contextmanager
    def _holding(self, slot: int):
        """The engine for a stream that runs in `slot` (EngineLock), while no BatchRunner holds it."""
        with self._use():
            if slot in self._held:
                raise RuntimeError(f"KV slot {slot}, where this stream runs, was taken by a BatchRunner before the "
                                   "stream was read; read streams as they come")
            yield
