"""Fuzzing targets for every format flashmem reads (issue 18): GGUF files, safetensors (resident
weights, neuron bundles, sparsity predictor), memory-bank files, config.json, tokenizer.json.

Not a test module (pytest collects test_*.py only): tests/test_fuzz.py runs a bounded slice of it
in CI, bench/fuzz.py the long campaign. Per format:

  build_seeds(root)            small valid files, written once (a tiny random-weight model as a HF
                               folder and its conversions, two GGUF files, four memory banks)
  mutate(fmt, seed, seeds)     a structure-aware mutation of one seed file, chosen by the integer
                               `seed` (deterministic): the format is parsed and its counts, lengths,
                               dims, offsets, type codes and JSON values are rewritten, plus some
                               raw byte flips and truncations
  run_case(fmt, seed, seeds, work)  writes the mutated file into a copy of its folder and loads it
                               through the public API (flashmem.load, MemoryBank.load) in this
                               process, then uses what loaded (logits, tokenizer, bank search)
  run_cases(fmt, seeds, ...)   runs cases in child processes (one per job, restarted after a
                               crash), so that a segfault or abort shows as a signal exit and a
                               case that spins is stopped (CPU_LIMIT seconds of CPU), with an
                               address-space limit that turns a huge allocation into a finding

A case passes when it loads, or raises one of the exceptions the engine's rule allows (ValueError,
OSError, RuntimeError and their subclasses). Findings: crashes (the child died), hangs, "oom"
(MemoryError, or the engine's "cannot allocate": something tried to allocate what the
address-space limit refuses, sized from the file rather than bounded by it) and unexpected
exception types (TypeError, KeyError, ... leaking out of a loader; a Rust panic). Each finding's
input can be saved to tests/fuzz_regressions/<format>-<seed>.bin (.json for JSON formats);
Worker.run(seed, path) loads such a file in its case's folder again.
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import struct
import sys
import threading
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REGRESSIONS = os.path.join(HERE, "fuzz_regressions")

FORMATS = ("gguf", "safetensors", "bundles", "predictor", "bank", "config", "tokenizer")
ALLOWED = (ValueError, OSError, RuntimeError)  # the engine's rule for bad input
CPU_LIMIT = 10.0      # seconds of CPU one case may take before it counts as a hang
WALL_LIMIT = 180.0    # seconds of wall time (a case blocked without using CPU)
MEMORY_LIMIT = 4 << 30  # address space of a worker: a larger allocation fails (MemoryError)
RESTART_EVERY = 400   # cases per worker process before a fresh one (bounds leaks between cases)

# the tiny model every seed derives from: d_model a multiple of 32 (block-format bundles)
D_MODEL, D_FF, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 97
CONVERTED = ("conv_f16", "conv_q8_0", "conv_gguf", "conv_gemma3")
SEEDS_VERSION = "1"  # bump when build_seeds writes other files: a root built before is built again
BANKS = ("flat", "lsh", "ivf", "hnsw")

# ---------------------------------------------------------------------------------------------
# seeds


def build_seeds(root: str) -> str:
    """Writes the seed files into `root` (once: a finished root has a file "ready" naming
    SEEDS_VERSION); returns root.
    hf/: a HF folder (make_tiny_hf); conv_f16, conv_q8_0: its conversions; llama.gguf (block
    formats, byte-level BPE tokenizer) and gemma3.gguf (f16, SentencePiece tokenizer) and their
    conversions conv_gguf, conv_gemma3; each converted folder with a calibrated predictor;
    bank_{flat,lsh,ivf,hnsw}.bank."""
    ready = os.path.join(root, "ready")
    if os.path.isfile(ready):
        with open(ready) as f:
            if f.read().strip() == SEEDS_VERSION:
                return root
    sys.path.insert(0, HERE)
    import flashmem
    from conftest import make_tiny_hf
    from flashmem.flash.calibrate import calibrate

    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    old_cache = os.environ.get("FLASHMEM_CACHE")
    os.environ["FLASHMEM_CACHE"] = os.path.join(root, "cache")
    try:
        hf = os.path.join(root, "hf")
        make_tiny_hf(hf, hidden=D_MODEL, ff=D_FF, layers=N_LAYERS, heads=N_HEADS, kv_heads=N_KV_HEADS, vocab=VOCAB)
        write_gguf(os.path.join(root, "llama.gguf"), "llama")
        write_gguf(os.path.join(root, "gemma3.gguf"), "gemma3")
        sources = {"conv_f16": (hf, "f16"), "conv_q8_0": (hf, "q8_0"),
                   "conv_gguf": (os.path.join(root, "llama.gguf"), None),
                   "conv_gemma3": (os.path.join(root, "gemma3.gguf"), None)}
        text_rng = random.Random(0)
        for name, (src, dtype) in sources.items():
            out = flashmem.convert(src, os.path.join(root, name), dtype=dtype, progress=False)
            model = flashmem.load(out, threads=1)
            words = [f"w{text_rng.randrange(2, VOCAB)}" for _ in range(400)] if src == hf else \
                ["".join(text_rng.choice("abcdefghij ") for _ in range(6)) for _ in range(200)]
            calibrate(model, " ".join(words), tokens=400, progress=False)
        write_banks(root)
    finally:
        if old_cache is None:
            os.environ.pop("FLASHMEM_CACHE", None)
        else:
            os.environ["FLASHMEM_CACHE"] = old_cache
    shutil.rmtree(os.path.join(root, "cache"), ignore_errors=True)
    with open(ready, "w") as f:
        f.write(SEEDS_VERSION + "\n")
    return root


def write_gguf(path: str, arch: str) -> None:
    """A tiny GGUF of the model's shapes: "llama" with block-format matrices (Q8_0, Q4_0, Q4_1,
    Q5_0, Q5_1, F16) and a byte-level BPE tokenizer; "gemma3" with f16 matrices, its q/k and
    output norms, a sliding window and a SentencePiece tokenizer with scores."""
    import gguf

    from flashmem.checkpoints.gguf_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(1)
    d, ff, hd = D_MODEL, D_FF, D_MODEL // N_HEADS
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(N_LAYERS)
    w.add_feed_forward_length(ff)
    w.add_head_count(N_HEADS)
    w.add_head_count_kv(N_KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(32)
        pieces = ["\u2581" + a + b for a in "abcdefghij" for b in "abcde"] + list("abcdefghij") + ["\u2581"]
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(pieces))])
        w.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * len(pieces))
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
    else:
        chars = list(bytes_to_unicode().values())
        merges = [f"{a} {b}" for a in "etao" for b in "nsrh"]
        tokens = chars + [m.replace(" ", "") for m in merges] + ["<|endoftext|>"]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 1) + [3])
        w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 1)
        w.add_eos_token_id(len(tokens) - 1)
    vocab = len(tokens)

    def matrix(name, rows, cols, qtype):
        a = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        if qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            qt = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    block = {"llama": dict(emb="Q8_0", q="Q4_0", k="Q4_1", v="Q5_0", o="Q5_1", gate="Q8_0", up="Q4_0",
                           down="F16", out="F16")}.get(arch, {k: "F16" for k in
                                                               ("emb", "q", "k", "v", "o", "gate", "up", "down")})
    matrix("token_embd.weight", vocab, d, block["emb"])
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", d)
        matrix(p + "attn_q.weight", N_HEADS * hd, d, block["q"])
        matrix(p + "attn_k.weight", N_KV_HEADS * hd, d, block["k"])
        matrix(p + "attn_v.weight", N_KV_HEADS * hd, d, block["v"])
        matrix(p + "attn_output.weight", d, N_HEADS * hd, block["o"])
        norm(p + "ffn_norm.weight", d)
        matrix(p + "ffn_gate.weight", ff, d, block["gate"])
        matrix(p + "ffn_up.weight", ff, d, block["up"])
        matrix(p + "ffn_down.weight", d, ff, block["down"])
        if arch == "gemma3":
            for n in ("attn_q_norm", "attn_k_norm"):
                norm(p + n + ".weight", hd)
            for n in ("post_attention_norm", "post_ffw_norm"):
                norm(p + n + ".weight", d)
    norm("output_norm.weight", d)
    if "out" in block:
        matrix("output.weight", vocab, d, block["out"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_banks(root: str) -> None:
    """One bank per index: values in f16 and f32, texts, metadata, removed entries (free slots),
    search settings given by hand (saved with the bank)."""
    import flashmem

    rng = np.random.default_rng(2)
    params = {"flat": ({}, "cosine"), "lsh": (dict(tables=4, probes=8), "ip"), "ivf": (dict(nlist=4, nprobe=2), "l2"),
              "hnsw": (dict(M=8, ef_search=32), "cosine")}
    for index, (p, metric) in params.items():
        bank = flashmem.MemoryBank(16, metric=metric, index=index, **p)
        n = 120
        keys = rng.standard_normal((n, 16)).astype(np.float32)
        values = [rng.standard_normal((1 + i % 3, 8)).astype(np.float16 if i % 2 else np.float32) if i % 4 else None
                  for i in range(n)]
        bank.add(keys, values=values, texts=[f"memory {i} é" for i in range(n)],
                 metadata=[{"kind": "fact", "i": i} if i % 3 else {} for i in range(n)])
        if index == "ivf":
            bank.train()
        bank.remove([3, 50, 51, 99])
        bank.save(os.path.join(root, f"bank_{index}.bank"))


# ---------------------------------------------------------------------------------------------
# interesting values

INTS = [0, 1, -1, 2, 3, 7, 8, 31, 32, 255, 256, 4095, 4096, 65535, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1,
        2 ** 32, 2 ** 40, 2 ** 53, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -2 ** 31, -2 ** 63]
FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-45, 1e-300, 1e30, 1e308, -1e308, math.inf, -math.inf, math.nan, 2.0 ** 24]
STRINGS = ["", "x", "\x00", "é🙂", "\ud800", "a" * 5000, "null", "-1", "1e999", "{}", "[]",
           "model.layers.0.self_attn.q_proj.weight", "model.layers.99.mlp.bundles", "model.layers.-1.mlp.bundles",
           "model.layers.4294967296.input_layernorm.weight", "lm_head.weight", "model.embed_tokens.weight"]
FORMAT_NAMES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "u8", "i8",
                "gguf", "bogus", "", "F32", "Q8_0"]
ST_DTYPES = ["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F64", "BOOL", "F8_E4M3", "U16", "", "f32"]


def interesting_int(rng: random.Random, v: int | None = None) -> int:
    if v is not None and rng.random() < 0.4:
        return rng.choice([v + 1, v - 1, -v, v * 2, v // 2, v * 1000, v + 2 ** 32, v ^ (1 << rng.randrange(64))])
    return rng.choice(INTS)


def int_of_width(rng: random.Random, size: int, v: int | None = None) -> bytes:
    """An interesting value as `size` little-endian bytes (negative ones as two's complement)."""
    return (interesting_int(rng, v) & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def float_of(rng: random.Random, fmt: str) -> bytes:
    """An interesting float as f32 ("<f": too large ones become inf) or f64 bytes."""
    v = rng.choice(FLOATS)
    if fmt == "<f":
        with np.errstate(over="ignore"):
            return np.float32(v).tobytes()
    return struct.pack("<d", v)


def raw_mutation(data: bytes, rng: random.Random, start: int = 0) -> bytes:
    """Byte flips, a truncation, appended junk or a removed or repeated chunk (from `start` on)."""
    b = bytearray(data)
    op = rng.random()
    if op < 0.4 and len(b) > start:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(start, len(b))
            b[i] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256), b[i] ^ (1 << rng.randrange(8))])
        return bytes(b)
    if op < 0.7:
        cut = rng.randrange(0, len(b)) if rng.random() < 0.5 else rng.randrange(min(start, len(b)), len(b) + 1)
        return bytes(b[:cut])
    if op < 0.8:
        return bytes(b) + bytes(rng.randrange(256) for _ in range(rng.choice([1, 7, 64, 4096])))
    i = rng.randrange(len(b) + 1)
    j = min(len(b), i + rng.choice([1, 4, 8, 64, 1000]))
    return bytes(b[:i] + (b[i:j] * 2 if rng.random() < 0.5 else b"") + b[j:])


