"""Quantization to the block formats (csrc/kernels/quant/quantize.cpp): bytes equal to gguf-py's
quantizer for the 32-weight formats, equal to ggml's own reference quantizers (libggml through
llama-cpp-python, where installed) for every format, including what llama.cpp's model quantizer
writes for a tiny llama GGUF, and a round trip through dequantize within each format's error."""
from __future__ import annotations

import ctypes
import os
import warnings

import gguf
import numpy as np
import pytest
from gguf import quants

from flashmem import _core

T = gguf.GGMLQuantizationType
TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_k": T.Q4_K,
         "q5_k": T.Q5_K, "q6_k": T.Q6_K}
SMALL = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]  # gguf-py quantizes these
K_FORMATS = ["q4_k", "q5_k", "q6_k"]


def block_size(fmt):
    return gguf.GGML_QUANT_SIZES[TYPES[fmt]]  # (weights, bytes) per block


def hard_rows(rng, rows, cols):
    """Random rows of various scales, with the cases a quantizer can get wrong: all zeros, a huge
    outlier, tiny (1e-30) and subnormal values, one sign only, constants, integers (ties), sparse
    rows, values past f16's range."""
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 10, (rows, 1))).astype(np.float32)
    special = [
        np.zeros(cols),
        np.where(np.arange(cols) == cols // 3, 1e4, rng.standard_normal(cols) * 0.01),
        rng.standard_normal(cols) * 1e-30,
        -np.abs(rng.standard_normal(cols)),
        np.abs(rng.standard_normal(cols)) + 0.5,
        np.full(cols, 0.75),
        rng.integers(-8, 9, cols),
        np.where(rng.random(cols) < 0.8, 0, rng.standard_normal(cols)),
        rng.standard_normal(cols) * 1e-40,
        rng.uniform(-1e5, 1e5, cols),
        rng.standard_t(1.5, cols),
    ]
    for i, row in enumerate(special[:rows]):
        x[i] = row
    return x.astype(np.float32)


def assert_bytes_equal(got, want, fmt):
    assert got.dtype == np.uint8 and got.shape == want.shape, (got.shape, want.shape)
    bad = [i for i in range(got.shape[0]) if not np.array_equal(got[i], want[i])]
    if bad:
        blk_bytes = block_size(fmt)[1]
        i = bad[0]
        b = int(np.flatnonzero(got[i] != want[i])[0]) // blk_bytes
        raise AssertionError(f"{fmt}: rows {bad} differ; row {i} first in block {b}:\n"
                             f"got  {got[i, b * blk_bytes:(b + 1) * blk_bytes]}\n"
                             f"want {want[i, b * blk_bytes:(b + 1) * blk_bytes]}")


@pytest.mark.parametrize("fmt", SMALL)
@pytest.mark.parametrize("shape", [(1, 32), (3, 96), (7, 800), (12, 1024)])
def test_bit_exact_with_gguf_py(fmt, shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1] + len(fmt))
    x = hard_rows(rng, *shape)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # gguf-py divides by subnormals
        warnings.simplefilter("ignore")
        want = quants.quantize(x, TYPES[fmt])
    assert_bytes_equal(_core.quantize(fmt, x), want, fmt)


