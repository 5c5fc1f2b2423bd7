"""Block formats (csrc/kernels/quant/): dequantization bit-exact with gguf-py's (ggml's) for
every format, activation quantization equal to its scalar reference, and the integer matmul
kernels against the scalar reference at odd sizes, including weights of extreme values."""
import gguf
import numpy as np
import pytest
from gguf import quants

from flashmem import _core

ISAS = _core.quant_isas()  # the block-format kernel tables this CPU runs: avx2, and avx512 (VNNI) where present
TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
         "q4_1": gguf.GGMLQuantizationType.Q4_1, "q5_0": gguf.GGMLQuantizationType.Q5_0,
         "q5_1": gguf.GGMLQuantizationType.Q5_1, "q4_k": gguf.GGMLQuantizationType.Q4_K,
         "q5_k": gguf.GGMLQuantizationType.Q5_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}
# byte ranges of each block's f16 scales (d, and m or dmin); every other byte is random
F16_FIELDS = {"q8_0": [0], "q4_0": [0], "q5_0": [0], "q4_1": [0, 2], "q5_1": [0, 2], "q4_k": [0, 2], "q5_k": [0, 2],
              "q6_k": [-2]}


def block_size(fmt):
    return gguf.GGML_QUANT_SIZES[TYPES[fmt]]  # (weights, bytes) per block