# ---------------------------------------------------------------------------------------------
# JSON


def json_strings(obj, out: set, limit: int = 400) -> set:
    """The short strings of a JSON document (keys and values): replacement values that the
    format's own readers know (type names, token texts)."""
    if len(out) >= limit:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if len(k) < 40:
                out.add(k)
            json_strings(v, out, limit)
    elif isinstance(obj, list):
        for v in obj[:50]:
            json_strings(v, out, limit)
    elif isinstance(obj, str) and len(obj) < 40:
        out.add(obj)
    return out


def new_json_value(v, rng: random.Random, pool: list):
    """A replacement for JSON value v: of its own kind mostly (a number made huge, negative, zero,
    a float; a string from the pool; a list emptied, cut, doubled; a dict with keys removed or
    added), sometimes of another kind."""
    r = rng.random()
    if r < 0.15:  # any kind
        return rng.choice([None, True, False, [], {}, rng.choice(INTS), rng.choice(FLOATS), rng.choice(STRINGS),
                           rng.choice(pool), [v], {"x": v}])
    if isinstance(v, bool):
        return rng.choice([not v, 0, 1, "true", None])
    if isinstance(v, int):
        return rng.choice([interesting_int(rng, v), interesting_int(rng), float(v) + 0.5, float(v), str(v), None])
    if isinstance(v, float):
        return rng.choice([rng.choice(FLOATS), int(v) if math.isfinite(v) else 0, -v, v * 1e10, str(v)])
    if isinstance(v, str):
        return rng.choice([rng.choice(pool), rng.choice(pool), rng.choice(STRINGS), "", v[: len(v) // 2],
                           v + rng.choice(pool), v * 3, interesting_int(rng)])
    if isinstance(v, list):
        if not v:
            return rng.choice([[None], [rng.choice(pool)], [interesting_int(rng)], [[]], {}])
        out = list(v)
        op = rng.randrange(6)
        if op == 0:
            return []
        if op == 1:
            return out[:1] if rng.random() < 0.5 else out[: rng.randrange(len(out))]
        if op == 2:
            return out + out
        if op == 3:
            out.insert(rng.randrange(len(out) + 1), new_json_value(rng.choice(out), rng, pool))
            return out
        if op == 4:
            return out[::-1]
        del out[rng.randrange(len(out))]
        return out
    if isinstance(v, dict):
        out = dict(v)
        op = rng.randrange(4)
        if op == 0:
            return {}
        if op == 1 and out:
            del out[rng.choice(list(out))]
            return out
        if op == 2:
            out[rng.choice(pool)] = rng.choice([None, 0, "", [], interesting_int(rng), rng.choice(pool)])
            return out
        return [out]
    return rng.choice([0, "", [], {}, rng.choice(pool)])  # None


def pick_slot(holder: list, rng: random.Random, descend: float = 0.65):
    """A (container, key) in the document under holder[0]: a random walk from the top that stops
    at each level with probability 1 - descend, so top-level fields are picked as often as the
    entries of a long list."""
    node, key = holder, 0
    while True:
        child = node[key]
        if isinstance(child, (dict, list)) and child and rng.random() < descend:
            node, key = child, rng.choice(list(child)) if isinstance(child, dict) else rng.randrange(len(child))
        else:
            return node, key


def mutate_json_value(doc, rng: random.Random, pool: list, n: int | None = None):
    """1 to 4 mutations of a parsed JSON document: values replaced, keys or elements removed,
    values copied from elsewhere in the document. Returns the new document."""
    holder = [doc]
    for _ in range(n or rng.randint(1, 4)):
        node, key = pick_slot(holder, rng)
        op = rng.random()
        if op < 0.15 and node is not holder:
            del node[key]
        elif op < 0.25:
            src, skey = pick_slot(holder, rng)
            node[key] = json.loads(json.dumps(src[skey]))
        else:
            node[key] = new_json_value(node[key], rng, pool)
    return holder[0]


def mutate_json_text(text: bytes, rng: random.Random, pool: list) -> bytes:
    """A JSON file mutated: mostly its values (mutate_json_value), sometimes its text."""
    if rng.random() < 0.12:
        if rng.random() < 0.3:
            return text.replace(b'"', b"", 1) if rng.random() < 0.5 else text[:-1] + b"\xff\xfe"
        return raw_mutation(text, rng)
    doc = mutate_json_value(json.loads(text), rng, pool)
    return json.dumps(doc, indent=rng.choice([None, 1])).encode()


# ---------------------------------------------------------------------------------------------
# safetensors

def parse_safetensors(data: bytes) -> tuple[dict, bytes, int]:
    """(header dict, data section, header length) of a valid safetensors file."""
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:], n


