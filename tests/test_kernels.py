"""SIMD kernels against their scalar references (csrc/kernels/cpu/reference.cpp), odd sizes,
every dtype, both instruction sets this CPU has."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from flashmem import _core
from flashmem.checkpoints.safetensors_io import from_f32, to_f32

SIZES = [(1, 40, 7), (1, 576, 64), (2, 17, 9), (3, 769, 33), (5, 72, 40), (128, 576, 100), (7, 1, 1)]
ISAS = ["best", "avx2"]


def weights(rng, n, k, dtype):
    return from_f32(rng.standard_normal((n, k)).astype(np.float32), dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T,K,N", SIZES)
def test_gemm_matches_reference(T, K, N, dtype, isa):
    rng = np.random.default_rng(T * 1000 + K + N)
    x = rng.standard_normal((T, K)).astype(np.float32)
    w = weights(rng, N, K, dtype)
    ref = _core.gemm(x, w, dtype, reference=True)
    got = _core.gemm(x, w, dtype, isa=isa)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(K))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("T,D,NB", SIZES)
def test_accumulate_matches_reference(T, D, NB, dtype, isa):
    rng = np.random.default_rng(T * 7 + D * 3 + NB)
    y0 = rng.standard_normal((T, D)).astype(np.float32)
    a = rng.standard_normal((T, NB)).astype(np.float32)
    b = weights(rng, NB, D, dtype)
    ref = _core.accumulate(y0, a, b, dtype, reference=True)
    got = _core.accumulate(y0, a, b, dtype, isa=isa)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(NB))


def test_reference_matches_numpy():
    """The scalar reference itself against numpy, so the chain ends at an independent result."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 19)).astype(np.float32)
    w = rng.standard_normal((11, 19)).astype(np.float32)
    np.testing.assert_allclose(_core.gemm(x, w, "f32", reference=True), x @ w.T, rtol=1e-5, atol=1e-5)
    wb = from_f32(w, "bf16")
    w_back = (wb.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(_core.gemm(x, wb, "bf16", reference=True), x @ w_back.T, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_wrong_shapes():
    x = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="K"):
        _core.gemm(x, np.zeros((3, 6), np.float32), "f32")
    with pytest.raises(ValueError, match="dtype"):
        _core.gemm(x, np.zeros((3, 5), np.float32), "q3")
    with pytest.raises(ValueError, match="itemsize|items"):
        _core.gemm(x, np.zeros((3, 5), np.float32), "f16")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 16, 17, 100, 769, 8192])
def test_softmax_matches_reference(n, isa):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 20).astype(np.float32)
    x[0] = 300.0 if n > 1 else x[0]  # a dominant score: the rest underflow towards 0
    ref = _core.softmax(x, 0.125, reference=True)
    got = _core.softmax(x, 0.125, isa=isa)
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-12)
    assert abs(got.sum() - 1) < 1e-5


def reference_gating(g, activation):
    """silu(g) = g / (1 + e^-g); gelu_tanh(g) = 0.5 g (1 + tanh(y)) written as g / (1 + e^-2y), the same
    without 1 + tanh(y) cancelling to 0 in double for g below about -5."""
    if activation == "silu":
        return g / (1 + np.exp(-g))
    return g / (1 + np.exp(-2 * 0.7978845608028654 * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 16, 17, 100, 1537])
def test_gated_activation_matches_reference(n, isa, activation):
    """The vector silu / gelu_tanh gating (kernels' `gated`) against HF's formulas in double, and
    the scalar f32 form (core/activation.h), over the whole range: large negative and positive
    inputs (no overflow), zeros and tiny values."""
    rng = np.random.default_rng(n)
    h = (rng.standard_normal(n) * rng.choice([0.01, 1, 5, 40, 200], n)).astype(np.float32)
    h[: min(n, 3)] = [0.0, -0.0, 1e-30][: min(n, 3)]
    u = rng.standard_normal(n).astype(np.float32)
    got = _core.gated(h, u, activation, isa=isa)
    h64 = h.astype(np.float64)
    with np.errstate(over="ignore"):  # e^x past double's range: the reference's 1 / inf = 0 is right
        ref = reference_gating(h64, activation) * u
    # gelu_tanh's argument 2y is formed in f32: its rounding grows by |2y| in e^-2y, so in the far
    # negative tail (|2y| up to ~90 before e^-2y leaves f32) the relative error reaches a few 1e-6
    np.testing.assert_allclose(got, ref, rtol=2e-6 if activation == "silu" else 1e-5, atol=1e-30)
    # the scalar f32 form: as close for silu; gelu_tanh's 1 + tanh(y) cancels for g below about -5
    # (the kernel's g sigmoid(2y) does not), so there only to an absolute 1e-6
    scalar = _core.gated(h, u, activation, reference=True)
    if activation == "silu":
        np.testing.assert_allclose(scalar, ref, rtol=2e-6, atol=1e-30)
    else:
        np.testing.assert_allclose(scalar, ref, rtol=2e-6, atol=1e-6 * np.abs(u).max())


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("D,n,pad", [(40, 7, 0), (17, 4, 3), (576, 37, 320), (64, 1, 0), (33, 9, 5)])
def test_ffn_decode_matches_reference(D, n, pad, dtype, isa, activation):
    rng = np.random.default_rng(D + n + pad)
    x = rng.standard_normal(D).astype(np.float32)
    y0 = rng.standard_normal(D).astype(np.float32)
    b = from_f32(rng.standard_normal((n, 3 * D + pad)).astype(np.float32) * 0.3, dtype)
    ref = _core.ffn_decode(y0, x, b, dtype, reference=True, activation=activation)
    got = _core.ffn_decode(y0, x, b, dtype, isa=isa, activation=activation)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(n * D))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("D,n,picked", [(40, 23, 9), (17, 6, 5), (576, 50, 31), (33, 4, 1)])