def random_blocks(rng, fmt, n_blocks, extreme=False, scale=0.02):
    """Random block bytes with finite f16 scales ~ N(0, scale) (extreme: every quant byte 0x00 or 0xFF)."""
    _, nbytes = block_size(fmt)
    raw = rng.choice([0, 255], (n_blocks, nbytes)).astype(np.uint8) if extreme else \
        rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[fmt]:
        d = rng.normal(0, scale, n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        raw[:, at:at + 2 if at >= 0 else None] = d
    return raw


@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("extreme", [False, True])
def test_dequantize_bit_exact_with_gguf(fmt, extreme):
    rng = np.random.default_rng(len(fmt) * 10 + extreme)
    raw = random_blocks(rng, fmt, 41, extreme)
    want = quants.dequantize(raw.ravel(), TYPES[fmt]).ravel()
    got = _core.dequantize(raw.ravel(), fmt)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("K", [32, 96, 576, 1568])
def test_quantize_act_matches_reference(K, bits, isa):
    rng = np.random.default_rng(K)
    x = (rng.standard_normal((4, K)) * rng.uniform(0.01, 100, (4, 1))).astype(np.float32)
    x[1] = 0  # an all-zero block: scale 0
    x[2, :32] = 1e-30
    got, ref = _core.quantize_act(x, bits=bits, isa=isa), _core.quantize_act(x, reference=True, bits=bits)
    np.testing.assert_array_equal(got, ref)
    qtype, qmax = (np.int8, 127) if bits == 8 else (np.int16, 32767)
    blocks = got.reshape(4, K // 32, 8 + 32 * bits // 8)
    d = blocks[:, :, :4].copy().view(np.float32)[..., 0]
    s = blocks[:, :, 4:8].copy().view(np.float32)[..., 0]
    q = blocks[:, :, 8:].copy().view(qtype).astype(np.float32)
    np.testing.assert_allclose((d[..., None] * q).reshape(4, K), x, atol=np.abs(x).max() / qmax * 0.51)
    np.testing.assert_allclose(s, d * q.sum(-1), rtol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("T,K,N", [(1, 256, 1), (1, 768, 37), (3, 512, 9), (5, 2304, 17), (2, 1280, 64), (9, 768, 11)])
def test_quant_matmul_matches_reference(fmt, T, K, N, bits, isa):
    blk, _ = block_size(fmt)
    rng = np.random.default_rng(T * 31 + K + N + len(fmt))
    w = random_blocks(rng, fmt, N * K // blk, extreme=N % 2 == 1).reshape(N, -1)
    x = rng.standard_normal((T, K)).astype(np.float32)
    act = _core.quantize_act(x, bits=bits)
    got = _core.quant_matmul(act, w, fmt, K, bits=bits, isa=isa)
    ref = _core.quant_matmul(act, w, fmt, K, reference=True, bits=bits)
    scale = np.abs(quants.dequantize(w.ravel(), TYPES[fmt])).max() * np.abs(x).max() * np.sqrt(K)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)
    # and against the float product, within what 8-bit (or 16-bit) activations allow
    wf = quants.dequantize(w.ravel(), TYPES[fmt]).reshape(N, K)
    np.testing.assert_allclose(got, x @ wf.T, atol=(0.02 if bits == 8 else 2e-4) * scale)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("fmt", TYPES)
def test_several_tokens_equal_one_at_a_time(fmt, bits):
    """Tokens multiplied together (a batch of sequences: tiles of rows x tokens) give exactly what
    each gives alone (the one-token path), so a sequence decodes the same in a batch or alone; and
    every ISA's kernels give the same bits (their integer sums are exact)."""
    blk, _ = block_size(fmt)
    rng = np.random.default_rng(len(fmt) + bits)
    K, N, T = 768, 13, 11
    w = random_blocks(rng, fmt, N * K // blk, extreme=True).reshape(N, -1)
    act = _core.quantize_act(rng.standard_normal((T, K)).astype(np.float32), bits=bits)
    together = _core.quant_matmul(act, w, fmt, K, bits=bits)
    for t in range(T):
        np.testing.assert_array_equal(together[t], _core.quant_matmul(act[t:t + 1], w, fmt, K, bits=bits)[0])
    for isa in ISAS:
        np.testing.assert_array_equal(together, _core.quant_matmul(act, w, fmt, K, bits=bits, isa=isa))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,bits", [("q4_0", 8), ("q4_1", 8), ("q8_0", 16)])
@pytest.mark.parametrize("T,K,N", [(1, 256, 8), (2, 64, 8), (3, 768, 24), (4, 1536, 16), (9, 96, 40), (8, 576, 56)])
def test_interleaved_rows_match_reference(fmt, bits, T, K, N, isa):
    """A layer's q4_0/q4_1 matrices (8-bit activations) and a q8_0 LM head (16-bit ones) are held
    with 8 rows interleaved (repack_x8) for the kernels whose float lanes are rows (AVX-512: two
    groups of 8 at a time, and one alone where N / 8 is odd): against the reference on the
    original rows, several tokens bit-identical to one at a time and to the other ISAs, and each
    row recoverable as it was (row_from_x8, what an embedding lookup reads)."""
    blk, _ = block_size(fmt)
    rng = np.random.default_rng(T + K + N)
    w = random_blocks(rng, fmt, N * K // blk, extreme=T == 3).reshape(N, -1)
    packed = _core.repack_x8(w, fmt, K)
    assert packed.shape == w.shape and not np.array_equal(packed, w)
    for r in range(N):
        np.testing.assert_array_equal(_core.row_from_x8(packed, fmt, K, r), w[r])
    x = rng.standard_normal((T, K)).astype(np.float32)
    x[0, :32] *= 40  # activations of very different scales per block
    act = _core.quantize_act(x, bits=bits)
    got = _core.quant_matmul(act, packed, fmt, K, bits=bits, interleaved=True, isa=isa)
    ref = _core.quant_matmul(act, w, fmt, K, bits=bits, reference=True)
    scale = np.abs(quants.dequantize(w.ravel(), TYPES[fmt])).max() * np.abs(x).max() * np.sqrt(K)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)
    for t in range(T):
        alone = _core.quant_matmul(act[t:t + 1], packed, fmt, K, bits=bits, interleaved=True, isa=isa)
        np.testing.assert_array_equal(got[t], alone[0])
    for other in ISAS:
        np.testing.assert_array_equal(got, _core.quant_matmul(act, packed, fmt, K, bits=bits, interleaved=True,
                                                              isa=other))
    with pytest.raises(ValueError, match="multiple of 8"):
        _core.repack_x8(w[:N - 1], fmt, K)
    with pytest.raises(ValueError, match="row 99999 out of range"):
        _core.row_from_x8(packed, fmt, K, 99999)


def test_interleaved_kernel_takes_only_its_pairs():
    """matmul_x8 pairs q4_0/q4_1 with 8-bit activations and the q8_0 one with 16-bit ones; any other
    pairing (or a format repack_x8 does not take) is refused with the reason."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q8 = _core.repack_x8(random_blocks(rng, "q8_0", 16).reshape(8, -1), "q8_0", 64)
    with pytest.raises(ValueError, match="q8_0 matrix with 16-bit"):
        _core.quant_matmul(_core.quantize_act(x), q8, "q8_0", 64, interleaved=True)
    q4 = _core.repack_x8(random_blocks(rng, "q4_1", 16).reshape(8, -1), "q4_1", 64)
    with pytest.raises(ValueError, match="q4_0 or q4_1 matrix with 8-bit"):
        _core.quant_matmul(_core.quantize_act(x, bits=16), q4, "q4_1", 64, bits=16, interleaved=True)
    with pytest.raises(ValueError, match="q4_0, q4_1 or q8_0 matrix"):
        _core.repack_x8(random_blocks(rng, "q5_0", 16).reshape(8, -1), "q5_0", 64)
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        _core.quant_matmul(_core.quantize_act(x), q4, "q4_1", 64, interleaved=True, isa="sse9")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", TYPES)
@pytest.mark.parametrize("K,n", [(256, 1), (768, 7), (512, 13)])
def test_bundle_kernels_match_reference(fmt, K, n, isa):
    """The neuron-bundle kernels (rows given as pointers, a piece at a byte offset inside each row):
    dot products for gate and up, and the down columns' weighted sum, against their references."""
    blk, nbytes = block_size(fmt)
    rng = np.random.default_rng(K + n + len(fmt))
    offset = 3 * nbytes  # the piece starts mid-row, at an unaligned byte
    piece = K // blk * nbytes
    w = np.concatenate([rng.integers(0, 256, (20, offset), dtype=np.uint8),
                        random_blocks(rng, fmt, 20 * K // blk, extreme=n == 7).reshape(20, -1),
                        rng.integers(0, 256, (20, 5), dtype=np.uint8)], axis=1)
    rows = rng.integers(0, 20, n).astype(np.int64)  # any order, repeats allowed
    x = rng.standard_normal((1, K)).astype(np.float32)
    act = _core.quantize_act(x)
    got = _core.quant_dot_ptrs(act, w, fmt, K, offset, rows, isa=isa)
    ref = _core.quant_dot_ptrs(act, w, fmt, K, offset, rows, reference=True)
    wf = quants.dequantize(np.ascontiguousarray(w[:, offset:offset + piece]), TYPES[fmt]).reshape(20, K)
    scale = np.abs(wf).max() * np.abs(x).max() * np.sqrt(K)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(got, wf[rows] @ x[0], atol=0.02 * scale)
    y0 = rng.standard_normal(K).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    c[0] = 0.0  # a neuron that contributes nothing
    got = _core.quant_axpy_ptrs(y0, c, w, fmt, offset, rows, isa=isa)
    ref = _core.quant_axpy_ptrs(y0, c, w, fmt, offset, rows, reference=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * (np.abs(wf).max() * np.abs(c).sum() + 1))
    np.testing.assert_allclose(ref, y0 + c @ wf[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("d,ff,n", [(32, 32, 1), (96, 64, 7), (576, 160, 13), (160, 96, 40)])
def test_split_down_columns_are_the_stored_weights(fmt, d, ff, n, isa):
    """Split down columns (BundleFormat::down_split): the converter's split of a down matrix as a
    GGUF stores it (d rows of ff/32 blocks), then the kernel's weighted sum of some columns, each
    with its group's scales, equals c @ (the matrix gguf-py dequantizes).T[columns], and the scalar
    reference; extreme quants (every nibble 0 or 15) included."""
    from flashmem.checkpoints.convert import split_down, split_quant_bytes

    blk, nbytes = block_size(fmt)
    rng = np.random.default_rng(d + ff + n + len(fmt))
    raw = random_blocks(rng, fmt, d * ff // blk, extreme=n == 7).reshape(d, -1)
    dense = quants.dequantize(raw, TYPES[fmt]).reshape(d, ff).astype(np.float32)
    cols, scales = split_down(raw, fmt, d, ff)
    assert cols.shape == (ff, split_quant_bytes(fmt + ":split", d)) and scales.dtype == np.float16
    offset = 5  # the piece starts mid-row, at an unaligned byte
    w = np.concatenate([rng.integers(0, 256, (ff, offset), dtype=np.uint8), cols,
                        rng.integers(0, 256, (ff, 3), dtype=np.uint8)], axis=1)
    rows = rng.integers(0, ff, n).astype(np.int64)  # any order, repeats allowed
    y0 = rng.standard_normal(d).astype(np.float32)
    c = rng.standard_normal(n).astype(np.float32)
    c[0] = 0.0  # a neuron this token does not use
    groups = rows // 32
    got = _core.quant_axpy_split(y0, c, w, fmt, offset, rows, scales.view(np.uint16), groups, isa=isa)
    ref = _core.quant_axpy_split(y0, c, w, fmt, offset, rows, scales.view(np.uint16), groups, reference=True)
    want = y0 + (c.astype(np.float64) @ dense.T[rows].astype(np.float64))
    scale = np.abs(dense).max() * np.abs(c).sum() + 1
    np.testing.assert_allclose(ref, want, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="q5_0 has no split down columns"):
        _core.quant_axpy_split(y0, c, w, "q5_0", offset, rows, scales.view(np.uint16), groups)
    with pytest.raises(ValueError, match="out of range"):
        _core.quant_axpy_split(y0, c, w, fmt, offset, rows, scales.view(np.uint16), groups + ff)


def test_bad_block_inputs():
    with pytest.raises(ValueError, match="unknown weight format 'q3_x'"):
        _core.dequantize(np.zeros(18, np.uint8), "q3_x")
    with pytest.raises(ValueError, match="not whole q4_0 blocks"):
        _core.dequantize(np.zeros(19, np.uint8), "q4_0")
    with pytest.raises(ValueError, match="not a block format"):
        _core.dequantize(np.zeros(8, np.uint8), "f16")
    with pytest.raises(ValueError, match="not a whole number of q4_k blocks"):
        _core.quant_matmul(np.zeros((1, 40 * 10), np.uint8), np.zeros((2, 144), np.uint8), "q4_k", 320)
    with pytest.raises(ValueError, match="row 5 out of range"):
        _core.quant_dot_ptrs(np.zeros((1, 40), np.uint8), np.zeros((2, 40), np.uint8), "q8_0", 32, 0,
                             np.array([5], np.int64))
    with pytest.raises(ValueError, match="passes the rows' 40 bytes"):
        _core.quant_axpy_ptrs(np.zeros(32, np.float32), np.ones(1, np.float32), np.zeros((2, 40), np.uint8), "q8_0",
                              10, np.array([0], np.int64))
