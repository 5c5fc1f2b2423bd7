"""Model: loads a converted folder into the native engine and runs generation."""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from . import _core
from . import safetensors_io as st
from . import flash as fl
from .calibrate import PARTS as PREDICTOR_PARTS
from .convert import BUNDLE_FILE, FORMAT_VERSION, RESIDENT_FILE, check_config
from .inject import InputBuilder, Inputs, common_prefix, pool_rows
from .sampling import Sampler
from .sources import read_json
from .tokenizer import Tokenizer

_LAYER_KINDS = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq",
                "self_attn.k_proj.weight": "wk", "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
                "self_attn.q_proj.bias": "bq", "self_attn.k_proj.bias": "bk", "self_attn.v_proj.bias": "bv",
                "post_attention_layernorm.weight": "ffn_norm", "mlp.bundles": "ffn_bundles"}
_GLOBAL_KINDS = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}


def rope_inv_freq(cfg: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """Rotary inverse frequencies (float32) and attention scaling, as HF transformers computes them
    for rope types default, linear and llama3 (and llama.cpp's per-frequency factors)."""
    params = cfg.get("rope_parameters") or {}
    base = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(base), exps)).astype(np.float32)
    if cfg.get("flashmem_rope_freq_factors"):
        inv = (inv / np.asarray(cfg["flashmem_rope_freq_factors"], np.float32)).astype(np.float32)
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "linear":
            inv = (inv / np.float32(scaling["factor"])).astype(np.float32)
        elif kind == "llama3":
            factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        elif kind != "default":
            raise ValueError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv, 1.0


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
    flash: dict = field(default_factory=dict)  # sparse FFN figures per decoded token (flashmem.flash.summarize)
    cached_tokens: int = 0  # input positions whose KV entries were reused from the previous generation
    memories: list = field(default_factory=list)  # injected memories: id, score, text, slots, position


