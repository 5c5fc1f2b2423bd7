"""CUDA kernels (csrc/kernels/cuda/) against their CPU references, at odd sizes.

Where a device is visible (`_core.cuda_available()`), each kernel runs against the engine's own
CPU code: fm::quant::dequantize + a float product and fm::gemm_ref (GEMV), fm::rmsnorm, fm::rope,
the gating formulas, a double-precision attention (attention_decode_ref) and the greedy Sampler.
Everywhere else these tests still check what needs no GPU: that the built module holds device code
for sm_80 and sm_90, that every entry point raises a clear error (not a crash) without a device,
that bad arguments raise ValueError naming the argument before any device is touched, that the
CPU references agree with numpy, and the GEMV kernel's own per-lane code run on the CPU
(`cuda_gemv_emulated`: the same gemv_lanes.h for each of a warp's 32 lanes) against the reference
for every weight format.

Tolerances (u = 2^-24, f32's unit roundoff):
- GEMV: the dequantized weights are bit-exact with the CPU's (no fused multiply-adds in the
  dequantization), so the only error is the f32 sum of K products: a lane adds its K/32 products
  in runs of 4, then 5 shuffle additions; recursive summation of n terms errs by at most
  n u sum|x_k w_k| (n = K/32 + 12 bounds the additions any product goes through), against a
  double-precision reference.
- RMSNorm: the sum of squares is in double on both sides (only its order differs), so float(ss/d)
  can differ by one rounding at most: 3e-7 relative (< 3 ulp) on each output.
- RoPE and the residual add: each product and sum rounded alone on both sides: bit-exact.
- Gating: expf/tanh-based formulas against double, as the CPU kernels' tests allow them (2e-6
  relative for silu; 1e-5 for gelu_tanh, whose argument 2y is formed in f32).
- Attention: see attention_tolerance.
- Argmax: exact.
"""
import glob
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest

from flashmem import _core
from flashmem.checkpoints.safetensors_io import from_f32

gpu = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device")
U = 2.0 ** -24

FLOAT_FORMATS = ["f32", "f16", "bf16"]
BLOCK_FORMATS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
# byte offsets of each block's f16 scales (d, and m or dmin); every other byte is random
F16_FIELDS = {"q8_0": [0], "q4_0": [0], "q5_0": [0], "q4_1": [0, 2], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2],
              "q6_k": [-2]}