def test_round_trip_error():
    """Dequantized, each block is within the format's step of the original, relative to the
    block's largest magnitude; the formats rank as their bits do; zero blocks stay zero."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((16, 2048)) * rng.uniform(1e-3, 10, (16, 1))).astype(np.float32)
    x[3, 5] *= 100  # an outlier
    x[4] = -np.abs(x[4])
    x[5, :256] = 0
    # the worst error of a block relative to its largest magnitude: half a step (1/127, 2/15,
    # 2/31) and the f16 scales' rounding; q4_0 and q5_0 clamp the side opposite the largest
    # value at 7/8 or 15/16 of it; the K formats' 6-bit sub-block scales and mins, observed 0.076,
    # 0.046 and 0.016
    bound = {"q8_0": 0.005, "q4_0": 0.13, "q4_1": 0.07, "q5_0": 0.066, "q5_1": 0.035, "q4_k": 0.1,
             "q5_k": 0.06, "q6_k": 0.025}
    rms = {}
    for fmt, tol in bound.items():
        blk, _ = block_size(fmt)
        raw = _core.quantize(fmt, x)
        assert raw.shape == (16, 2048 // blk * block_size(fmt)[1])
        y = _core.dequantize(raw.ravel(), fmt).reshape(x.shape)
        err = np.abs(y - x).reshape(-1, blk).max(1)
        amax = np.abs(x).reshape(-1, blk).max(1)
        worst = (err / np.where(amax > 0, amax, 1)).max()
        assert worst <= tol, f"{fmt}: worst block error {worst:.4f} of its max > {tol}"
        assert np.all(y[5, :256] == 0)
        rms[fmt] = np.sqrt(np.mean(((y - x) / np.abs(x).max(1, keepdims=True)) ** 2))
    assert rms["q8_0"] < rms["q6_k"] < rms["q5_k"] < rms["q4_k"]
    assert rms["q5_1"] < rms["q4_1"] and rms["q5_0"] < rms["q4_0"]


def test_threads_and_empty():
    x = hard_rows(np.random.default_rng(3), 65, 512)  # 130 K blocks: 2 threads of 64 or more
    for fmt in TYPES:
        np.testing.assert_array_equal(_core.quantize(fmt, x, threads=3), _core.quantize(fmt, x))
        blk, nbytes = block_size(fmt)
        assert _core.quantize(fmt, np.zeros((0, 512), np.float32)).shape == (0, 512 // blk * nbytes)
    # a read-only view of whole rows is fine
    ro = x[2:5]
    ro.flags.writeable = False
    np.testing.assert_array_equal(_core.quantize("q4_k", ro), _core.quantize("q4_k", x)[2:5])


def test_bad_inputs():
    x = np.zeros((2, 256), np.float32)
    with pytest.raises(ValueError, match="unknown weight format 'q3_x'"):
        _core.quantize("q3_x", x)
    with pytest.raises(ValueError, match="f16 is not a block format"):
        _core.quantize("f16", x)
    with pytest.raises(ValueError, match="2-D"):
        _core.quantize("q8_0", x.ravel())
    with pytest.raises(ValueError, match="2-D"):
        _core.quantize("q8_0", x.reshape(2, 2, 128))
    with pytest.raises(ValueError, match="float32, got float64"):
        _core.quantize("q8_0", x.astype(np.float64))
    with pytest.raises(ValueError, match="float32, got float16"):
        _core.quantize("q8_0", x.astype(np.float16))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.quantize("q8_0", np.zeros((4, 256), np.float32)[::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.quantize("q8_0", np.zeros((256, 2), np.float32).T)
    with pytest.raises(ValueError, match=r"row of 96 weights is not a whole number of q4_k blocks \(256 weights"):
        _core.quantize("q4_k", np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match=r"row of 40 weights is not a whole number of q8_0 blocks \(32 weights"):
        _core.quantize("Q8_0", np.zeros((2, 40), np.float32))
    with pytest.raises(ValueError, match="threads"):
        _core.quantize("q8_0", x, threads=0)


# ---- against ggml itself (llama-cpp-python's libggml; not installed in CI)

@pytest.fixture(scope="module")
def ggml_quantize():
    """ggml_quantize_chunk from llama-cpp-python's libggml-base: what llama.cpp's quantizer runs
    for each tensor (the _ref quantizers, without an importance matrix)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    fn = ctypes.CDLL(path).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]

    def quantize(fmt, x):
        x = np.ascontiguousarray(x, np.float32)
        blk, nbytes = block_size(fmt)
        out = np.zeros((x.shape[0], x.shape[1] // blk * nbytes), np.uint8)
        assert fn(int(TYPES[fmt]), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None) == out.size
        return out

    return quantize


@pytest.mark.parametrize("fmt", TYPES)
def test_bit_exact_with_ggml(fmt, ggml_quantize):
    rng = np.random.default_rng(len(fmt) + 11)
    x = np.concatenate([hard_rows(rng, 16, 1280),
                        (rng.standard_normal((24, 1280)) * 0.02).astype(np.float32),  # weight-like
                        (rng.uniform(-1, 1, (8, 1280)) ** 7).astype(np.float32),  # peaked
                        (np.round(rng.standard_normal((8, 1280)) * 4) / 4).astype(np.float32),  # ties
                        rng.lognormal(0, 2, (8, 1280)).astype(np.float32)])  # positive, heavy-tailed
    x[-1, 17], x[-2, 300], x[-3, 1000] = np.nan, np.inf, -np.inf  # even these as ggml does
    assert_bytes_equal(_core.quantize(fmt, x), ggml_quantize(fmt, x), fmt)


# ---- against llama.cpp's model quantizer (llama_model_quantize) on a tiny llama GGUF

TINY = dict(d_model=512, d_ff=768, layers=2, heads=8, kv_heads=4, vocab=256)
# llama.cpp file types whose tensors cover the formats (mostly the type named; Q4_K_S writes attn_v
# in q5_k, and all but Q8_0 write output in q6_k)
FTYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_S", "Q5_K_S", "Q6_K"]


def cache_dir():
    d = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashmem", "test_quantize")
    os.makedirs(d, exist_ok=True)
    return d


def write_tiny_f32_gguf(path):
    """A random-weight llama model (all widths multiples of 256) as an F32 GGUF."""
    if os.path.isfile(path):
        return path
    c = TINY
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path + ".part", "llama")
    w.add_context_length(256)
    w.add_embedding_length(c["d_model"])
    w.add_block_count(c["layers"])
    w.add_feed_forward_length(c["d_ff"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(c["d_model"] // c["heads"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    from flashmem.checkpoints.gguf_file import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    w.add_token_list(chars[:c["vocab"]])
    w.add_token_types([1] * c["vocab"])
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def mat(rows, cols):
        x = rng.standard_normal((rows, cols)) * rng.uniform(0.005, 0.1, (rows, 1))
        x[rng.integers(0, rows, 4), rng.integers(0, cols, 4)] *= 30  # a few outliers
        x[rng.integers(0, rows)] = 0  # and a zero row
        return x.astype(np.float32)

    D, F, kv = c["d_model"], c["d_ff"], c["d_model"] // c["heads"] * c["kv_heads"]
    w.add_tensor("token_embd.weight", mat(c["vocab"], D))
    for i in range(c["layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(D, D))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(kv, D))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(kv, D))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(D, D))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(D, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(F, D))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(F, D))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(D, F))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", mat(c["vocab"], D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(path + ".part", path)
    return path


@pytest.fixture(scope="module")
def tiny_f32():
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_tiny_f32_gguf(os.path.join(cache_dir(), "tiny-llama-512.F32.gguf"))
    return llama_cpp, path


def test_bit_exact_with_llama_model_quantize(tiny_f32):
    llama_cpp, src = tiny_f32
    f32 = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(src).tensors}
    seen = set()
    for ftype in FTYPES:
        dst = os.path.join(cache_dir(), f"tiny-llama-512.{ftype}.llama-cpp-{llama_cpp.__version__}.gguf")
        if not os.path.isfile(dst):
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(src.encode(), (dst + ".part").encode(), ctypes.byref(params))
            assert rc == 0, f"llama_model_quantize {ftype} failed ({rc})"
            os.replace(dst + ".part", dst)
        for t in gguf.GGUFReader(dst).tensors:
            fmt = t.tensor_type.name.lower()
            if fmt not in TYPES:
                continue
            x = f32[t.name]
            assert x.dtype == np.float32 and x.ndim == 2
            assert_bytes_equal(_core.quantize(fmt, x, threads=2), np.asarray(t.data).reshape(x.shape[0], -1), fmt)
            seen.add(fmt)
    assert seen == set(TYPES), f"no tensor of {set(TYPES) - seen} in llama.cpp's files"