def write_safetensors(header: dict, body: bytes, old_n: int, rng: random.Random) -> bytes:
    """The file for a header and data section; the header padded with spaces to its old length
    (the data then starts where it did: 4096-aligned in a bundle file) when it is not longer."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) <= old_n:
        raw += b" " * (old_n - len(raw))
    elif (8 + old_n) % 4096 == 0 and rng.random() < 0.8:
        raw += b" " * (-(8 + len(raw)) % 4096)
    return struct.pack("<Q", len(raw)) + raw + body


def relayout(header: dict, body: bytes, rng: random.Random) -> bytes:
    """The data section again with every tensor's data_offsets consistent with its (changed)
    dtype and shape: each tensor's bytes cut or padded to its new size, in the old order."""
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1}
    out = bytearray()
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            old = body[spec["data_offsets"][0]:spec["data_offsets"][1]]
            want = int(np.prod(spec["shape"], dtype=np.int64)) * sizes[spec["dtype"]]
        except (KeyError, TypeError, ValueError, IndexError):
            continue
        if not 0 <= want <= 1 << 22:
            continue
        piece = old[:want] + bytes([rng.choice([0, 0x3C, 0xFF])]) * max(0, want - len(old))
        spec["data_offsets"] = [len(out), len(out) + want]
        out += piece
    return bytes(out)


