"""Loading: from a path to a running model. load() resolves the path (a flashmem folder, or a HF
folder or GGUF file converted once into the store), then builds the native engine from the
converted folder: its Config, where the FFN lives (DRAM, or streamed from flash: flash/), the
weights, the tokenizer."""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re

import numpy as np

from . import _core
from .checkpoints import safetensors_io as st
from .checkpoints.config import GEMMA_TYPES, layer_windows, model_dims, read_config, read_json, rope_inv_freq
from .checkpoints.convert import ALL_DTYPES, DTYPES, FORMAT_VERSION, READABLE_VERSIONS, RESIDENT_FILE, SPLIT_SUFFIX
from .checkpoints.default_model import default_gguf
from .checkpoints.store import converted_folder, is_converted
from .flash import streaming
from .model import Model
from .tokenizer import Tokenizer

DEFAULT_MAX_CONTEXT = 8192  # the KV cache's length unless max_context says otherwise (or the model's, if shorter)
SMALL_BUDGET = 256 << 20  # below this dram_budget, prompts go through in chunks of 64 tokens (32 below a quarter)


def load(path: str | None = None, dtype: str | None = None, threads: int | None = None,
         max_context: int | None = None, offload: str | None = None, dram_budget=None, sparsity: float = 0.0,
         window: int = 5, kv_dtype: str | None = None, prefill_chunk: int | None = None, max_batch: int = 1,
         device: str = "cpu", **flash_options) -> Model:
    """Loads a model: a flashmem folder, a HF folder or a GGUF file (the latter two converted once
    into the store); with no path, the default model. The README's "Python API" and "Flash
    offloading" sections describe every argument; flash_options: ffn_layout, queue_depth,
    coalesce_gap, direct_io, cache_rows, cache_bias, expire_window, eviction, read_ahead, staging_rows. device: "cpu"
    (the only backend that runs the forward pass today; "cuda" is checked and refused, see
    check_device)."""
    check_device(device)
    if dtype is not None and dtype not in ALL_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(ALL_DTYPES)}, got {dtype!r}")
    if path is None:
        path = default_gguf()
    path = os.fspath(path)
    if is_converted(path):
        fm = read_config(os.path.join(path, "config.json"))["flashmem"]
        stored = fm["dtype"] if isinstance(fm, dict) else None  # else open_model says what is wrong
        if dtype is not None and dtype != stored:
            raise ValueError(f"{path} was converted with dtype {stored}; convert the source again with --dtype {dtype}")
    else:
        path = converted_folder(path, dtype)
    return open_model(path, threads=threads, max_context=max_context, offload=offload, dram_budget=dram_budget,
                      sparsity=sparsity, window=window, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                      max_batch=max_batch, **flash_options)


def check_device(device) -> None:
    """device="cpu" runs; "cuda" (or "cuda:N") needs a build with nvcc and a visible GPU, and then
    the CUDA backend's forward pass, which is not written yet (its kernels are: kernels/cuda/).
    Each case gets its own error, so that a user knows which one stops them."""
    if device == "cpu":
        return
    if not isinstance(device, str) or not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if not _core.cuda_built():
        raise ValueError(f"device={device!r}: this flashmem was built without CUDA (nvcc was not found when it "
                         "was built); install it again where nvcc is on the PATH")
    if not _core.cuda_available():
        raise RuntimeError(f"device={device!r}: no CUDA device is visible (built with CUDA, but the driver "
                           "reports no GPU)")
    raise NotImplementedError(f"device={device!r}: the CUDA backend runs its kernels (tests/test_cuda.py) but not "
                              "yet a whole forward pass; load with device='cpu'")