def test_ffn_decode_gathered_rows_match_reference(D, n, picked, dtype, isa):
    """The sparse path computes from rows gathered anywhere (cache and read buffers), in any order."""
    rng = np.random.default_rng(D * n + picked)
    x = rng.standard_normal(D).astype(np.float32)
    y0 = rng.standard_normal(D).astype(np.float32)
    b = from_f32(rng.standard_normal((n, 3 * D + 7)).astype(np.float32) * 0.3, dtype)
    rows = rng.choice(n, picked, replace=False).astype(np.int64)
    ref = _core.ffn_decode(y0, x, b, dtype, rows=rows, reference=True)
    got = _core.ffn_decode(y0, x, b, dtype, rows=rows, isa=isa)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(picked * D))
    # the same neurons as a contiguous matrix give the same answer, bit for bit
    same = _core.ffn_decode(y0, x, np.ascontiguousarray(b[rows]), dtype, isa=isa)
    np.testing.assert_array_equal(got, same)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 17, 576, 771])
def test_bit_sum_matches_reference(n, isa):
    rng = np.random.default_rng(n)
    z = rng.standard_normal(n).astype(np.float32)
    bits = rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8)
    want = z[np.unpackbits(bits, bitorder="little", count=n).astype(bool)].sum(dtype=np.float64)
    assert abs(_core.bit_sum(bits, z, reference=True) - want) < 1e-5
    assert abs(_core.bit_sum(bits, z, isa=isa) - want) < 1e-4 * np.sqrt(n)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 576, 771, 4096, 4133, 9000])
def test_bit_sum_i8_matches_reference(n, isa):
    """Exact in integers; 9000 crosses the 128 steps of 16-bit sums, all at +-127 to test their range."""
    rng = np.random.default_rng(n)
    z = rng.integers(-127, 128, n, dtype=np.int8) if n != 9000 else np.full(n, 127, np.int8)
    bits = rng.integers(0, 256, (n + 7) // 8, dtype=np.uint8) if n != 9000 else np.full((n + 7) // 8, 255, np.uint8)
    want = int(z[np.unpackbits(bits, bitorder="little", count=n).astype(bool)].astype(np.int64).sum())
    assert _core.bit_sum_i8(bits, z, reference=True) == want
    assert _core.bit_sum_i8(bits, z, isa=isa) == want
    assert _core.bit_sum_i8(bits, -z, isa=isa) == -want


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("G,hd,ld,rows,r0,n", [(1, 64, 64, 40, 0, 40), (3, 64, 192, 70, 55, 33), (4, 256, 256, 9, 3, 9),
                                                (5, 17, 40, 23, 22, 23), (2, 80, 81, 5, 0, 1), (7, 48, 100, 31, 30, 2)])
def test_attend_matches_numpy(G, hd, ld, rows, r0, n, dtype, isa):
    """Grouped-query decode attention over a ring of KV rows (run from r0, wrapping to row 0)."""
    rng = np.random.default_rng(G * 1000 + hd + n)
    q = rng.standard_normal((G, hd)).astype(np.float32)
    k = from_f32(rng.standard_normal((rows, ld)).astype(np.float32), dtype)
    v = from_f32(rng.standard_normal((rows, ld)).astype(np.float32), dtype)
    order = [(r0 + j) % rows for j in range(n)]
    kf = to_f32(k, dtype).astype(np.float64)[order, :hd]
    vf = to_f32(v, dtype).astype(np.float64)[order, :hd]
    s = 0.125 * q.astype(np.float64) @ kf.T
    p = np.exp(s - s.max(axis=1, keepdims=True))
    want = (p / p.sum(axis=1, keepdims=True)) @ vf
    got = _core.attend(q, k, v, dtype, r0, n, 0.125, isa=isa)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5 * np.sqrt(hd))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 2, 15, 16, 63, 64, 65, 1000, 49157])