def new_shape(shape: list, rng: random.Random) -> list:
    s = list(shape)
    op = rng.randrange(7)
    if op == 0 and len(s) == 2:
        return s[::-1]
    if op == 1 and s:
        i = rng.randrange(len(s))
        s[i] = rng.choice([0, 1, s[i] - 1, s[i] + 1, s[i] * 2, max(1, s[i] // 2), 32, 4096])
        return s
    if op == 2:
        return s + [1]
    if op == 3 and s:
        return s[:-1]
    if op == 4:
        return [int(np.prod(s))] if s else [1]
    if op == 5 and len(s) == 2:
        return [s[0] * 2, s[1] // 2] if s[1] % 2 == 0 else [s[0], s[1]]
    return []


def rename(name: str, rng: random.Random, names: list) -> str:
    parts = name.split(".")
    if rng.random() < 0.5 and len(parts) > 2 and parts[2].isdigit():
        parts[2] = str(rng.choice([0, 1, 2, 3, 99, -1, 2 ** 31, 2 ** 64, "x", ""]))
        return ".".join(parts)
    if rng.random() < 0.5 and names:
        return rng.choice(names)
    return rng.choice(STRINGS + [name + "x", name.replace("weight", "bias"), name.replace("q_proj", "k_proj")])


def mutate_safetensors(data: bytes, rng: random.Random, pool: list) -> bytes:
    """A safetensors file mutated in its structure: the 8-byte header length; an entry's dtype,
    shape or data_offsets (alone, or with every offset made consistent again so that deeper checks
    are reached); tensors renamed, dropped or aliased; the metadata (the "formats" JSON inside it);
    interesting values written into a tensor's data; or raw bytes."""
    header, body, n = parse_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    op = rng.choices(["length", "entry", "relayout", "names", "metadata", "json", "data", "raw"],
                     [6, 22, 22, 10, 10, 10, 12, 8])[0]
    if op == "length":
        return int_of_width(rng, 8, n) + data[8:]
    if op == "raw":
        return raw_mutation(data, rng)
    if op == "data":
        name = rng.choice(names)
        spec = header[name]
        b, e = spec["data_offsets"]
        body = bytearray(body)
        itemsize = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2}.get(spec["dtype"], 1)
        for _ in range(rng.randint(1, 16)):
            if e - b < itemsize:
                break
            at = b + rng.randrange((e - b) // itemsize) * itemsize
            if spec["dtype"] == "F32":
                val = float_of(rng, "<f")
            elif spec["dtype"] == "F16":
                with np.errstate(over="ignore"):
                    val = np.float16(rng.choice(FLOATS)).tobytes()
            else:
                val = int_of_width(rng, itemsize)
            body[at:at + itemsize] = val
        return write_safetensors(header, bytes(body), n, rng)
    if op == "names":
        name = rng.choice(names)
        r = rng.random()
        if r < 0.4:
            header.pop(name)
        elif r < 0.7:
            header[rename(name, rng, names)] = header.pop(name)
        else:
            header[rename(name, rng, names)] = dict(header[name])
        return write_safetensors(header, body, n, rng)
    if op == "metadata":
        meta = header.get("__metadata__")
        if isinstance(meta, dict) and meta and rng.random() < 0.85:
            key = rng.choice(list(meta))
            if key == "formats" and rng.random() < 0.8:
                formats = json.loads(meta[key])
                if formats and rng.random() < 0.6:
                    formats[rng.choice(list(formats))] = rng.choice(FORMAT_NAMES)
                else:
                    formats = mutate_json_value(formats, rng, pool + FORMAT_NAMES)
                meta[key] = json.dumps(formats)
            elif rng.random() < 0.7:
                meta[key] = rng.choice(FORMAT_NAMES + STRINGS + [str(interesting_int(rng)), ",".join(
                    rng.choice(FORMAT_NAMES) for _ in range(rng.randint(1, 4)))])
            else:
                meta[key] = new_json_value(meta[key], rng, pool)
        else:
            header["__metadata__"] = new_json_value(meta, rng, pool)
        return write_safetensors(header, body, n, rng)
    if op == "json":
        return write_safetensors(mutate_json_value(header, rng, pool), body, n, rng)
    name = rng.choice(names)
    spec = header[name]
    field = rng.choice(["dtype", "shape", "shape", "data_offsets", "data_offsets"])
    if op == "relayout":
        if field == "dtype" or rng.random() < 0.3:
            spec["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "I8", "I32", "I64", "F64"])
        if field != "dtype" or rng.random() < 0.3:
            spec["shape"] = new_shape(spec["shape"], rng)
        return write_safetensors(header, relayout(header, body, rng), n, rng)
    if field == "dtype":
        spec["dtype"] = rng.choice(ST_DTYPES)
    elif field == "shape":
        s = list(spec["shape"])
        if s and rng.random() < 0.7:
            i = rng.randrange(len(s))
            s[i] = interesting_int(rng, s[i])
        else:
            s = rng.choice([[], [0], s + [interesting_int(rng)], [2 ** 40], [2 ** 20, 2 ** 20], s * 3])
        spec["shape"] = s
        if rng.random() < 0.5:  # the offsets follow, so only the file's size can refute it
            itemsize = {"F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I64": 8, "F64": 8}.get(spec["dtype"], 1)
            try:
                spec["data_offsets"][1] = spec["data_offsets"][0] + int(np.prod(s, dtype=object)) * itemsize
            except TypeError:
                pass
    else:
        off = list(spec["data_offsets"])
        i = rng.randrange(2)
        off[i] = interesting_int(rng, off[i]) if rng.random() < 0.8 else rng.choice([None, "0", 1.5])
        if rng.random() < 0.2:
            off = rng.choice([[], [0], off + [0], [off[1], off[0]]])
        spec["data_offsets"] = off
    return write_safetensors(header, body, n, rng)


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFLayout:
    """Where each field of a GGUF header lies: spans (offset, size, kind) with kind one of version,
    count (tensors, KVs, array lengths), length (string lengths), vtype (KV and array item types),
    value (scalars, with their struct format), ndims, dim, ttype, toffset; and the byte ranges of
    each KV and tensor info, for removing or repeating them."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.spans = data, 4, []
        self.version = self.take("<I", "version")
        self.n_tensors_at = self.pos
        n_tensors = self.take("<Q", "count")
        self.n_kv_at = self.pos
        n_kv = self.take("<Q", "count")
        self.kvs, self.tensors = [], []
        for _ in range(n_kv):
            start = self.pos
            key = self.string("key")
            self.value(self.take("<I", "vtype"), key)
            self.kvs.append((start, self.pos, key))
        for _ in range(n_tensors):
            start = self.pos
            name = self.string("name")
            nd = self.take("<I", "ndims")
            for _ in range(nd):
                self.take("<Q", "dim")
            self.take("<I", "ttype")
            self.take("<Q", "toffset")
            self.tensors.append((start, self.pos, name))
        self.end = self.pos

    def take(self, fmt: str, kind: str, label: str = ""):
        size = struct.calcsize(fmt)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.spans.append((self.pos, size, kind, fmt, label))
        self.pos += size
        return v

    def string(self, label: str) -> str:
        n = self.take("<Q", "length", label)
        s = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def value(self, vtype: int, label: str) -> None:
        if vtype in GGUF_SCALAR:
            self.take(GGUF_SCALAR[vtype], "value", label)
        elif vtype == 8:
            self.string(label)
        elif vtype == 9:
            item = self.take("<I", "vtype", label)
            for _ in range(self.take("<Q", "count", label)):
                self.value(item, label)
        else:
            raise ValueError(f"bad GGUF value type {vtype}")


def gguf_string(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def mutate_gguf(data: bytes, rng: random.Random, pool: list) -> bytes:
    """A GGUF file mutated in its structure: a count, string length, value type, tensor dim,
    dim count, tensor type or data offset rewritten in place; a metadata value changed (a
    dimension made huge, zero or negative); a KV or tensor info removed, repeated or renamed (the
    data section kept where it was); or raw bytes."""
    g = GGUFLayout(data)
    b = bytearray(data)
    op = rng.choices(["field", "value", "drop", "repeat", "rename", "raw"], [40, 25, 10, 6, 9, 10])[0]
    if op == "raw":
        return raw_mutation(data, rng, start=0 if rng.random() < 0.7 else g.end)
    if op in ("field", "value"):
        kinds = ("value",) if op == "value" else ("version", "count", "length", "vtype", "ndims", "dim", "ttype",
                                                   "toffset")
        spans = [s for s in g.spans if s[2] in kinds]
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            at, size, kind, fmt, label = rng.choice(spans)
            if fmt in ("<f", "<d"):
                new = float_of(rng, fmt)
            elif kind in ("vtype", "ttype") and rng.random() < 0.6:
                new = struct.pack("<I", rng.choice(range(0, 45)))
            else:
                (old,) = struct.unpack_from(fmt, data, at)
                new = int_of_width(rng, size, old)
            b[at:at + size] = new
        return bytes(b)
    # structural edits: the header rebuilt, then padded so the data section keeps its alignment
    pieces = [("kv", s, e, k) for s, e, k in g.kvs] + [("tensor", s, e, k) for s, e, k in g.tensors]
    kind, s, e, name = rng.choice(pieces)
    head = bytes(b[:g.end])
    count_at = g.n_kv_at if kind == "kv" else g.n_tensors_at
    (count,) = struct.unpack_from("<Q", head, count_at)
    if op == "drop":
        head, count = head[:s] + head[e:], count - 1
    elif op == "repeat":
        head, count = head[:e] + head[s:e] + head[e:], count + 1
    else:
        (n,) = struct.unpack_from("<Q", head, s)
        new = rename(name, rng, [t[2] for t in g.tensors]) if kind == "tensor" else rng.choice(
            pool + ["general.architecture", "llama.block_count", "gemma3.embedding_length", "x"])
        head = head[:s] + gguf_string(new) + head[s + 8 + n:]
    head = head[:count_at] + struct.pack("<Q", count) + head[count_at + 8:]
    align = 32
    data_start = -(-g.end // align) * align
    return head + b"\0" * (-len(head) % align) + data[data_start:]


# ---------------------------------------------------------------------------------------------
# memory banks


class BankLayout:
    """The fields of a memory-bank file (csrc/memory/bank_file.h) as spans (offset, size, kind,
    fmt, label): kind count (a vector's or string's length), value (a scalar) or blob (keys,
    values, texts, links); strings also as (count offset, end) for replacing their contents."""

    def __init__(self, data: bytes):
        self.data, self.base, self.spans, self.strings = data, 64, [], []
        self.pos = 64
        self.version = struct.unpack_from("<I", data, 8)[0]
        dim = self.take("<I", "dim")
        self.take("<I", "metric")
        index = self.string("index name")
        self.take("<q", "next id")
        n = self.vec(8, "ids")
        ids_at = self.pos - 8 * n
        ids = struct.unpack_from(f"<{n}q", data, ids_at)
        live = data[self.pos + 8:self.pos + 8 + n]
        self.vec(1, "live")
        self.pos = self.base + -(-(self.pos - self.base) // 64) * 64
        self.blob(n * dim * 4, "keys")
        for s in range(n):
            if not live[s]:
                continue
            self.take("<I", "value dtype")
            self.take("<i", "value slots")
            self.take("<i", "value width")
            self.vec(1, "value")
            self.string("text")
            self.string("metadata")
            self.take("<d", "created")
            self.take("<d", "updated")
        if index == "hnsw":
            for label in ("M", "ef_construction", "ef_search"):
                self.take("<i", "hnsw " + label)
            self.take("<I", "hnsw entry")
            self.take("<i", "hnsw max level")
            m = self.vec(1, "hnsw levels")
            levels = struct.unpack_from(f"<{m}b", data, self.pos - m)
            for lv in levels:
                for _ in range(lv + 1 if lv >= 0 else 0):
                    k = self.take("<I", "hnsw link count")
                    self.blob(4 * k, "hnsw links")
        elif index == "ivf":
            for label in ("nlist param", "nprobe", "train_size", "iters"):
                self.take("<i", "ivf " + label)
            self.take("<d", "ivf retrain_growth")
            self.take("<Q", "ivf seed")
            nlist = self.take("<i", "ivf nlist")
            self.take("<Q", "ivf trained_at")
            self.vec(4, "ivf centroids")
            for _ in range(nlist):
                self.vec(4, "ivf list")
        elif index == "lsh":
            for label in ("tables", "bits param", "probes", "rerank"):
                self.take("<i", "lsh " + label)
            self.take("<Q", "lsh seed")
            self.take("<i", "lsh bits")
            self.take("<Q", "lsh centered_at")
            self.vec(4, "lsh center")
            self.vec(4, "lsh codes")
            self.vec(8, "lsh sketches")
        self.tuning_at = self.pos
        if self.version >= 2:
            for fmt, label in (("<d", "target"), ("<Q", "tuned at"), ("<d", "recall"), ("<d", "us"),
                               ("<d", "exact us"), ("<B", "exact"), ("<B", "untrained")):
                self.take(fmt, "tuning " + label)
            for _ in range(self.take("<Q", "search settings")):
                self.string("setting name")
                self.take("<d", "setting value")

    def take(self, fmt: str, label: str):
        size = struct.calcsize(fmt)
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.spans.append((self.pos, size, "value", fmt, label))
        self.pos += size
        return v

    def vec(self, item: int, label: str) -> int:
        (n,) = struct.unpack_from("<Q", self.data, self.pos)
        self.spans.append((self.pos, 8, "count", "<Q", label))
        self.pos += 8
        self.blob(n * item, label)
        return n

    def string(self, label: str) -> str:
        start = self.pos
        n = self.vec(1, label)
        self.strings.append((start, self.pos, label))
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def blob(self, n: int, label: str) -> None:
        if n:
            self.spans.append((self.pos, n, "blob", "", label))
        self.pos += n


def seal_bank(data: bytes) -> bytes:
    """The preamble's payload length and checksum made right for the (mutated) payload."""
    from flashmem import _core

    payload = data[64:]
    return data[:16] + struct.pack("<QQ", len(payload), _core.bank_checksum(payload)) + data[32:64] + payload


def mutate_bank(data: bytes, rng: random.Random, pool: list) -> bytes:
    """A memory-bank file mutated in its structure: a count, dimension, id, dtype, shape, index
    parameter, link count or tuning field rewritten; a string's contents replaced (the index name,
    a text, metadata that is not JSON); keys, values or links overwritten; the version changed (1:
    without the tuning record); and the preamble's length and checksum made right again (9 times
    in 10: the payload's checks are reached), or raw bytes."""
    lay = BankLayout(data)
    b = bytearray(data)
    op = rng.choices(["field", "string", "blob", "version", "raw"], [55, 12, 15, 6, 12])[0]
    if op == "raw":
        out = raw_mutation(data, rng, start=64)
        return seal_bank(out) if rng.random() < 0.5 and len(out) >= 64 else out
    if op == "field":
        spans = [s for s in lay.spans if s[2] != "blob"]
        for _ in range(rng.choice([1, 1, 2, 3])):
            at, size, kind, fmt, label = rng.choice(spans)
            (old,) = struct.unpack_from(fmt, data, at)
            b[at:at + size] = float_of(rng, fmt) if fmt == "<d" else int_of_width(rng, size, old)
    elif op == "string":
        s, e, label = rng.choice(lay.strings)
        new = rng.choice(["flat", "lsh", "ivf", "hnsw", "", "ef_search", "nprobe", "probes", "train", "{", "[]",
                          '{"kind": ', "\ud800", rng.choice(pool), rng.choice(STRINGS)])
        raw = new.encode("utf-8", "surrogatepass") if rng.random() < 0.9 else bytes([0xff, 0xfe, 0x80])
        b[s:e] = struct.pack("<Q", len(raw)) + raw
    elif op == "blob":
        blobs = [s for s in lay.spans if s[2] == "blob"]
        at, size, _, _, label = rng.choice(blobs)
        for _ in range(rng.randint(1, 8)):
            i = at + rng.randrange(size) // 4 * 4
            n = min(4, at + size - i)
            b[i:i + n] = (float_of(rng, "<f") if rng.random() < 0.5 else int_of_width(rng, 4))[:n]
    else:
        version = rng.choice([0, 1, 1, 3, 2 ** 32 - 1])
        b[8:12] = struct.pack("<I", version)
        if version == 1 and rng.random() < 0.7:
            del b[lay.tuning_at:]
    out = bytes(b)
    return seal_bank(out) if rng.random() < 0.9 else out


# ---------------------------------------------------------------------------------------------
# cases

# per format: the seed it mutates and how it is loaded, chosen from the case's seed (stable: the
# regression files in tests/fuzz_regressions/ name their seed, replay() finds the same setup)
PLANS = {
    "gguf": [("llama.gguf", "gguf"), ("gemma3.gguf", "gguf")],
    "safetensors": [(f"{c}/model.safetensors", mode) for mode in ("dense", "all") for c in CONVERTED],
    "bundles": [(f"{c}/ffn_bundles.safetensors", mode) for mode in ("dense", "flash", "sparse") for c in CONVERTED],
    "predictor": [(f"{c}/predictor.safetensors", mode) for mode in ("sparse", "flash_sparse") for c in CONVERTED],
    "bank": [(f"bank_{i}.bank", mode) for mode in ("read", "mmap") for i in BANKS],
    "config": [("hf/config.json", "convert")] + [(f"{c}/config.json", mode) for mode in ("dense", "flash")
                                                   for c in CONVERTED],
    "tokenizer": [(f"{c}/{f}", "tokenizer") for f in ("tokenizer.json",) * 3 + ("tokenizer_config.json",)
                  for c in ("conv_f16", "conv_gguf", "conv_gemma3")],
}
MUTATORS = {"gguf": mutate_gguf, "safetensors": mutate_safetensors, "bundles": mutate_safetensors,
            "predictor": mutate_safetensors, "bank": mutate_bank, "config": mutate_json_text,
            "tokenizer": mutate_json_text}
_POOLS: dict = {}


def plan(fmt: str, seed: int) -> tuple[str, str]:
    """(seed file relative to the seeds' root, load mode) of case `seed` of format `fmt`."""
    plans = PLANS[fmt]
    return plans[seed % len(plans)]


def extension(fmt: str) -> str:
    return ".json" if fmt in ("config", "tokenizer") else ".bin"


def string_pool(fmt: str, seeds: str) -> list:
    """Strings the format's own files contain (JSON keys and values, GGUF keys), for replacements."""
    if fmt not in _POOLS:
        found: set = set()
        for rel, _ in PLANS.get(fmt, []):
            path = os.path.join(seeds, rel)
            if path.endswith(".json"):
                with open(path) as f:
                    json_strings(json.load(f), found)
            elif path.endswith(".safetensors"):
                with open(path, "rb") as f:
                    json_strings(parse_safetensors(f.read())[0], found)
            elif path.endswith(".gguf"):
                with open(path, "rb") as f:
                    found.update(k for _, _, k in GGUFLayout(f.read()).kvs)
        _POOLS[fmt] = sorted(found) or ["x"]
    return _POOLS[fmt]


def mutate(fmt: str, seed: int, seeds: str) -> bytes:
    """The bytes of case `seed`'s mutated file (deterministic)."""
    rel, _ = plan(fmt, seed)
    with open(os.path.join(seeds, rel), "rb") as f:
        data = f.read()
    return MUTATORS[fmt](data, random.Random(f"{fmt}-{seed}"), string_pool(fmt, seeds))


def prepare(fmt: str, seed: int, seeds: str, work: str, data: bytes) -> tuple[str, str]:
    """Writes case `seed` into the empty folder `work`: a copy of its seed's folder (or the seed
    file alone) with `data` in place of the file it mutates. Returns (path to load, mode)."""
    rel, mode = plan(fmt, seed)
    folder = os.path.dirname(rel)
    if folder:
        shutil.copytree(os.path.join(seeds, folder), os.path.join(work, folder))
    with open(os.path.join(work, rel), "wb") as f:
        f.write(data)
    return os.path.join(work, folder or rel), mode


def load(fmt: str, path: str, mode: str, work: str) -> None:
    """Loads a case through the public API and uses what loaded."""
    import flashmem

    if fmt == "bank":
        bank = flashmem.MemoryBank.load(path, mmap=mode == "mmap")
        rng = np.random.default_rng(0)
        n, dim, ids = len(bank), bank.dim, bank.ids()
        bank.search(rng.standard_normal((2, dim)).astype(np.float32), k=5)
        for i in ids[:3]:
            bank.get(int(i))
        bank.search(rng.standard_normal((1, dim)).astype(np.float32), k=3, filter=lambda md: "kind" in md)
        new = bank.add(rng.standard_normal((2, dim)).astype(np.float32), texts=["a", "b"])
        bank.remove(new[:1])
        if n:
            bank.remove(ids[-1:])
        bank.search(rng.standard_normal((1, dim)).astype(np.float32), k=4)
        bank.save(os.path.join(work, "again.bank"))
        flashmem.MemoryBank.load(os.path.join(work, "again.bank"))
        return
    os.environ["FLASHMEM_CACHE"] = os.path.join(work, "cache")  # conversions of GGUF and HF sources
    kw = dict(threads=1, max_context=32)
    if mode in ("flash", "flash_sparse"):
        kw.update(offload="flash", dram_budget="64MB")
    if mode == "all":
        kw.update(offload="all")
    if mode in ("sparse", "flash_sparse"):
        kw.update(sparsity=0.5)
    if fmt == "config":
        kw.pop("max_context")  # the config's own max_position_embeddings
    model = flashmem.load(path, **kw)
    if fmt == "tokenizer":
        ids = model.tokenizer.encode("w3 w4 hello <s> the eat\u2581 é 🙂")
        model.tokenizer.decode(ids)
        model.generate("w3 w4 hello", max_new_tokens=2)
    else:
        model.logits([1, 2, 3])
        model.generate([2, 3], max_new_tokens=2)


def describe(e: BaseException) -> dict:
    """An exception as an outcome: its kind (error: one the rule allows; unexpected: another
    Exception; oom: MemoryError; baseexception: not even an Exception, e.g. a Rust panic), type,
    message and the innermost frame of flashmem's (or the library's) code that raised it."""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "flashmem" in f.filename and "fuzz_targets" not in f.filename] or tb[-1:]
    where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"
    if isinstance(e, MemoryError) or "cannot allocate" in str(e):  # the engine's Buffer says so
        kind = "oom"
    elif isinstance(e, ALLOWED):
        kind = "error"
    elif isinstance(e, Exception):
        kind = "unexpected"
    else:
        kind = "baseexception"
    return {"kind": kind, "type": type(e).__name__, "message": str(e)[:300], "where": where}


def run_case(fmt: str, seed: int, seeds: str, work_root: str, data: bytes | None = None) -> dict:
    """One case, in this process: mutate (unless `data` is given), write, load, use. Returns the
    outcome ({"kind": "ok"} or describe(exception))."""
    work = os.path.join(work_root, f"case-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        if data is None:
            data = mutate(fmt, seed, seeds)
        path, mode = prepare(fmt, seed, seeds, work, data)
        try:
            load(fmt, path, mode, work)
            return {"kind": "ok"}
        except BaseException as e:  # noqa: B902  (a Rust panic is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            return describe(e)
    finally:
        # a Model is freed by the cyclic garbage collector only (model.py: its encoders hold its
        # bound methods): without this, each case's engine, threads and buffers would stay
        gc.collect()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# running cases in child processes


def _worker(conn, fmt: str, seeds: str, work_root: str, log_path: str) -> None:
    """A child process: runs the cases whose seeds it receives, sends each outcome back. Its
    output goes to log_path (with a native traceback if it crashes: faulthandler)."""
    import faulthandler
    import resource
    import warnings

    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    warnings.simplefilter("ignore")
    os.environ["TQDM_DISABLE"] = "1"
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    import flashmem  # noqa: F401  (imported before the first case: not counted in its time)

    string_pool(fmt, seeds)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        seed, path = job
        print(f"--- case {fmt} {seed} {path or ''}", flush=True)
        try:
            data = None
            if path:
                with open(path, "rb") as f:
                    data = f.read()
            out = run_case(fmt, seed, seeds, work_root, data)
        except Exception:  # a bug of the harness (the mutator), not of flashmem
            out = {"kind": "harness", "type": "harness", "message": traceback.format_exc()[-1500:]}
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the worker's peak
        conn.send(out)


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Worker:
    """A child process running cases of one format; restarted after a crash or a hang."""

    def __init__(self, fmt: str, seeds: str, work_root: str, name: str):
        self.fmt, self.seeds, self.work_root = fmt, seeds, work_root
        os.makedirs(work_root, exist_ok=True)
        self.log = os.path.join(work_root, f"{name}.log")
        self.proc = None
        self.cases = 0

    def start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.fmt, self.seeds, self.work_root, self.log),
                                daemon=True)
        self.proc.start()
        child.close()
        try:
            ready = self.conn.poll(300) and self.conn.recv() == "ready"
        except EOFError:
            ready = False
        if not ready:
            self.stop()
            raise RuntimeError(f"fuzz worker did not start; see {self.log}")
        self.cases = 0

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.kill()
            self.proc.join()
            self.conn.close()
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        with open(self.log, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log) - n))
            return f.read().decode("utf-8", "replace")

    def run(self, seed: int, path: str | None = None) -> dict:
        """The outcome of case `seed` (with the file `path` instead of its mutation, if given); kind
        "crash" (the child died: exitcode, log tail) or "hang" (CPU_LIMIT seconds of CPU, or
        WALL_LIMIT of wall time) when it did not answer."""
        if self.proc is None or self.cases >= RESTART_EVERY:
            self.stop()
            self.start()
        self.cases += 1
        cpu0, t0 = _cpu_seconds(self.proc.pid), time.monotonic()
        self.conn.send((seed, path))
        while not self.conn.poll(0.2):
            cpu = _cpu_seconds(self.proc.pid) - cpu0
            if cpu > CPU_LIMIT or time.monotonic() - t0 > WALL_LIMIT:
                tail = self.log_tail()
                self.stop()
                return {"kind": "hang", "cpu_s": round(cpu, 1), "wall_s": round(time.monotonic() - t0, 1),
                        "log": tail}
        try:
            out = self.conn.recv()
        except (EOFError, ConnectionError):
            self.proc.join()
            code = self.proc.exitcode
            tail = self.log_tail()
            self.stop()
            return {"kind": "crash", "exitcode": code, "log": tail}
        out["cpu_s"] = _cpu_seconds(self.proc.pid) - cpu0
        return out


FINDINGS = ("crash", "hang", "oom", "baseexception", "unexpected", "harness")


def run_cases(fmt: str, case_seeds, seeds: str, work_root: str, jobs: int = 1, deadline: float | None = None,
              save_to: str | None = None, progress=None) -> dict:
    """Runs the cases `case_seeds` of format `fmt` on `jobs` worker processes. deadline: a
    time.monotonic() after which no new case starts. save_to: a folder where each finding's input
    is written (<fmt>-<seed>.bin/.json; the first of each kind and place only). Returns the
    summary: cases, ok, exceptions by type, findings (with seeds), seconds, cases per second,
    the workers' peak RSS."""
    os.makedirs(work_root, exist_ok=True)
    todo = iter(case_seeds)
    lock = threading.Lock()
    summary = {"cases": 0, "ok": 0, "exceptions": {}, "crashes": [], "hangs": [], "oom": [], "unexpected": [],
               "baseexception": [], "harness": [], "max_rss_mb": 0.0, "max_case_cpu_s": 0.0}
    seen = set()
    t0 = time.monotonic()

    def record(seed: int, out: dict) -> None:
        kind = out["kind"]
        summary["cases"] += 1
        if kind == "ok":
            summary["ok"] += 1
        if kind in ("error", "unexpected", "oom", "baseexception"):
            summary["exceptions"][out["type"]] = summary["exceptions"].get(out["type"], 0) + 1
        summary["max_rss_mb"] = max(summary["max_rss_mb"], out.get("rss_mb", 0.0))
        summary["max_case_cpu_s"] = max(summary["max_case_cpu_s"], round(out.get("cpu_s", 0.0), 3))
        if kind not in FINDINGS:
            return
        key = {"crash": "crashes", "hang": "hangs"}.get(kind, kind)
        entry = {"seed": seed, "plan": list(plan(fmt, seed)), **{k: v for k, v in out.items() if k != "kind"}}
        summary[key].append(entry)
        sig = (kind, out.get("type"), out.get("where"))
        if save_to and sig not in seen and kind != "harness":
            seen.add(sig)
            os.makedirs(save_to, exist_ok=True)
            path = os.path.join(save_to, f"{fmt}-{seed}{extension(fmt)}")
            with open(path, "wb") as f:
                f.write(mutate(fmt, seed, seeds))
            entry["saved"] = path

    def job(i: int) -> None:
        w = Worker(fmt, seeds, work_root, f"{fmt}-worker{i}")
        try:
            while True:
                with lock:
                    if deadline is not None and time.monotonic() > deadline:
                        return
                    seed = next(todo, None)
                if seed is None:
                    return
                out = w.run(seed)
                with lock:
                    record(seed, out)
                    if progress:
                        progress(fmt, summary)
        finally:
            w.stop()

    threads = [threading.Thread(target=job, args=(i,)) for i in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["cases_per_second"] = round(summary["cases"] / max(summary["seconds"], 1e-9), 2)
    summary["exceptions"] = dict(sorted(summary["exceptions"].items(), key=lambda kv: -kv[1]))
    return summary


def findings(summary: dict) -> int:
    return sum(len(summary[k]) for k in ("crashes", "hangs", "oom", "unexpected", "baseexception", "harness"))


def regression_files() -> list[tuple[str, int, str]]:
    """(format, seed, path) of each saved input in tests/fuzz_regressions/."""
    out = []
    if os.path.isdir(REGRESSIONS):
        for name in sorted(os.listdir(REGRESSIONS)):
            stem, ext = os.path.splitext(name)
            fmt, _, seed = stem.rpartition("-")
            if fmt in FORMATS and seed.isdigit() and ext in (".bin", ".json"):
                out.append((fmt, int(seed), os.path.join(REGRESSIONS, name)))
    return out