def open_model(folder: str, threads: int | None = None, max_context: int | None = None, offload=None,
               dram_budget=None, sparsity: float = 0.0, window: int = 5, kv_dtype: str | None = None,
               prefill_chunk: int | None = None, max_batch: int = 1, **flash_options) -> Model:
    """The model of a converted folder: engine configured, FFN placed, weights loaded, checked.
    offload="auto": "flash" where dram_budget holds its minimum (the attention weights, the
    embeddings and a tied LM head resident), else "all" (every matrix read when needed). A byte
    of budget saves a byte read per token whether it holds attention weights or cached neurons,
    and with sparsity the neurons save less (a cached neuron is read only when picked): so flash
    while it fits. offload="all" under a budget keeps what the budget holds beyond its minimum of the
    attention matrices (whole layers) and the LM head resident after all (resident_within)."""
    if offload == "auto":
        if dram_budget is None:
            raise ValueError("offload='auto' chooses what to stream from dram_budget: give one (bytes, e.g. "
                             "'300MB', or 'auto')")
        kw = dict(threads=threads, max_context=max_context, dram_budget=dram_budget, sparsity=sparsity,
                  window=window, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk, max_batch=max_batch,
                  **flash_options)
        try:
            return open_model(folder, offload="flash", **kw)
        except ValueError as e:
            if "below the minimum" not in str(e):
                raise
            flash_error = str(e)  # the engine of that try goes with the exception, before the next one
        try:
            return open_model(folder, offload="all", **kw)
        except ValueError as e:
            if "below the minimum" not in str(e):
                raise
            all_error = str(e)
        raise ValueError(f"offload='auto': {all_error} with every matrix streamed (offload='all'; with the "
                         f"attention weights resident, offload='flash': {flash_error})")
    cfg_path = os.path.join(folder, "config.json")
    config = read_config(cfg_path)
    fm = config.get("flashmem")
    if not isinstance(fm, dict) or fm.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{cfg_path}: not a flashmem folder of format version {FORMAT_VERSION}; "
                         "run `flashmem convert` on the source model")
    # the FFN: streamed from flash, neuron bundles in DRAM (sparsity), or dense (bundles or matrices);
    # with offload="all" the attention matrices, embeddings and LM head are read when needed too;
    # with offload="flash" and an LM head of its own, the embedding rows of the tokens in use (a
    # tied table is the LM head, which needs every row at every token: it stays in DRAM)
    ffn = "streamed" if offload in ("flash", "all") else "bundles" if sparsity else "dense"
    untied = not config.get("tie_word_embeddings", False)
    stream = STREAMED_KINDS if offload == "all" else ("embed",) if offload == "flash" and untied else ()
    dims = model_dims(config, cfg_path)
    weights = weights_to_load(folder, config, ffn, stream=stream)
    check_dims(dims, weights, folder, config)  # before anything is sized from the config
    c = engine_config(config, cfg_path, max_context, kv_dtype)
    check_schema(c, weights, ffn, config)  # every tensor, with its shape: the engine's sizes are the files'
    if threads is None:
        threads = len(os.sched_getaffinity(0))
    if not isinstance(threads, int) or isinstance(threads, bool) or threads <= 0:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    tokenizer = Tokenizer(folder)  # before dram_budget="auto" looks: the tokenizer's memory is not the engine's
    release_freed_memory()
    budget_source = None
    if dram_budget == "auto":  # what the process may take, before the engine allocates anything
        dram_budget, budget_source = streaming.auto_budget()
    budget_bytes = streaming.parse_bytes(dram_budget) if offload in ("flash", "all") and dram_budget else None
    # a smaller run state leaves more of a small budget to the neuron cache
    if budget_bytes and budget_bytes < SMALL_BUDGET:
        c.prefill_chunk = 64 if budget_bytes >= SMALL_BUDGET // 4 else 32
    if prefill_chunk is not None:
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        c.prefill_chunk = prefill_chunk
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 4096:
        raise ValueError(f"max_batch must be an integer in [1, 4096], got {max_batch!r}")
    c.max_batch = max_batch  # KV-cache slots: every one is allocated now (and counted in dram_budget)
    engine = _core.Model(c, threads)
    if any(w.streamed for w in weights):
        engine.configure_stream(os.path.join(folder, RESIDENT_FILE), stream_staging_bytes(weights),
                                queue_depth=flash_options.get("queue_depth", 32),
                                direct=flash_options.get("direct_io", True))

    def configure_ffn(weights):
        return streaming.configure(engine, folder, config, offload, dram_budget, sparsity, window,
                                   budget_source=budget_source, resident_bytes=sum(w.engine_bytes for w in weights),
                                   **flash_options)

    offload, budget, predictor = configure_ffn(weights)
    minimum = None
    if offload == "all" and budget:
        minimum = engine.sparse_stats()["minimum_budget"]
        keep = resident_within(weights_to_load(folder, config, ffn), budget - minimum)
        if keep:  # configured again, with those matrices' bytes counted as resident
            weights = weights_to_load(folder, config, ffn, stream=stream, keep=keep)
            offload, budget, predictor = configure_ffn(weights)
    for w in weights:
        engine.load_tensor(w.kind, w.layer, w.path, w.offset, w.format, w.shape, stream=w.streamed)
    if predictor:
        streaming.load_predictor(engine, predictor, config["num_hidden_layers"])
    engine.check_loaded()
    if budget and engine.owned_bytes > budget:  # the estimate was exceeded: a bug
        raise RuntimeError(f"engine owns {engine.owned_bytes} bytes, above dram_budget {budget}")
    return Model(engine, tokenizer, folder, config, c.max_context, eos_token_ids(folder, tokenizer),
                 offload=offload, dram_budget=budget, sparsity=float(sparsity), window=window, minimum_budget=minimum)