def test_argmax_finds_the_first_largest(n, isa):
    """Greedy sampling's pick: the first of equal largest values; a NaN never wins except first."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    cases = [x]
    for at in {0, n // 3, n - 1}:
        y = x.copy()
        y[at] = 9.0
        y[(at + n // 2) % n] = 9.0  # a tie: the first of the two wins
        cases.append(y)
    if n > 1:
        nan = x.copy()
        nan[::3] = np.nan
        cases.append(nan)                        # a NaN first: it wins (std::max_element)
        cases.append(np.roll(nan, 1))            # NaNs elsewhere are skipped
        cases.append(np.full(n, -np.inf, np.float32))
        z = np.zeros(n, np.float32)
        z[n - 1] = -0.0
        cases.append(-np.abs(x) - 1 + np.eye(1, n, n - 1, dtype=np.float32)[0])  # the last is largest
        cases.append(z)
    for y in cases:
        y = np.ascontiguousarray(y, np.float32)
        want = _core.argmax(y, reference=True)
        if not np.isnan(y[0]):
            assert want == int(np.nanargmax(np.where(np.isnan(y), -np.inf, y))) or np.all(y == -np.inf)
        assert _core.argmax(y, isa=isa) == want, (n, y[:8])


@pytest.mark.parametrize("reference", [True, False])
@pytest.mark.parametrize("isa", ISAS)
def test_f32_to_f16_rounds_as_numpy(reference, isa):
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(10.0) ** rng.integers(-9, 6, 20000),
        np.float32([0.0, -0.0, 65504, 65519.99, 65520, 1e9, -1e9, np.inf, -np.inf, 6e-8, 2.9e-8, 3e-8, 5.96e-8,
                    6.1e-5, 6.097e-5, 1 + 2 ** -11, 1 + 3 * 2 ** -11]),
        (np.arange(1, 2049, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -24),  # subnormal ties
    ]).astype(np.float32)
    with np.errstate(over="ignore"):  # values past f16's range become inf, on purpose
        want = x.astype(np.float16).view(np.uint16)
    for n in (len(x), 13):  # a tail shorter than a vector
        np.testing.assert_array_equal(_core.to_f16(x[:n], reference, isa), want[:n])
    assert _core.to_f16(np.float32([np.nan]), reference, isa)[0] & 0x7C00 == 0x7C00


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n,align", [(1, 1), (7, 16), (1000, 16), (4097, 1), (123, 7)])
def test_thread_pool_dynamic_chunks_cover_every_index_once(n, align, threads):
    """parallel_dynamic over [0, n): every index covered exactly once per job, chunk edges on
    multiples of align, over 50 jobs alternating with run() jobs on one pool; a thread that stalls
    in its first chunk (as a descheduled one) delays nothing else."""
    counts, misaligned, _ = _core.pool_cover(n, align, threads, jobs=50, stall_us=200 if threads > 1 else 0)
    np.testing.assert_array_equal(counts, np.full(n, 50))
    assert misaligned == 0


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_thread_pool_runs_with_fewer_threads_while_one_stalls(threads):
    """A thread that stalls 5 ms in every job it takes part in (as one the OS keeps descheduling
    while another process has its core): the pool parks the threads above half (then a quarter...)
    for a while instead of waiting on them at every job, and every index is still covered once per
    job, by the same chunks."""
    jobs = 200
    # each chunk works 50 us, so that a job lasts long enough for the other threads to take part
    # (with empty chunks the caller may finish a job alone before they wake, and nothing stalls)
    counts, misaligned, reduced = _core.pool_cover(1000, 16, threads, jobs=jobs, stall_us=5000, spin_us=50)
    np.testing.assert_array_equal(counts, np.full(1000, jobs))
    assert misaligned == 0
    assert reduced > 0


def test_thread_pool_runs_with_fewer_threads_on_a_busy_machine():
    """As many other processes computing as there are cores (no thread is made to stall here): the
    pool's threads wait on the OS's run queue, or are descheduled holding a chunk, and it parks all
    but the caller for a while. Every index is still covered once per job."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat"):
        pytest.skip("the kernel gives no run-queue waits (schedstat)")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        jobs = 400  # each about 64 chunks x 20 us of work: several windows of the pool's 20 ms
        counts, misaligned, reduced = _core.pool_cover(64, 1, 2, jobs=jobs, spin_us=20)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    np.testing.assert_array_equal(counts, np.full(64, jobs))
    assert misaligned == 0
    assert reduced > 0