def random_blocks(rng, fmt, n_blocks, scale=0.02):
    """Random block bytes (every bit pattern of quants, 6-bit scales and mins, q6_k's int8 scales)
    with finite f16 scales ~ N(0, scale)."""
    _, nbytes = _core.format_block(fmt)
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[fmt]:
        d = rng.normal(0, scale, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        raw[:, at:at + 2 if at >= 0 else None] = d
    return raw


def gemv_case(fmt, T, N, K, seed, quantized=False):
    """x (T, K), the weights as the kernel takes them, their float values (N, K) and the reference
    y (T, N) in double: fm::quant::dequantize then the product (block formats), fm::gemm_ref (float)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    if fmt in FLOAT_FORMATS:
        w = from_f32(rng.standard_normal((N, K)).astype(np.float32), fmt)
        wf = w.astype(np.float32) if fmt != "bf16" else (w.astype(np.uint32) << 16).view(np.float32)
        ref = _core.gemm(x, w, fmt, reference=True).astype(np.float64)
    else:
        block, _ = _core.format_block(fmt)
        if quantized:  # real weights through the engine's quantizer
            w = _core.quantize(fmt, (rng.standard_normal((N, K)) * 0.05).astype(np.float32))
        else:
            w = random_blocks(rng, fmt, N * K // block).reshape(N, -1)
        wf = _core.dequantize(w.ravel(), fmt).reshape(N, K)
        ref = x.astype(np.float64) @ wf.astype(np.float64).T
    bound = (K / 32 + 12) * U * (np.abs(x).astype(np.float64) @ np.abs(wf).astype(np.float64).T)
    return x, w, ref, bound


def assert_within(got, ref, bound):
    err = np.abs(got.astype(np.float64) - ref)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), f"error {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def attention_case(rng, B, rows, n_heads, n_kv_heads, hd, lengths, dtype):
    q = rng.standard_normal((B, n_heads, hd)).astype(np.float32)
    k = rng.standard_normal((B, rows, n_kv_heads * hd)).astype(dtype)
    v = rng.standard_normal((B, rows, n_kv_heads * hd)).astype(dtype)
    return q, k, v, np.array(lengths, np.int32)


def attention_numpy(q, k, v, lengths, scale):
    B, n_heads, hd = q.shape
    group = n_heads // (k.shape[2] // hd)
    out = np.zeros(q.shape)
    for b in range(B):
        for h in range(n_heads):
            kv = slice((h // group) * hd, (h // group + 1) * hd)
            s = scale * (k[b, :lengths[b], kv].astype(np.float64) @ q[b, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[b, h] = p @ v[b, :lengths[b], kv].astype(np.float64) / p.sum()
    return out


GEMV_SHAPES = [(fmt, K) for fmt in BLOCK_FORMATS for K in ([96, 288] if _core.format_block(fmt)[0] == 32 else [512, 768])]
GEMV_SHAPES += [(fmt, K) for fmt in FLOAT_FORMATS for K in [96, 100, 33, 768]]  # 100, 33: the unvectorized path


# ---- what runs without a GPU ----

@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("fmt,K", GEMV_SHAPES)
def test_gemv_kernel_code_emulated_matches_reference(fmt, K, T):
    """The GEMV kernel's per-lane code (gemv_lanes.h), run for each lane of a warp on the CPU: every
    format's block indexing (pieces, nibbles, q4_k/q5_k scale unpacking, q6_k's ql/qh bits) against
    fm::quant::dequantize, within the bound of an f32 sum."""
    x, w, ref, bound = gemv_case(fmt, T, 37, K, seed=K * 10 + T + len(fmt))
    assert_within(_core.cuda_gemv_emulated(x, w, fmt), ref, bound)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_gemv_kernel_code_emulated_on_quantized_weights(fmt):
    K = 1024
    x, w, ref, bound = gemv_case(fmt, 2, 19, K, seed=3, quantized=True)
    assert_within(_core.cuda_gemv_emulated(x, w, fmt), ref, bound)
    # the bound is not loose: a single weight off by its quantum would exceed it
    assert bound.max() < 1e-3 * np.abs(ref).max()


def test_gemv_emulated_one_token_as_vector():
    x, w, ref, bound = gemv_case("q4_k", 1, 5, 256, seed=1)
    got = _core.cuda_gemv_emulated(x[0], w, "q4_k")
    assert got.shape == (5,)
    assert_within(got[None], ref, bound)


def test_references_match_numpy():
    """The CPU references the GPU tests compare against, against numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 37)).astype(np.float32)
    w = rng.standard_normal(37).astype(np.float32)
    want = w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(_core.rmsnorm_ref(x, w, 1e-5), want, rtol=1e-6)

    T, H, hd = 2, 3, 8
    v = rng.standard_normal((T, H * hd + 3)).astype(np.float32)
    ang = rng.uniform(0, 7, (T, hd // 2))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    got = _core.rope_ref(v, H, hd, cos, sin)
    heads = v[:, :H * hd].reshape(T, H, hd).astype(np.float64)
    x1, x2 = heads[..., :hd // 2], heads[..., hd // 2:]
    c, s = cos[:, None, :], sin[:, None, :]
    want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1).reshape(T, H * hd)
    np.testing.assert_allclose(got[:, :H * hd], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[:, H * hd:], v[:, H * hd:])

    q, k, vv, lengths = attention_case(rng, B=3, rows=20, n_heads=6, n_kv_heads=2, hd=16, lengths=[1, 9, 20],
                                       dtype=np.float32)
    got = _core.attention_decode_ref(q, k, vv, lengths)
    np.testing.assert_allclose(got, attention_numpy(q, k, vv, lengths, 1 / np.sqrt(16)), rtol=1e-5, atol=1e-6)


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for pattern in ["/usr/local/cuda*/bin/cuobjdump", "/opt/cuda*/bin/cuobjdump"]:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def fatbin_archs(path):
    """The sm_XX of the ELF (cubin) entries of a shared object's .nv_fatbin section, read from the
    fatbin headers (the layout cuobjdump reads): each entry's header gives its kind (2: ELF) and
    its architecture."""
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    archs = set()
    for name, _, _, _, offset, size in sections:
        end = data.index(b"\0", names_at + name)
        if data[names_at + name:end] != b".nv_fatbin":
            continue
        at = offset
        while at + 16 <= offset + size:
            magic, _, header, fat_size = struct.unpack_from("<IHHQ", data, at)
            if magic != 0xBA55ED50:
                at += 8  # padding between fat binaries
                continue
            entry, stop = at + header, at + header + fat_size
            while entry < stop:
                kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
                arch, = struct.unpack_from("<I", data, entry + 28)
                if kind == 2:
                    archs.add(f"sm_{arch}")
                entry += entry_header + payload
            at = stop
    return archs


@pytest.mark.skipif(not _core.cuda_built(), reason="built without CUDA")
def test_module_holds_sm80_and_sm90_code():
    """CMAKE_CUDA_ARCHITECTURES 80;90: the module carries a cubin for each (A100; H100/H200), read
    by cuobjdump where it is installed, and from the fatbin headers in any case."""
    so = _core.__file__
    assert {"sm_80", "sm_90"} <= fatbin_archs(so)
    tool = cuobjdump()
    if tool:
        listing = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing


def test_built_flag_is_consistent():
    assert isinstance(_core.cuda_built(), bool)
    if not _core.cuda_built():
        assert not _core.cuda_available()


def valid_calls():
    """One valid call of each CUDA entry point."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q, k, v, lengths = attention_case(rng, B=2, rows=8, n_heads=4, n_kv_heads=2, hd=16, lengths=[3, 8],
                                      dtype=np.float32)
    return {
        "gemv": lambda: _core.cuda_gemv(x, _core.quantize("q4_0", x), "q4_0"),
        "gemv_f16": lambda: _core.cuda_gemv_f16(x[0], x.astype(np.float16).view(np.uint16)),
        "rmsnorm": lambda: _core.cuda_rmsnorm(x, x[0]),
        "add": lambda: _core.cuda_add(x, x),
        "rope": lambda: _core.cuda_rope(x, 2, 32, x[:, :16].copy(), x[:, 16:32].copy()),
        "gated": lambda: _core.cuda_gated(x, x, "gelu_tanh"),
        "attention": lambda: _core.cuda_attention_decode(q, k, v, lengths),
        "argmax": lambda: _core.cuda_argmax(x),
    }


@pytest.mark.skipif(_core.cuda_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("name", ["gemv", "gemv_f16", "rmsnorm", "add", "rope", "gated", "attention", "argmax"])
def test_without_a_device_calls_raise_clearly(name):
    """No device (or no CUDA in the build): a RuntimeError saying so, not a crash or an abort."""
    with pytest.raises(RuntimeError, match="CUDA") as e:
        valid_calls()[name]()
    assert "built without CUDA" in str(e.value) or "no CUDA device" in str(e.value)


def test_bad_arguments_raise_value_error_naming_them():
    """Checked on every build, before any device is touched."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 96)).astype(np.float32)
    x80, x90 = np.ascontiguousarray(x[:, :80]), np.ascontiguousarray(x[:, :90])
    w = _core.quantize("q4_0", rng.standard_normal((5, 96)).astype(np.float32))
    cut = np.ascontiguousarray(w[:, :-1])
    cases = [
        (lambda: _core.cuda_gemv(x80, _core.quantize("q4_0", x[:, :64].copy()), "q4_k"), "K"),
        (lambda: _core.cuda_gemv(np.zeros((9, 96), np.float32), w, "q4_0"), "T"),
        (lambda: _core.cuda_gemv(x, cut, "q4_0"), "w"),
        (lambda: _core.cuda_gemv(x, w, "q3_x"), "format"),
        (lambda: _core.cuda_gemv(x.astype(np.float64), w, "q4_0"), "x"),
        (lambda: _core.cuda_gemv_emulated(x90, w, "q4_0"), "K"),
        (lambda: _core.cuda_rmsnorm(x, x[0, :5].copy()), "w"),
        (lambda: _core.cuda_rmsnorm(x, x[0].copy(), -1.0), "eps"),
        (lambda: _core.cuda_add(x, x[:1].copy()), "y"),
        (lambda: _core.cuda_rope(x, 3, 31, x[:, :15].copy(), x[:, :15].copy()), "head_dim"),
        (lambda: _core.cuda_rope(x, 4, 32, x[:, :16].copy(), x[:, :16].copy()), "n_heads"),
        (lambda: _core.cuda_rope(x, 3, 32, x[:, :15].copy(), x[:, :16].copy()), "cos"),
        (lambda: _core.cuda_rope(x, 3, 32, x[:, :16].copy(), x[:1, :16].copy()), "sin"),
        (lambda: _core.cuda_gated(x, x[:1].copy(), "silu"), "u"),
        (lambda: _core.cuda_gated(x, x, "relu"), "activation"),
        (lambda: _core.cuda_argmax(np.zeros((2, 0), np.float32)), "logits"),
    ]
    q, k, v, lengths = attention_case(rng, B=2, rows=8, n_heads=6, n_kv_heads=2, hd=16, lengths=[3, 8],
                                      dtype=np.float32)
    k4 = np.zeros((2, 8, 64), np.float32)  # 4 KV heads for 6 heads
    cases += [
        (lambda: _core.cuda_attention_decode(q, k4, k4, lengths), "n_kv_heads"),
        (lambda: _core.cuda_attention_decode(q, k, v, np.array([3, 9], np.int32)), "lengths"),
        (lambda: _core.cuda_attention_decode(q, k, v, np.array([0, 8], np.int32)), "lengths"),
        (lambda: _core.cuda_attention_decode(q, k, v, lengths[:1].copy()), "lengths"),
        (lambda: _core.cuda_attention_decode(q, k, v[:, :4].copy(), lengths), "v"),
        (lambda: _core.cuda_attention_decode(q, k.astype(np.float64), v, lengths), "k"),
        (lambda: _core.cuda_attention_decode(q, k, v, lengths, chunk=300), "chunk"),
        (lambda: _core.cuda_attention_decode(q, k, v, lengths, scale=-1.0), "scale"),
        (lambda: _core.cuda_attention_decode(q[:, :, :15].copy(), k, v, lengths), "head_dim"),
        (lambda: _core.attention_decode_ref(q, k, v, np.array([3, 9], np.int32)), "lengths"),
    ]
    big = np.zeros((1, 1, 264), np.float32)
    cases.append((lambda: _core.cuda_attention_decode(big, np.zeros((1, 2, 264), np.float32),
                                                      np.zeros((1, 2, 264), np.float32), np.array([1], np.int32)),
                  "head_dim"))
    for call, name in cases:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()


# ---- on a GPU ----

@gpu
@pytest.mark.parametrize("T", [1, 2, 3, 8])
@pytest.mark.parametrize("fmt,K", GEMV_SHAPES)
def test_gemv_matches_reference(fmt, K, T):
    x, w, ref, bound = gemv_case(fmt, T, 37, K, seed=K * 10 + T + len(fmt))
    got = _core.cuda_gemv(x, w, fmt)
    assert got.shape == (T, 37)
    assert_within(got, ref, bound)


@gpu
@pytest.mark.parametrize("fmt", BLOCK_FORMATS + FLOAT_FORMATS)
def test_gemv_large_and_quantized(fmt):
    """A real-sized row (K = 4096) of the engine's own quantized weights, many rows (N = 1027: a
    partial last block of warps)."""
    x, w, ref, bound = gemv_case(fmt, 4, 1027, 4096, seed=7, quantized=True)
    assert_within(_core.cuda_gemv(x, w, fmt), ref, bound)


@gpu
@pytest.mark.parametrize("N,K", [(7, 40), (33, 769), (576, 576)])
def test_gemv_f16_matches_reference(N, K):
    """The first CUDA kernel's entry point (formerly tests/test_kernels.py), now gemv over f16."""
    rng = np.random.default_rng(N + K)
    x = rng.standard_normal(K).astype(np.float32)
    w = from_f32(rng.standard_normal((N, K)).astype(np.float32), "f16")
    ref = _core.gemm(x[None], w, "f16", reference=True)[0]
    np.testing.assert_allclose(_core.cuda_gemv_f16(x, w.view(np.uint16)), ref, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@gpu
@pytest.mark.parametrize("d", [1, 7, 96, 576, 4097])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_matches_cpu(d, eps):
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((5, d)) * rng.choice([1e-3, 1, 50], (5, 1))).astype(np.float32)
    x[1] = 0  # a zero row: 1 / sqrt(eps)
    w = rng.standard_normal(d).astype(np.float32)
    np.testing.assert_allclose(_core.cuda_rmsnorm(x, w, eps), _core.rmsnorm_ref(x, w, eps), rtol=3e-7, atol=0)


@gpu
@pytest.mark.parametrize("n", [1, 7, 4097, 1 << 20])
def test_add_is_exact(n):
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal((2, n)).astype(np.float32)
    np.testing.assert_array_equal(_core.cuda_add(x, y), x + y)


@gpu
@pytest.mark.parametrize("T,n_heads,hd,extra", [(1, 1, 2, 0), (3, 5, 64, 7), (4, 7, 128, 0), (2, 3, 96, 1),
                                                (9, 2, 256, 0)])
def test_rope_bit_exact_with_cpu(T, n_heads, hd, extra):
    """Rows wider than the heads (q's rows hold n_heads heads, more may follow): only the heads move."""
    rng = np.random.default_rng(T * n_heads + hd)
    v = rng.standard_normal((T, n_heads * hd + extra)).astype(np.float32)
    inv = 10000.0 ** (-np.arange(hd // 2) / (hd // 2))
    ang = (rng.integers(0, 5000, (T, 1)) * inv).astype(np.float32)
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    got = _core.cuda_rope(v, n_heads, hd, cos, sin)
    np.testing.assert_array_equal(got, _core.rope_ref(v, n_heads, hd, cos, sin))
    np.testing.assert_array_equal(got[:, n_heads * hd:], v[:, n_heads * hd:])


def reference_gating(g, activation):
    """silu(g) = g / (1 + e^-g); gelu_tanh(g) = 0.5 g (1 + tanh(y)) = g / (1 + e^-2y), in double."""
    if activation == "silu":
        return g / (1 + np.exp(-g))
    return g / (1 + np.exp(-2 * 0.7978845608028654 * (g + 0.044715 * g ** 3)))


@gpu
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("n", [1, 7, 1537, 100003])
def test_gated_matches_reference(n, activation):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * rng.choice([0.01, 1, 5, 40, 200], n)).astype(np.float32)
    g[: min(n, 3)] = [0.0, -0.0, 1e-30][: min(n, 3)]
    u = rng.standard_normal(n).astype(np.float32)
    got = _core.cuda_gated(g, u, activation)
    with np.errstate(over="ignore"):
        ref = reference_gating(g.astype(np.float64), activation) * u
    np.testing.assert_allclose(got, ref, rtol=2e-6 if activation == "silu" else 1e-5, atol=1e-30)
    # and the CPU kernel table's gating, to the same closeness
    np.testing.assert_allclose(got, _core.gated(g, u, activation), rtol=4e-6 if activation == "silu" else 2e-5,
                               atol=1e-30)


def attention_tolerance(q, k, v, lengths, scale, chunk):
    """Per sequence: a score's f32 dot product errs by at most (hd/32 + 6) u sum|q_d k_d| (a lane's
    hd/32 products, then 5 shuffle additions); an error of at most e in the log-weights moves the
    softmax average by at most 2 e max|v|; the f32 weighted sums (a chunk's positions, then its
    chunks) and the expf add (chunk + chunks + 16) rounding errors of at most max|v| each, counted
    four times over."""
    B, n_heads, hd = q.shape
    group = n_heads // (k.shape[2] // hd)
    tol = np.zeros(B)
    for b in range(B):
        n = lengths[b]
        kk = np.abs(k[b, :n].astype(np.float64)).reshape(n, -1, hd)
        dots = np.einsum("hd,nhd->nh", np.abs(q[b]).astype(np.float64), np.repeat(kk, group, axis=1))
        ds = scale * (hd / 32 + 6) * U * dots.max()
        vmax = np.abs(v[b, :n].astype(np.float64)).max()
        tol[b] = vmax * (2 * 2 * ds + 4 * (chunk + -(-n // chunk) + 16) * U)
    return tol[:, None, None]


ATTENTION_CASES = [  # n_heads, n_kv_heads, head_dim
    (7, 7, 64), (6, 2, 128), (5, 1, 96), (9, 3, 256), (3, 1, 40), (4, 4, 32),
]


@gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("chunk", [0, 64, 100])
@pytest.mark.parametrize("n_heads,n_kv_heads,hd", ATTENTION_CASES)
def test_attention_decode_matches_reference(n_heads, n_kv_heads, hd, chunk, dtype):
    """Sequences of 1, 7, 300 and 1025 positions in one call: one chunk, a partial one, several
    with a partial last, and one position past a multiple of every chunk size; odd head counts,
    groups of 1 to 5 heads per KV head, f32 and f16 caches."""
    rng = np.random.default_rng(n_heads * 100 + hd + chunk)
    lengths = [1, 7, 300, 1025]
    q, k, v, lens = attention_case(rng, 4, 1030, n_heads, n_kv_heads, hd, lengths, dtype)
    q *= 2  # sharper softmaxes than unit scores
    scale = 1 / np.sqrt(hd)
    got = _core.cuda_attention_decode(q, k, v, lens, chunk=chunk)
    ref = _core.attention_decode_ref(q, k, v, lens)
    tol = attention_tolerance(q, k, v, lens, scale, chunk or 256)
    assert np.all(np.abs(got - ref) <= tol), np.abs(got - ref).max(axis=(1, 2))
    # the positions past a sequence's length are not read
    k2, v2 = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        k2[b, n:] = np.nan
        v2[b, n:] = np.nan
    np.testing.assert_array_equal(_core.cuda_attention_decode(q, k2, v2, lens, chunk=chunk), got)


@gpu
def test_attention_decode_scale_and_one_hot():
    """An explicit scale; a score far above the others: the output is that position's value."""
    rng = np.random.default_rng(5)
    q, k, v, lens = attention_case(rng, 1, 600, 2, 1, 64, [600], np.float32)
    k[0, 517] = q[0, 0] * 50
    got = _core.cuda_attention_decode(q, k, v, lens, scale=0.5)
    np.testing.assert_allclose(got, _core.attention_decode_ref(q, k, v, lens, scale=0.5), atol=1e-5)
    np.testing.assert_allclose(got[0, 0], v[0, 517], atol=1e-5)


@gpu
@pytest.mark.parametrize("vocab", [1, 7, 1000, 151936])
def test_argmax_is_the_greedy_samplers_choice(vocab):
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((8, vocab)).astype(np.float32)
    if vocab >= 7:
        logits[1, [3, vocab - 1]] = 9.0          # equal largest: the first
        logits[2, 0] = np.nan                    # a NaN first: max_element keeps it
        logits[3, 2] = np.nan                    # a NaN later: skipped
        logits[3, 5] = 50.0
        logits[4] = -np.inf                      # all -inf: the first
        logits[5] = 0.0
        logits[5, 4] = -0.0                      # +0 and -0 equal: the first
        logits[6, :] = np.nan                    # all NaN: 0
        logits[7, vocab - 1] = np.inf
    got = _core.cuda_argmax(logits)
    want = [_core.Sampler(temperature=0.0).sample(np.ascontiguousarray(row)) for row in logits]
    np.testing.assert_array_equal(got, want)