def release_freed_memory() -> None:
    """Gives the memory that C allocators hold freed back to the kernel (glibc's malloc_trim):
    parsing the tokenizer's JSON leaves about 18 MB of freed heap that would otherwise stay in
    the process's resident set, and count against a memory limit."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def engine_config(config: dict, where: str, max_context: int | None, kv_dtype: str | None = None) -> _core.Config:
    """The engine's Config from a converted folder's config.json (max_context: default the model's
    max_position_embeddings; kv_dtype: default f16 for a model kept in its GGUF formats, f32 else)."""
    dims = model_dims(config, where)
    if max_context is None:
        max_context = min(int(config.get("max_position_embeddings") or 2048), DEFAULT_MAX_CONTEXT)
    if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context <= 0:
        raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
    c = _core.Config()
    c.vocab_size, c.d_model, c.d_ff, c.n_layers = dims["vocab_size"], dims["d_model"], dims["d_ff"], dims["n_layers"]
    c.n_heads, c.n_kv_heads, c.head_dim = dims["n_heads"], dims["n_kv_heads"], dims["head_dim"]
    c.max_context = max_context
    eps = config.get("rms_norm_eps")
    c.norm_eps = float(1e-6 if eps is None else eps)
    c.tied_embeddings = bool(config.get("tie_word_embeddings", False))
    c.qkv_bias = bool(config.get("attention_bias", False) or config.get("model_type") == "qwen2")
    dtype, ffn = config["flashmem"]["dtype"], config["flashmem"]["ffn"]
    # the neuron bundles' formats ("gguf" folders of format version 1 have no bundles)
    c.ffn_bundle = ffn.get("bundle_format") or [dtype if dtype in DTYPES else "f32"] * 3
    if kv_dtype is None:
        kv_dtype = "f32" if dtype in DTYPES else "f16"  # block formats: the KV cache too is 16-bit
    if kv_dtype not in ("f32", "f16"):
        raise ValueError(f"kv_dtype must be 'f32' or 'f16', got {kv_dtype!r}")
    c.kv_dtype = kv_dtype
    inv, scale = rope_inv_freq(config, c.head_dim)
    c.rope_inv_freq, c.rope_attention_scaling = inv.tolist(), scale
    architecture_options(c, config, where)
    return c


def architecture_options(c: _core.Config, config: dict, where: str) -> None:
    """What sets a model family apart, from its config: the FFN's activation, Gemma's q/k norms,
    output norms, embedding scale and attention scale, and sliding windows with their own rope."""
    gemma = config.get("model_type") in GEMMA_TYPES
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    try:
        c.activation = act
    except ValueError:
        raise ValueError(f"{where}: activation {act!r} is not supported (supported: silu, gelu_pytorch_tanh)") from None
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise ValueError(f"{where}: config field '{key}' = {config[key]!r}: logit soft-capping is not supported")
    c.qk_norm = c.post_norms = gemma
    if gemma:
        c.embed_scale = float(np.float32(config["hidden_size"] ** 0.5))  # as HF computes it, in f32
        scalar = config.get("query_pre_attn_scalar") or c.head_dim
        c.attn_scale = float(scalar) ** -0.5
    c.layer_window = layer_windows(config, c.n_layers, where)
    if gemma and c.layer_window:
        c.rope_inv_freq_local = rope_inv_freq(config, c.head_dim, "sliding_attention")[0].tolist()


@dataclasses.dataclass
class WeightFile:
    """One tensor the engine loads: Model.load_tensor's arguments, and the bytes it will own."""
    kind: str
    layer: int
    path: str
    offset: int
    format: str
    shape: list
    engine_bytes: int
    streamed: bool = False  # left in the file, read when needed (offload="all")
    nbytes: int = 0         # bytes in the file