class Model:
    """A Llama-family model in the native engine. Use `flashmem.load()` to make one."""

    def __init__(self, folder: str, threads: int | None = None, max_context: int | None = None,
                 offload: str | None = None, dram_budget=None, sparsity: float = 0.0, window: int = 5,
                 ffn_layout: str = "bundled", queue_depth: int = 32, coalesce_gap: int = 2, direct_io: bool = True,
                 cache_rows: int | None = None, cache_bias: float = 0.0, expire_window: bool = False,
                 eviction: str = "lru"):
        self.path = folder
        cfg_path = os.path.join(folder, "config.json")
        self.config = read_json(cfg_path)
        fm = self.config.get("flashmem")
        if not isinstance(fm, dict) or fm.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{cfg_path}: not a flashmem folder of format version {FORMAT_VERSION}; "
                             "run `flashmem convert` on the source model")
        self.dtype = fm["dtype"]
        dims = check_config(self.config, cfg_path)
        model_max = int(self.config.get("max_position_embeddings") or 2048)
        if max_context is None:
            max_context = model_max
        if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context <= 0:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        if threads is None:
            threads = len(os.sched_getaffinity(0))
        if not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")

        c = _core.Config()
        c.vocab_size, c.dim, c.hidden_dim, c.n_layers = dims["vocab"], dims["d"], dims["ff"], dims["layers"]
        c.n_heads, c.n_kv_heads, c.head_dim = dims["heads"], dims["kv_heads"], dims["head_dim"]
        c.max_context = max_context
        c.norm_eps = float(self.config.get("rms_norm_eps", 1e-6))
        c.tied_embeddings = bool(self.config.get("tie_word_embeddings", False))
        c.qkv_bias = bool(self.config.get("attention_bias", False) or self.config.get("model_type") == "qwen2")
        c.dtype = self.dtype
        inv, scale = rope_inv_freq(self.config, c.head_dim)
        c.rope_inv_freq, c.rope_attention_scaling = inv.tolist(), scale
        self._engine = _core.Model(c, threads)
        self._configure_ffn(folder, offload, dram_budget, sparsity, window, ffn_layout, queue_depth, coalesce_gap,
                            direct_io, cache_rows, cache_bias, expire_window, eviction)
        self._load_weights(folder)
        self.tokenizer = Tokenizer(folder)
        self.vocab_size, self.max_context = c.vocab_size, max_context
        self.eos_token_ids = self._eos_ids()
        self._kv_keys: list = []  # what the KV cache holds, per position (see inject.py)
        self._embed_mean = None  # mean row of the embedding table, for embed_key

    def _configure_ffn(self, folder, offload, dram_budget, sparsity, window, ffn_layout, queue_depth, coalesce_gap,
                       direct_io, cache_rows, cache_bias, expire_window, eviction) -> None:
        if offload not in (None, "none", "flash"):
            raise ValueError(f"offload must be None or 'flash', got {offload!r}")
        self.offload = "flash" if offload == "flash" else None
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ValueError(f"window must be a non-negative integer, got {window!r}")
        if eviction not in ("lru", "hot"):
            raise ValueError(f"eviction must be 'lru' or 'hot', got {eviction!r}")
        if dram_budget is not None and not self.offload:
            raise ValueError("dram_budget needs offload='flash' (without offloading every weight is in DRAM)")
        self.dram_budget = fl.parse_bytes(dram_budget) if dram_budget is not None else None
        self.sparsity, self.window = float(sparsity), window
        self._predictor = None
        if not self.offload and not sparsity:
            return
        if sparsity:
            self._predictor = os.path.join(folder, fl.PREDICTOR_FILE)
            if not os.path.isfile(self._predictor):
                raise FileNotFoundError(f"sparsity {sparsity} needs the sparsity predictor {self._predictor}, which is "
                                        f"missing: run `flashmem calibrate {folder} --data FILE` first")
        kw = {}
        if self.offload:
            kw = fl.layout(folder, self.config, ffn_layout)
        self._engine.configure_sparse("flash" if self.offload else "dram", float(sparsity), window, True,
                                      self.dram_budget or 0, bool(sparsity), queue_depth=queue_depth,
                                      coalesce_gap=coalesce_gap, direct=direct_io,
                                      cache_rows=-1 if cache_rows is None else cache_rows,
                                      cache_bias=float(cache_bias), expire_window=bool(expire_window),
                                      eviction=eviction, **kw)
        if self.offload and not self._engine.sparse_stats()["direct_io"]:
            warnings.warn(f"{kw['path']}: the filesystem refused O_DIRECT; FFN reads go through the page cache, "
                          "which the DRAM budget does not count", RuntimeWarning, stacklevel=3)

    def _load_weights(self, folder: str) -> None:
        files = [RESIDENT_FILE] + ([] if self.offload else [self.config["flashmem"]["ffn"].get("file", BUNDLE_FILE)])
        for fname in files:
            path = os.path.join(folder, fname)
            infos, _ = st.read_header(path)
            for name, info in infos.items():
                if name in _GLOBAL_KINDS:
                    kind, layer = _GLOBAL_KINDS[name], -1
                else:
                    parts = name.split(".", 3)
                    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in _LAYER_KINDS:
                        raise ValueError(f"{path}: unexpected tensor '{name}'")
                    kind, layer = _LAYER_KINDS[parts[3]], int(parts[2])
                if kind == "lm_head" and self.config.get("tie_word_embeddings"):
                    continue
                self._engine.load_tensor(kind, layer, path, info.offset, info.tag, list(info.shape))
        if self._predictor:
            infos, _ = st.read_header(self._predictor)
            for l in range(self.config["num_hidden_layers"]):
                for part in PREDICTOR_PARTS:
                    name = f"model.layers.{l}.mlp.predictor.{part}"
                    if name not in infos:
                        raise ValueError(f"{self._predictor}: tensor '{name}' is missing; run `flashmem calibrate` again")
                    info = infos[name]
                    self._engine.load_tensor(f"pred_{part}", l, self._predictor, info.offset, info.tag, list(info.shape))
        self._engine.check_loaded()
        if self.dram_budget and self._engine.owned_bytes > self.dram_budget:  # the estimate was exceeded: a bug
            raise RuntimeError(f"engine owns {self._engine.owned_bytes} bytes, above dram_budget {self.dram_budget}")

    @property
    def owned_bytes(self) -> int:
        """DRAM the engine owns: resident weights, run state, KV cache, predictor, neuron cache."""
        return self._engine.owned_bytes

    def flash_stats(self) -> dict:
        """Raw sparse FFN counters since the last reset (empty for the dense engine)."""
        return dict(self._engine.sparse_stats())

    def _eos_ids(self) -> list[int]:
        ids = []
        gen = os.path.join(self.path, "generation_config.json")
        if os.path.isfile(gen):
            e = read_json(gen).get("eos_token_id")
            ids += e if isinstance(e, list) else [e] if e is not None else []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))

    # --- inputs ---------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> list[int]:
        """Text, token ids, or chat messages -> token ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
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

    # --- forward ------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Logits (T, vocab) of every position of `ids`, from an empty cache."""
        ids = self._ids(ids)
        self._check_fits(len(ids))
        self._kv_keys = []
        return self._engine.forward(ids, 0, True)

    def input_embeddings(self, ids) -> np.ndarray:
        """The token-embedding rows of ids (what the first layer sees), (T, d_model) float32."""
        return self._engine.embed(self._ids(ids))

    def hidden_states(self, ids) -> np.ndarray:
        """Final hidden states (after the last norm, what the LM head sees), (T, d_model)."""
        ids = self._ids(ids)
        self._check_fits(len(ids))
        self._kv_keys = []
        return self._engine.hidden_states(ids, 0)

    def perplexity(self, text, max_tokens: int | None = None, stepwise: bool = False) -> float:
        """exp(mean next-token NLL) over `text` or token ids (first max_tokens tokens, windows of
        max_context). stepwise=True feeds one token at a time, as generation does (with flash
        offloading: the neuron cache, its bias and the window evolve exactly as when decoding)."""
        ids = (self.tokenizer.encode(text) if isinstance(text, str) else [int(t) for t in text])[:max_tokens]
        if len(ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens of text")
        nll, n = 0.0, 0
        self._kv_keys = []
        for s in range(0, len(ids) - 1, self.max_context):
            window = np.asarray(ids[s:s + self.max_context + 1], np.int32)
            if stepwise:
                lg = np.stack([self._engine.forward(window[t:t + 1], t, False)
                               for t in range(len(window) - 1)]).astype(np.float64)
            else:
                lg = self._engine.forward(np.ascontiguousarray(window[:-1]), 0, True).astype(np.float64)
            lg -= lg.max(axis=1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
            nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
            n += len(window) - 1
        return float(math.exp(nll / n))

    def _flash_summary(self, tokens: int) -> dict:
        stats = self._engine.sparse_stats()
        if not stats:
            return {}
        c = self.config
        esz = 4 if self.dtype == "f32" else 2
        ffn_bytes = 3 * c["hidden_size"] * c["intermediate_size"] * c["num_hidden_layers"] * esz
        return fl.summarize(dict(stats), tokens, c["num_hidden_layers"], ffn_bytes)

    def _check_fits(self, n: int) -> None:
        if n > self.max_context:
            raise ValueError(f"prompt has {n} tokens, more than max_context {self.max_context}")

    # --- memory encoders ------------------------------------------------------------------------
    def embed_key(self, text: str, pooling: str = "embedding") -> np.ndarray:
        """A unit-norm key (d_model,) for a MemoryBank, from the model itself. pooling="embedding"
        (default): mean of the text's token embeddings minus the mean row of the embedding table
        (the direction all tokens share); it runs no layer, so it leaves the KV cache (and its
        prefix reuse) untouched. "hidden": mean of the final hidden states (runs the model)."""
        if not isinstance(text, str):
            raise TypeError(f"embed_key: text must be a string, got {type(text).__name__}")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("embed_key: text is empty")
        if pooling == "embedding":
            if self._embed_mean is None:
                total = np.zeros(self.config["hidden_size"], np.float64)
                for s in range(0, self.vocab_size, 4096):
                    total += self._engine.embed(np.arange(s, min(s + 4096, self.vocab_size), dtype=np.int32)).sum(0)
                self._embed_mean = (total / self.vocab_size).astype(np.float32)
            v = self._engine.embed(np.asarray(ids, np.int32)).mean(0) - self._embed_mean
        elif pooling == "hidden":
            v = self.hidden_states(ids).mean(0)
        else:
            raise ValueError(f"pooling must be 'embedding' or 'hidden', got {pooling!r}")
        return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)

    def embed_memory(self, text: str, slots: int | None = None) -> np.ndarray:
        """Value embeddings (n, d_model) of a memory: by default the text's own token embeddings
        (lossless: injecting them equals having the text in the prompt); with slots=m, the means
        of m contiguous chunks of them (compressed, lossy)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("embed_memory: text is empty")
        e = self._engine.embed(np.asarray(ids, np.int32))
        if slots is None or slots >= len(e):
            return e
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        return pool_rows(e, slots)

    # --- generation -------------------------------------------------------------------------
    def generate(self, prompt=None, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None, eos_token_id: int | list[int] | None = None, stream: bool = False,
                 inputs_embeds=None, memory=None, memory_k: int = 4, memory_position: str = "prefix",
                 memory_placeholder: str = "<memory>", memory_query: str | None = None, reuse_cache: bool = True):
        """Generates from text, token ids or chat messages, and/or input embeddings. Returns a
        GenerationResult, or with stream=True an iterator of text pieces (its `.result` holds the
        GenerationResult at the end).

        inputs_embeds (T, d_model): input embeddings placed before the prompt's tokens (alone they
        are the whole prompt, as HF's generate(inputs_embeds=...)). memory: a MemoryBank whose
        values are input embeddings (bank.add_text); the prompt's key (embed_key) retrieves the
        memory_k best entries, injected in id order as a prefix before everything else ("prefix", CoMEM's
        layout) or where `memory_placeholder` occurs in the (chat-formatted) prompt
        ("placeholder"). memory_query: the text to retrieve with (default: the text prompt, or the
        last user message without the placeholder). An empty bank injects nothing. reuse_cache: positions equal to the start
        of the previous generation's sequence keep their KV-cache entries."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampler = Sampler(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        eos = self.eos_token_ids if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        t0 = time.perf_counter()
        inputs = self._assemble(prompt, inputs_embeds, memory, memory_k, memory_position, memory_placeholder,
                                memory_query)
        inputs.assemble_s = time.perf_counter() - t0
        self._check_fits(len(inputs.src))
        start = 0
        if reuse_cache:
            start = min(common_prefix(self._kv_keys, inputs.keys), len(inputs.src) - 1)
        run = _Generation(self, inputs, start, max_new_tokens, sampler, stop, set(eos))
        if stream:
            return run
        for _ in run:
            pass
        return run.result

    def _assemble(self, prompt, inputs_embeds, memory, memory_k, position, placeholder, query) -> Inputs:
        if prompt is None and inputs_embeds is None:
            raise ValueError("generate needs a prompt, inputs_embeds, or both")
        b = InputBuilder(self.config["hidden_size"])
        memories, rows = [], []
        t0 = time.perf_counter()
        if memory is not None:
            rows, memories = self._retrieve(memory, memory_k, prompt, position, placeholder, query)
        retrieval_s = time.perf_counter() - t0
        if position == "placeholder" and memory is not None:
            if prompt is None:
                raise ValueError("memory_position='placeholder' needs a prompt holding the placeholder")
            text = (self.tokenizer.apply_chat_template(prompt) if isinstance(prompt, list) and prompt and
                    all(isinstance(m, dict) for m in prompt) else prompt)
            if not isinstance(text, str) or text.count(placeholder) != 1:
                raise ValueError(f"memory_position='placeholder' needs the text prompt or chat messages to hold "
                                 f"{placeholder!r} exactly once")
            before, after = text.split(placeholder)
            is_chat = not isinstance(prompt, str)
            if inputs_embeds is not None:
                b.embeddings(inputs_embeds, "inputs_embeds")
            b.tokens(self.tokenizer.encode(before, add_special_tokens=not is_chat) if before else [])
            for r, m in zip(rows, memories):
                m["position"] = len(b)
                b.embeddings(r, f"value of memory {m['id']}")
            b.tokens(self.tokenizer.encode(after, add_special_tokens=False) if after else [])
            return b.build(memories, retrieval_s)
        ids = self.encode_prompt(prompt) if prompt is not None else []
        bos = self.tokenizer.bos_token_id
        if rows and ids and bos is not None and ids[0] == bos:  # memories go after a leading BOS
            b.tokens(ids[:1])
            ids = ids[1:]
        for r, m in zip(rows, memories):
            m["position"] = len(b)
            b.embeddings(r, f"value of memory {m['id']}")
        if inputs_embeds is not None:
            b.embeddings(inputs_embeds, "inputs_embeds")
            if not len(np.asarray(inputs_embeds)) and not ids:
                raise ValueError("inputs_embeds is empty")
        b.tokens(ids)
        return b.build(memories, retrieval_s)

    def _retrieve(self, bank, k, prompt, position, placeholder, query):
        from .memory import MemoryBank

        if not isinstance(bank, MemoryBank):
            raise TypeError(f"memory must be a flashmem.MemoryBank, got {type(bank).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"memory_k must be a positive integer, got {k!r}")
        if position not in ("prefix", "placeholder"):
            raise ValueError(f"memory_position must be 'prefix' or 'placeholder', got {position!r}")
        if bank.dim != self.config["hidden_size"]:
            raise ValueError(f"memory bank keys have dimension {bank.dim}, the model's embed_key gives "
                             f"{self.config['hidden_size']}")
        if len(bank) == 0:
            return [], []  # documented fallback: nothing to inject
        if query is None:
            if isinstance(prompt, str):
                query = prompt
            elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
                users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
                query = users[-1] if users else prompt[-1].get("content", "")
            else:
                raise ValueError("memory retrieval needs a text or chat prompt, or memory_query")
            query = query.replace(placeholder, " ").strip() or query
        ids, scores = bank.search(self.embed_key(query)[None], k=k)
        rows, memories = [], []
        for i, sc in zip(ids[0], scores[0]):
            if i < 0:
                continue
            m = bank.get(int(i))
            if m.value is None:
                raise ValueError(f"memory {int(i)} has no value embeddings to inject (add it with bank.add_text)")
            rows.append(np.asarray(m.value, np.float32))
            memories.append({"id": int(i), "score": float(sc), "text": m.text, "slots": int(m.value.shape[0])})
        # injected in id order: the same set of memories lands at the same positions whatever the
        # query, so its KV-cache entries can be reused (prefix caching)
        order = sorted(range(len(memories)), key=lambda j: memories[j]["id"])
        return [rows[j] for j in order], [memories[j] for j in order]


class _Generation:
    """One generation, iterable as text pieces. The loop: prefill the prompt, then one token at a time."""

    def __init__(self, model: Model, inputs: Inputs, start: int, max_new_tokens, sampler, stop, eos):
        self.m, self.inputs, self.start, self.max_new, self.sampler, self.stop, self.eos = (
            model, inputs, start, max_new_tokens, sampler, stop, eos)
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        m, inp, start = self.m, self.inputs, self.start
        engine, tok = m._engine, m.tokenizer
        n_in = len(inp.src)
        prompt = inp.token_ids  # for the repetition penalty: the token positions
        budget = min(self.max_new, m.max_context - n_in)
        m._kv_keys = []  # the cache is being rewritten from `start`; set again once this succeeds
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
            m._kv_keys = kept  # valid up to here, also when the caller stops iterating early
        m._kv_keys = kept
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
            timings={"retrieval_s": inp.retrieval_s, "assemble_s": inp.assemble_s, "prefill_s": t_first - t0,
                     "decode_s": t_end - t_first, "total_s": t_end - t0 + inp.assemble_s},
            flash=m._flash_summary(decode_steps))