STREAMED_KINDS = ("embed", "lm_head", "wq", "wk", "wv", "wo")
LM_HEAD_CHUNK = 1 << 20  # bytes of LM head rows a streamed logits pass reads at a time (two in staging:
#                          the next is read while one computes)


def stream_staging_bytes(weights: list[WeightFile]) -> int:
    """The staging buffer streamed matrices need: the largest of a layer's four attention matrices
    together, two chunks of the LM head, an embedding row."""
    per_layer: dict = {}
    need = [4 * 4096]
    head = next((w for w in weights if w.kind == "lm_head"), None)  # else the tied embeddings
    for w in weights:
        if w.streamed and w.layer >= 0:
            per_layer.setdefault(w.layer, {})[w.kind] = w.nbytes
        elif w.streamed:
            as_head = w.kind == "lm_head" or (w.kind == "embed" and head is None)
            need.append(2 * (LM_HEAD_CHUNK + 4096) if as_head else w.nbytes // w.shape[0] + 2 * 4096)
    for kinds in per_layer.values():
        # the four together: the next layer's are read ahead while this layer's FFN computes
        need.append(_core.stream_staging_for([kinds.get(k, 0) for k in ("wq", "wk", "wv", "wo")]))
    return max(need)


def check_schema(c: _core.Config, weights: list[WeightFile], ffn: str, config: dict) -> None:
    """Raises naming the first tensor the engine's weight schema (Config.schema) needs that the
    folder's files do not hold, or hold with another shape (the rows of neuron bundles: float
    bundles are padded), before anything is allocated."""
    matrices = config["flashmem"]["ffn"].get("layout") == "matrices"
    placement = "none" if ffn == "streamed" else "matrices" if ffn == "dense" and matrices else "bundles"
    have = {(w.kind, w.layer): w for w in weights}
    for kind, layer, shape in c.schema(placement):
        where = f"layer {layer}" if layer >= 0 else "the model"
        if (kind, layer) not in have:
            files = sorted({os.path.basename(w.path) for w in weights}) or [RESIDENT_FILE]
            raise ValueError(f"{os.path.dirname(weights[0].path) if weights else ''}: tensor '{kind}' of {where} "
                             f"(shape {tuple(shape)}) is missing from {', '.join(files)}")
        w = have[(kind, layer)]
        got, want = tuple(w.shape), tuple(shape)
        same = got[:1] == want[:1] and len(got) == len(want) if kind == "ffn_bundles" else got == want
        if not same:
            raise ValueError(f"{w.path}: tensor '{kind}' of {where}: expected shape {want}, got {got}")


def check_dims(dims: dict, weights: list[WeightFile], folder: str, config: dict) -> None:
    """The config's layer count, attention width and FFN width against the tensors the files hold,
    before anything is sized from them (per-layer lists, rotary frequencies, the engine's buffers;
    check_schema checks the rest once the Config is built): a config that claims 2^31 layers,
    heads or neurons raises here, whatever the files are."""
    where = os.path.join(folder, "config.json")
    layers = {w.layer for w in weights if w.layer >= 0}
    if dims["n_layers"] > len(layers):
        raise ValueError(f"{where}: num_hidden_layers is {dims['n_layers']}, the weight files hold {len(layers)} "
                         f"layers")
    wq = next((w for w in weights if (w.kind, w.layer) == ("wq", 0)), None)
    q_dim = dims["n_heads"] * dims["head_dim"]
    if wq is None or wq.shape[:1] != [q_dim]:
        raise ValueError(f"{where}: num_attention_heads * head_dim = {q_dim}, but tensor 'wq' of layer 0 has shape "
                         f"{tuple(wq.shape) if wq else 'none (it is missing)'}")
    rows = [w.shape[0] for w in weights if w.layer == 0 and w.kind in ("ffn_bundles", "ffn_gate") and w.shape]
    ffn_file = config["flashmem"]["ffn"].get("file")
    if not rows and ffn_file:  # the FFN is streamed: the bundle file's header
        info = st.read_header(os.path.join(folder, ffn_file))[0].get(_core.tensor_name("ffn_bundles", 0))
        rows = list(info.shape[:1]) if info else []
    if rows and rows[0] != dims["d_ff"]:
        raise ValueError(f"{where}: intermediate_size is {dims['d_ff']}, but the FFN of layer 0 has {rows[0]} neurons")


ATTENTION_KINDS = ("wq", "wk", "wv", "wo")


def resident_within(resident: list[WeightFile], spare: int) -> set:
    """offload="all" under a budget: the matrices it keeps in DRAM after all, within `spare` bytes (the budget
    beyond the all-streamed minimum), as (kind, layer) pairs: whole layers' attention matrices from the last
    layer down (the streamed ones before them are still each read during the layer before), then the LM
    head (a tied one: the embedding table). A byte of them saves a byte read at every token; a byte of
    neuron cache saves as much at sparsity 0 and less with sparsity (a cached neuron is read only when
    picked), so they come first, and the neuron cache takes what is left. `resident`: weights_to_load with
    nothing streamed."""
    layers, head = {}, None
    for w in resident:
        if w.kind in ATTENTION_KINDS:
            layers[w.layer] = layers.get(w.layer, 0) + w.engine_bytes
        elif w.kind == "lm_head" or (w.kind == "embed" and head is None):
            head = w
    keep = set()
    for layer in sorted(layers, reverse=True):
        if layers[layer] > spare:
            break
        keep |= {(kind, layer) for kind in ATTENTION_KINDS}
        spare -= layers[layer]
    if head is not None and len(keep) == len(ATTENTION_KINDS) * len(layers) and head.engine_bytes <= spare:
        keep.add((head.kind, -1))
    return keep


def weights_to_load(folder: str, config: dict, ffn: str = "dense", stream: tuple = (),
                    keep: set = frozenset()) -> list[WeightFile]:
    """The tensors the engine loads from a converted folder, in file order. ffn: "dense" (the FFN
    in DRAM: neuron bundles, or a "gguf" folder's three matrices), "bundles" (the neuron bundles,
    for sparsity in DRAM) or "streamed" (no FFN weights: flash streaming reads them). A matrix in a
    block format is stored as the bytes of its rows; the file's metadata "formats" names its format
    (checkpoints/convert.py); block-format bundles are U8 rows, their formats in "bundle_format".
    stream: the kinds (of STREAMED_KINDS) left in the file and read when needed (engine_bytes 0), but for
    the (kind, layer) pairs in `keep` (resident_within)."""
    section = config["flashmem"]["ffn"]
    ffn_file = section.get("file")
    matrices = section.get("layout") == "matrices"  # model.safetensors holds gate, up and down
    want_bundles = ffn == "bundles" or (ffn == "dense" and not matrices)
    if want_bundles and not ffn_file:
        raise ValueError(f"{folder}: this folder has no neuron bundles (converted by an older flashmem); convert "
                         "the model again")
    # split down columns' scales lie in the bundle file, and stay resident however the bundles are held
    split = str((section.get("bundle_format") or [""] * 3)[-1]).endswith(SPLIT_SUFFIX)
    files = [RESIDENT_FILE] + ([ffn_file] if want_bundles or (ffn == "streamed" and split) else [])
    out = []
    for fname in files:
        path = os.path.join(folder, fname)
        infos, meta = st.read_header(path)
        try:
            formats = json.loads(meta.get("formats") or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: metadata 'formats' is not valid JSON ({e})") from None
        if not isinstance(formats, dict) or not all(isinstance(v, str) for v in formats.values()):
            raise ValueError(f"{path}: metadata 'formats' must map tensor names to format names, got {formats!r:.200}")
        for name, info in infos.items():
            try:
                kind, layer = _core.tensor_kind(name)  # the engine's names (csrc/model/decoder.h)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            if kind == "lm_head" and config.get("tie_word_embeddings"):
                continue
            if kind in ("ffn_gate", "ffn_up", "ffn_down") and ffn != "dense":
                continue
            if (kind == "ffn_bundles" and not want_bundles) or (kind == "ffn_down_scales" and matrices and
                                                                ffn == "dense"):
                continue
            fmt, shape = formats.get(name, info.tag), list(info.shape)
            nbytes = info.nbytes
            if kind == "ffn_bundles":
                if info.tag == "u8":  # block formats: (d_ff, bundle bytes)
                    fmt = meta.get("bundle_format", "")
                elif info.tag in st.TAG_SIZE and len(shape) == 2:  # float: the engine drops each row's padding
                    nbytes = shape[0] * 3 * config["hidden_size"] * st.TAG_SIZE[info.tag]
                else:
                    raise ValueError(f"{path}: tensor '{name}' must be (d_ff, bundle) of a float type or U8, got "
                                     f"{info.dtype} {tuple(shape)}")
            elif fmt != info.tag:  # a block format: (rows, row bytes) of U8
                block, block_bytes = _core.format_block(fmt)
                if info.tag != "u8" or len(shape) != 2 or shape[1] % block_bytes:
                    raise ValueError(f"{path}: tensor '{name}' in {fmt} must be stored as U8 rows of whole "
                                     f"{block_bytes}-byte blocks, got {info.tag} {tuple(shape)}")
                shape[1] = shape[1] // block_bytes * block
            elif info.tag != "f32" and len(shape) == 1:  # norms and biases become f32
                nbytes = shape[0] * 4
            streamed = (kind in stream and kind in STREAMED_KINDS and fname == RESIDENT_FILE and
                        (kind, layer) not in keep)
            matrix = len(shape) == 2 and kind not in ("ffn_bundles", "ffn_down_scales")
            owned = _core.tensor_footprint(nbytes) if matrix else (nbytes + 63) // 64 * 64  # as Buffer rounds
            out.append(WeightFile(kind, layer, path, info.offset, fmt, shape, 0 if streamed else owned, streamed,
                                  info.nbytes))
    return out


def eos_token_ids(folder: str, tokenizer: Tokenizer) -> list[int]:
    """The ids that end generation: generation_config.json's eos_token_id, the tokenizer's EOS and
    its other end-of-turn tokens."""
    ids = []
    gen = os.path.join(folder, "generation_config.json")
    if os.path.isfile(gen):
        gen_config = read_json(gen)
        e = gen_config.get("eos_token_id") if isinstance(gen_config, dict) else None
        ids += e if isinstance(e, list) else [e] if e is not None else []
        if any(not isinstance(i, int) or isinstance(i, bool) for i in ids):
            raise ValueError(f"{gen}: eos_token_id must be a token id or a list of token ids, got {e!r:.80}")
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids += tokenizer.stop_token_ids
    return sorted(set(ids))
