"""Flash-offloaded FFN streaming on the real SmolLM2 (f32): exactness against the all-in-DRAM
engine, the DRAM budget (accounted bytes and the process's peak RSS), the neuron cache, the
sparsity predictor (calibrate, recall, sparse decode = sparse prefill), and bad inputs."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import flashmem
from flashmem.flash import PREDICTOR_PARTS
from flashmem.flash.calibrate import calibrate, predict

from conftest import shared_data

PROMPT = "The history of the printing press begins"


def linked_copy(src: str, dst, copy=()) -> str:
    """A model folder whose files are symlinks to src's, except those in `copy` (real copies)."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f.endswith(".safetensors") and f not in copy and "predictor" not in f:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
        elif "predictor" not in f:
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    return str(dst)


def predictor_tensors(src: str) -> dict:
    """Every tensor of src's predictor file, by name, as (tag, array)."""
    from flashmem.checkpoints import safetensors_io as st

    path = os.path.join(src, "predictor.safetensors")
    infos, _ = st.read_header(path)
    return {name: (info.tag, st.load_tensor(path, info)) for name, info in infos.items()}


def write_predictor(dst: str, tensors: dict) -> None:
    """A predictor file in dst holding `tensors` (name: (tag, array))."""
    from flashmem.checkpoints import safetensors_io as st

    w = st.Writer(os.path.join(dst, "predictor.safetensors"), [(k, t, tuple(v.shape)) for k, (t, v) in tensors.items()])
    for k, (_, v) in tensors.items():
        w.write(k, v)
    w.close()


@pytest.fixture(scope="module")
def folder(smollm2_f32):
    return smollm2_f32.path


@pytest.fixture(scope="module")
def calibrated(folder, tmp_path_factory):
    """A linked copy of the model with predictors fitted on the start of tinyshakespeare."""
    dst = linked_copy(folder, tmp_path_factory.mktemp("calibrated") / "m")
    model = flashmem.load(dst, threads=2, max_context=512)
    report = calibrate(model, shared_data("tinyshakespeare.txt").read_text()[:20000], tokens=2048, progress=False)
    return dst, report


@pytest.fixture(scope="module")
def calibrated_lowrank(folder, tmp_path_factory):
    """The same with the low-rank predictor, rank 128 (calibrate's default picks the signs at these shapes)."""
    dst = linked_copy(folder, tmp_path_factory.mktemp("lowrank") / "m")
    model = flashmem.load(dst, threads=2, max_context=512)
    report = calibrate(model, shared_data("tinyshakespeare.txt").read_text()[:20000], tokens=2048, progress=False,
                       rank=128)
    return dst, report


def run_steps(model, ids, n_decode):
    """Logits of a prefill of ids, then of n_decode single-token steps (greedy)."""
    e = model._engine
    out = [e.forward(np.asarray(ids, np.int32), 0)]
    pos, nxt = len(ids), int(out[-1].argmax())
    for _ in range(n_decode):
        out.append(e.forward(np.asarray([nxt], np.int32), pos))
        pos, nxt = pos + 1, int(out[-1].argmax())
    return np.stack(out)


def test_flash_without_sparsity_equals_dram_engine(smollm2_f32, folder):
    ids = smollm2_f32.tokenizer.encode(PROMPT)
    dense = run_steps(smollm2_f32, ids, 12)
    # a cache too small for one token's neurons: every token streams most of the FFN again
    small = flashmem.load(folder, threads=2, max_context=512, offload="flash", dram_budget="290MB")
    got = run_steps(small, ids, 12)
    np.testing.assert_array_equal(got, dense)
    s = small.flash_stats()
    assert s["direct_io"] and s["misses"] > 0 and s["bytes_read"] > 0
    assert 0 < s["cache_rows"] < 1536
    assert small.owned_bytes <= 290e6
    np.testing.assert_array_equal(small.logits(ids), smollm2_f32.logits(ids))


def test_reads_ahead_are_used_and_dropped_when_stale(smollm2_f32, folder):
    """At sparsity 0 a layer's first misses are read while the layer before computes (the next
    token's layer 0 while the last layer does): the rounds read ahead are used, and one read for a
    neuron cache that has changed since is dropped, not used (the logits stay exact)."""
    ids = smollm2_f32.tokenizer.encode(PROMPT)
    dense = run_steps(smollm2_f32, ids, 6)
    m = flashmem.load(folder, threads=2, max_context=512, offload="flash", dram_budget="290MB")
    e = m._engine
    got = run_steps(m, ids, 3)
    np.testing.assert_array_equal(got, dense[:4])
    s = e.sparse_stats()
    assert s["rounds_ahead"] >= 3 * 29, s  # every layer after the first, at every step
    assert s["read_busy_s"] > 0 and s["rounds_dropped"] == 0
    e.clear_neuron_cache()  # the round read ahead for layer 0 skipped neurons cached until now
    nxt, pos = int(got[-1].argmax()), len(ids) + 3
    for step in range(3):
        out = e.forward(np.asarray([nxt], np.int32), pos)
        np.testing.assert_array_equal(out, dense[4 + step])
        nxt, pos = int(out.argmax()), pos + 1
    assert e.sparse_stats()["rounds_dropped"] == 1


@pytest.mark.parametrize("queue_depth", [1, 2, 8])
def test_direct_reader_submit_then_wait(tmp_path, queue_depth):
    """The reader's two halves (submit, then wait while the caller computes) read what read() does,
    and refuse a second batch in flight, a wait with none, and a read past the file's end."""
    from flashmem import _core

    path = str(tmp_path / "blocks.bin")
    data = np.random.default_rng(3).integers(0, 256, 64 * 4096, dtype=np.uint8).tobytes()
    open(path, "wb").write(data)
    offsets = [4096 * b for b in (5, 0, 62, 17, 17, 40)]
    want = b"".join(data[o:o + 8192] for o in offsets)
    assert _core.direct_read(path, offsets, 8192, queue_depth) == want
    assert _core.direct_read(path, offsets, 8192, queue_depth, submit=True) == want
    with pytest.raises(ValueError, match="still in flight"):
        _core.direct_read(path, offsets, 8192, queue_depth, submit=True, misuse=1)
    with pytest.raises(ValueError, match="without a batch"):
        _core.direct_read(path, offsets, 8192, queue_depth, submit=True, misuse=2)
    with pytest.raises(RuntimeError, match=r"blocks.bin' is truncated"):
        _core.direct_read(path, [4096 * 70], 8192, queue_depth, submit=True)


def test_impossible_budget_states_the_minimum(folder):
    with pytest.raises(ValueError, match=r"dram_budget .* below the minimum (\d+) bytes"):
        flashmem.load(folder, threads=2, max_context=512, offload="flash", dram_budget="100MB")
    with pytest.raises(ValueError, match="dram_budget needs offload='flash'"):
        flashmem.load(folder, threads=2, dram_budget="1GB")
    for bad in ("lots", "-5MB", 0, True):
        with pytest.raises(ValueError, match="dram_budget"):
            flashmem.load(folder, threads=2, offload="flash", dram_budget=bad)
    with pytest.raises(ValueError, match="offload"):
        flashmem.load(folder, threads=2, offload="disk")


def test_budget_sets_the_neuron_cache(folder):
    lo = flashmem.load(folder, threads=2, max_context=256, offload="flash", dram_budget="300MB")
    hi = flashmem.load(folder, threads=2, max_context=256, offload="flash", dram_budget="350MB")
    lo_rows, hi_rows = lo.flash_stats()["cache_rows"], hi.flash_stats()["cache_rows"]
    assert 0 < lo_rows < hi_rows <= 1536
    row = 3 * 576 * 4  # one f32 bundle
    assert abs((hi_rows - lo_rows) * 30 * row - 50e6) < 30 * row + 1
    assert lo.owned_bytes <= 300e6 and hi.owned_bytes <= 350e6
    r = lo.generate(PROMPT, max_new_tokens=8)
    assert r.flash["bytes_read_per_token"] > 0 and 0 <= r.flash["neuron_cache_hit_rate"] <= 1
    assert lo.flash_stats()["cached_neurons"] <= 30 * lo_rows


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="under AddressSanitizer (.ci/sanitize) resident memory holds ASan's redzones and "
                           "quarantine; the plain suite runs this check")
def test_peak_rss_stays_within_budget(folder, tmp_path):
    """The process's peak RSS during a generation, minus what Python, numpy and the tokenizer hold
    before the engine exists, stays within the budget plus a fixed 40 MB (allocator slack,
    Python objects of the generation loop)."""
    budget = 300_000_000
    script = textwrap.dedent(f"""
        import json, flashmem
        from flashmem.tokenizer import Tokenizer
        def kb(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        Tokenizer({folder!r})  # the tokenizer's own memory counts as Python's overhead
        base = kb("VmRSS:")
        m = flashmem.load({folder!r}, threads=2, max_context=512, offload="flash", dram_budget={budget})
        r = m.generate("Once upon a time", max_new_tokens=24)
        print(json.dumps(dict(base=base, peak=kb("VmHWM:"), owned=m.owned_bytes, read=r.flash["bytes_read_per_token"])))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["owned"] <= budget and r["read"] > 0
    assert r["peak"] - r["base"] <= budget + 40e6, r


def test_window_cache_hits_and_bounds(folder):
    """Replayed selections: a neuron picked again within the window is a cache hit; the cache
    never holds more rows than the budget gives it."""
    m = flashmem.load(folder, threads=2, max_context=256, offload="flash", dram_budget="330MB", window=2)
    rows = m.flash_stats()["cache_rows"]
    rng = np.random.default_rng(0)
    base = rng.choice(1536, 200, replace=False)
    steps = np.stack([np.stack([np.sort(np.concatenate([base[:180], rng.choice(1536, 20)]))] * 30)
                      for _ in range(6)]).astype(np.int32)
    m._engine.set_trace(steps)
    e = m._engine
    e.forward(np.asarray([1, 2, 3], np.int32), 0)
    m._engine.reset_sparse_stats()
    for t in range(5):
        e.forward(np.asarray([4], np.int32), 3 + t)
    s = m.flash_stats()
    assert s["hits"] / (s["hits"] + s["misses"]) > 0.8
    assert s["cached_neurons"] <= 30 * rows


def test_calibrated_predictor(calibrated, folder):
    dst, report = calibrated
    assert os.path.isfile(os.path.join(dst, "predictor.safetensors"))
    assert report["predictor_share_of_ffn"] <= 0.05
    assert report["mean_recall_at_50"] > 0.6  # random picks give 0.5
    assert report["mean_recall_at_80"] > 0.4  # random picks give 0.2
    # a layer ahead: layer l + 1's predictor on layer l's FFN input (random picks give 0.5)
    assert len(report["recall_ahead_at_50"]) == len(report["recall_at_50"]) - 1
    assert 0.55 < report["mean_ahead_agreement_at_50"] < 1 and 0.5 < report["mean_recall_ahead_at_50"]
    print("recall a layer ahead", report["mean_recall_ahead_at_50"], "agreement", report["mean_ahead_agreement_at_50"])
    ids = flashmem.load(folder, threads=2).tokenizer.encode(PROMPT)
    dram = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, window=3)
    flash = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, window=3, offload="flash")
    a, b = run_steps(dram, ids, 10), run_steps(flash, ids, 10)
    np.testing.assert_array_equal(a, b)  # streamed neurons compute exactly what resident ones do
    s = flash.flash_stats()
    assert s["selected"] == 768 * 30 * (len(ids) + 10)
    # Prefill of the whole sequence picks per token exactly as decoding does. The two paths' FFN
    # inputs differ in rounding (batched and single-token kernels), enough to flip a near-tie among
    # the predictor's picks on some instruction sets, so the claim is checked in its two parts:
    # the predictor scores a token in a batch exactly as alone, and with the same picks replayed,
    # the prefill's per-token windows give the decode path's logits.
    seq = ids + [int(r.argmax()) for r in a[:-1]]
    x = dram.ffn_inputs(seq)
    for l in (0, 15, 29):
        batch = dram._engine.predictor_scores(l, np.ascontiguousarray(x[l]))
        for t in range(len(seq)):
            alone = dram._engine.predictor_scores(l, np.ascontiguousarray(x[l, t:t + 1]))
            np.testing.assert_array_equal(batch[t], alone[0])
    picks = np.sort(np.random.default_rng(0).random((len(seq), 30, 1536)).argsort(axis=2)[:, :, :768], axis=2)
    replayed = []
    for _ in range(2):
        m = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, window=3)
        m._engine.set_trace(np.ascontiguousarray(picks, dtype=np.int32))
        replayed.append(m)
    steps = run_steps(replayed[0], ids, 10)
    seq = ids + [int(r.argmax()) for r in steps[:-1]]
    whole = replayed[1]._engine.forward(np.asarray(seq, np.int32), 0, True)
    np.testing.assert_allclose(whole[len(ids) - 1:], steps, rtol=0, atol=2e-3)


def test_lowrank_predictor(calibrated_lowrank, calibrated, folder):
    """The low-rank predictor: fitted by calibrate, scored by the engine (q8_0 matmuls) as calibrate's numpy
    mirror scores it, a token in a batch as alone, better recall than the signs at these shapes, and the
    same streamed and resident logits within a stated DRAM budget."""
    from flashmem.flash.calibrate import LOWRANK_PARTS, load_parts, predictor_bytes

    dst, report = calibrated_lowrank
    _, signs = calibrated
    assert report["rank"] == 128 and signs["rank"] == 0
    assert report["predictor_share_of_ffn"] == pytest.approx(predictor_bytes(576, 1536, 128) / (1536 * 3 * 576 * 4))
    # held out: 0.76 against 0.69 on 4,096 tokens; random picks give 0.5
    assert report["mean_recall_at_50"] > signs["mean_recall_at_50"] + 0.02
    assert report["mean_recall_at_80"] > signs["mean_recall_at_80"] + 0.02
    m = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, window=3)
    assert m._engine.sparse_stats()["predictor_bytes"] >= 30 * predictor_bytes(576, 1536, 128)
    ids = m.tokenizer.encode(PROMPT)
    x = m.ffn_inputs(ids)
    path = os.path.join(dst, "predictor.safetensors")
    for l in (0, 17, 29):
        parts = load_parts(path, l)
        assert sorted(parts) == sorted(LOWRANK_PARTS)
        got = m._engine.predictor_scores(l, np.ascontiguousarray(x[l]))
        np.testing.assert_allclose(got, predict(parts, x[l]), rtol=1e-4, atol=1e-5 * np.abs(got).max())
        for t in range(x.shape[1]):
            alone = m._engine.predictor_scores(l, np.ascontiguousarray(x[l, t:t + 1]))
            np.testing.assert_array_equal(got[t], alone[0])
    flash = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, window=3, offload="flash")
    np.testing.assert_array_equal(run_steps(m, ids, 6), run_steps(flash, ids, 6))
    s = flash.flash_stats()
    assert s["selected"] == 768 * 30 * (len(ids) + 6) and s["misses"] > 0
    # within a budget just over the minimum, which counts the predictor: a small neuron cache, reads every token
    budget = s["minimum_budget"] + (4 << 20)
    small = flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, offload="flash", dram_budget=budget)
    assert small._engine.sparse_stats()["cache_rows"] < 1536
    out = small.generate(PROMPT, max_new_tokens=8)
    assert out.finish_reason == "length" and out.flash["requests_per_token"] > 0
    with pytest.raises(ValueError, match=r"below the minimum .*predictor \d+"):
        flashmem.load(dst, threads=2, max_context=256, sparsity=0.5, offload="flash", dram_budget=budget - (5 << 20))


def test_default_predictor_rank():
    """calibrate's default kind: the signs at small shapes, low-rank 128 where that is smaller (7B)."""
    from flashmem.flash.calibrate import default_rank, predictor_bytes

    assert default_rank(576, 1536) == 0 and default_rank(640, 2048) == 0  # SmolLM2-135M, Gemma 3 270M
    assert default_rank(4096, 14336) == 128  # Llama-3-8B
    assert predictor_bytes(4096, 14336, 128) < predictor_bytes(4096, 14336) / 2.5
    assert default_rank(4100, 14336) == 0  # d_model not a multiple of 32: q8_0 rows need it


def test_corrupt_lowrank_predictor(calibrated_lowrank, folder, tmp_path):
    """A low-rank predictor with a non-finite q8_0 scale, a layer of another rank, or a bad --rank: errors that
    name the file, tensor and layer."""
    src, _ = calibrated_lowrank
    tensors = predictor_tensors(src)
    for case in ("nan_scale", "other_rank"):
        dst = linked_copy(src, tmp_path / case)
        keep = {k: (t, v.copy()) for k, (t, v) in tensors.items()}
        if case == "nan_scale":
            keep["model.layers.2.mlp.predictor.lowrank_out"][1][7, 34:36] = np.frombuffer(
                np.float16(np.nan).tobytes(), np.uint8)
        else:
            name = "model.layers.4.mlp.predictor.lowrank_in"
            keep[name] = ("u8", keep[name][1][:128])
        write_predictor(dst, keep)
        match = ("predictor.safetensors': predictor tensor lowrank_out of layer 2: row 7 has a non-finite q8_0 scale"
                 if case == "nan_scale" else "tensor 'pred_lowrank_in' of layer 4 in .*expected shape \\(256, 612\\)")
        with pytest.raises(ValueError, match=match):
            flashmem.load(dst, threads=2, max_context=64, sparsity=0.5)
    model = flashmem.load(folder, threads=2, max_context=512)
    for bad in (-32, 48, 1024):
        with pytest.raises(ValueError, match="rank must be 0 .* got " + str(bad)):
            calibrate(model, "x " * 2000, rank=bad, progress=False)


def test_missing_predictor(folder):
    with pytest.raises(FileNotFoundError, match="flashmem calibrate"):
        flashmem.load(folder, threads=2, sparsity=0.5)
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(ValueError, match="sparsity"):
            flashmem.load(folder, threads=2, sparsity=bad)


def test_corrupt_or_old_predictor(calibrated, tmp_path):
    """A predictor with an out-of-range outlier dim, or one from before the outlier part: clear errors."""
    src, _ = calibrated
    tensors = predictor_tensors(src)
    for case in ("bad_dim", "old"):
        dst = linked_copy(src, tmp_path / case)
        keep = {k: (t, v.copy()) for k, (t, v) in tensors.items() if case != "old" or ".outlier_" not in k}
        if case == "bad_dim":
            keep["model.layers.3.mlp.predictor.outlier_dims"][1][5] = 576
        write_predictor(dst, keep)
        match = ("predictor.safetensors': predictor of layer 3: outlier dim 576 out of range" if case == "bad_dim"
                 else "outlier_dims' is missing; run `flashmem calibrate")
        with pytest.raises(ValueError, match=match):
            flashmem.load(dst, threads=2, max_context=64, sparsity=0.5)


def test_truncated_bundle_file(folder, tmp_path):
    dst = linked_copy(folder, tmp_path / "m", copy=("ffn_bundles.safetensors",))
    path = os.path.join(dst, "ffn_bundles.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3 * 8192)
    with pytest.raises(ValueError, match="ffn_bundles.safetensors: truncated"):
        flashmem.load(dst, threads=2, max_context=128, offload="flash")


def check_read_error_recovers(m, path):
    """The disk loses the end of the bundle file at `path` while model m runs: generation raises
    naming the file, again on the next call (no hang, no crash), and once the file is back m
    generates as it did before."""
    fresh = m.generate("Hello", max_new_tokens=6).text
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(RuntimeError, match=r"ffn_bundles.safetensors' at byte \d+: unexpected end of file"):
        m.generate("Hello again, this is a longer prompt", max_new_tokens=4)
    with pytest.raises(RuntimeError, match="ffn_bundles.safetensors"):
        m.generate("Hello", max_new_tokens=2)
    with open(path, "r+b") as f:
        f.write(whole)
    assert m.generate("Hello", max_new_tokens=6).text == fresh


def test_read_error_mid_generation(folder, tmp_path):
    dst = linked_copy(folder, tmp_path / "m", copy=("ffn_bundles.safetensors",))
    m = flashmem.load(dst, threads=2, max_context=128, offload="flash", dram_budget="290MB")
    check_read_error_recovers(m, os.path.join(dst, "ffn_bundles.safetensors"))


def test_read_error_with_reads_ahead_in_flight(calibrated, tmp_path):
    """At 50% sparsity the next layer's likeliest neurons are in flight while a layer computes: a
    read error among them raises at the layer that needs them, and once the file is back the model
    generates as a fresh one (f32 bundles of 6,912 bytes: read ahead by default)."""
    dst = linked_copy(calibrated[0], tmp_path / "m", copy=("ffn_bundles.safetensors",))
    os.symlink(os.path.join(calibrated[0], "predictor.safetensors"), os.path.join(dst, "predictor.safetensors"))
    m = flashmem.load(dst, threads=2, max_context=128, offload="flash", dram_budget="290MB", sparsity=0.5,
                      window=1)  # computes exactly the picks, whatever the neuron cache holds
    check_read_error_recovers(m, os.path.join(dst, "ffn_bundles.safetensors"))
    s = m.flash_stats()
    assert s["read_ahead"] == 1536 // 8 and s["ahead_read"] > 0 and s["ahead_used"] > 0


def test_read_error_in_streamed_attention(folder, tmp_path):
    """offload="all" reads each layer's attention matrices a layer ahead, while the FFN computes:
    the same text as offload="flash", nearly every fetch served by the batch read ahead; a disk that
    loses the file's end raises naming it (from the batch read ahead or a plain read), again on
    the next call, and once the file is back the model generates as before."""
    dst = linked_copy(folder, tmp_path / "m", copy=("model.safetensors",))
    path = os.path.join(dst, "model.safetensors")
    m = flashmem.load(dst, threads=2, max_context=128, offload="all")
    fresh = m.generate("Hello", max_new_tokens=6)
    assert fresh.text == flashmem.load(dst, threads=2, max_context=128, offload="flash").generate(
        "Hello", max_new_tokens=6).text
    # per forward pass, layers 1..29 find their q/k/v and output matrices read ahead (layer 0 reads)
    passes = 6
    assert m._engine.stream_prefetch_hits >= passes * 29 * 2
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 6 // 10)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"model.safetensors' at byte \d+: unexpected end of file"):
            m.generate("Hello again", max_new_tokens=4)
    with open(path, "r+b") as f:
        f.write(whole)
    assert m.generate("Hello", max_new_tokens=6).text == fresh.text


def test_read_error_in_streamed_lm_head(folder, tmp_path):
    """offload="all" under a budget that holds every layer's attention but not the (tied) LM head:
    the head is read a chunk at a time, the next in flight while one computes, and gives the text
    of the head held in DRAM. A disk that loses the table's second half raises naming the file (the
    prompt's embedding rows lie before the cut), again on the next call, and once the file is back
    the model generates as before."""
    from flashmem.checkpoints.safetensors_io import read_header

    dst = linked_copy(folder, tmp_path / "m", copy=("model.safetensors",))
    path = os.path.join(dst, "model.safetensors")
    minimum = flashmem.load(dst, threads=2, max_context=128, offload="all").flash_stats()["minimum_budget"]
    m = flashmem.load(dst, threads=2, max_context=128, offload="all", dram_budget=minimum + 110_000_000)
    fresh = m.generate("Hello", max_new_tokens=6)
    head = 49152 * 576 * 4  # f32 rows
    assert head < fresh.flash["weights_read_per_token"] < head + 1e6  # the head (and an embedding row) alone
    assert fresh.text == flashmem.load(dst, threads=2, max_context=128, offload="flash").generate(
        "Hello", max_new_tokens=6).text
    table = read_header(path)[0]["model.embed_tokens.weight"]
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "r+b") as f:
        f.truncate(table.offset + table.nbytes // 2)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"model.safetensors' at byte \d+: unexpected end of file"):
            m.generate("Hello again", max_new_tokens=4)
    with open(path, "r+b") as f:
        f.write(whole)
    assert m.generate("Hello", max_new_tokens=6).text == fresh.text


def test_unaligned_bundle_file(tmp_path, smollm2_gguf):
    from conftest import make_tiny_hf

    src = str(tmp_path / "hf")
    make_tiny_hf(src)
    ok = flashmem.convert(src, str(tmp_path / "fm"), progress=False)
    ids = [2, 5, 7, 11, 3]
    dense = flashmem.load(ok).logits(ids)
    # bundles that do not start on 4096-byte blocks: a read covers the blocks each one spans
    out = flashmem.convert(src, str(tmp_path / "fm64"), align=64, progress=False)
    np.testing.assert_array_equal(flashmem.load(out, offload="flash").logits(ids), dense)
    np.testing.assert_array_equal(flashmem.load(ok, offload="flash").logits(ids), dense)
    # the unbundled layout (gate, up, down apart; rows of 160 bytes, not block-aligned) streams the same
    from flashmem.flash import write_unbundled

    write_unbundled(ok, json.load(open(os.path.join(ok, "config.json"))))
    m = flashmem.load(ok, offload="flash", ffn_layout="unbundled")
    np.testing.assert_array_equal(m.logits(ids), dense)
    assert m.flash_stats()["requests"] > 0


def test_predictor_scores_match_reference(calibrated):
    """The engine's predictor (1-bit kernels, threads) against the scalar reference, on real inputs."""
    from flashmem import _core
    from flashmem.checkpoints import safetensors_io as st

    dst, _ = calibrated
    m = flashmem.load(dst, threads=2, max_context=64, sparsity=0.5)
    x = m._engine.ffn_inputs(np.asarray(m.tokenizer.encode(PROMPT), np.int32))
    path = os.path.join(dst, "predictor.safetensors")
    infos, _ = st.read_header(path)
    for l in (0, 17, 29):
        p = {k: st.load_tensor(path, infos[f"model.layers.{l}.mlp.predictor.{k}"]) for k in PREDICTOR_PARTS}
        assert p["outlier_weight"].dtype == np.int8 and p["outlier_dims"].shape == (8,)
        assert (p["gate_col"][p["outlier_dims"]] == 0).all()  # the int8 part covers the outlier dims
        got = m._engine.predictor_scores(l, np.ascontiguousarray(x[l]))
        np.testing.assert_allclose(got, predict(p, x[l]), rtol=1e-3, atol=1e-4 * np.abs(got).max())
        for t in range(x.shape[1]):
            ref = _core.predictor_scores_ref(x=x[l, t], **p)
            np.testing.assert_allclose(got[t], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_eval_ppl_and_calibrate_cli(calibrated, capsys):
    from flashmem.cli import main

    dst, _ = calibrated
    data = str(shared_data("tinyshakespeare.txt"))
    assert main(["eval-ppl", dst, "--data", data, "--tokens", "300", "--sparsity", "0.5", "--window", "4",
                 "--max-context", "512", "--threads", "2", "--compare-dense"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 300 and out["perplexity"] > out["dense_perplexity"] > 1
    assert out["perplexity"] < 2 * out["dense_perplexity"]
    # the decode path with flash offloading and the hot cache policy
    assert main(["eval-ppl", dst, "--data", data, "--tokens", "40", "--sparsity", "0.5", "--offload", "flash",
                 "--dram-budget", "300MB", "--eviction", "hot", "--stepwise", "--max-context", "256",
                 "--threads", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stepwise"] and out["offload"] == "flash" and 1 < out["perplexity"] < 1000
    assert main(["calibrate", dst, "--data", "/nonexistent.txt"]) == 2


def test_window_expiry(folder):
    """expire_window=True drops neurons once they leave the window (the paper's policy); by
    default they stay cached until the cache needs their rows."""
    steps = np.stack([np.stack([np.arange(100 * s, 100 * s + 100)] * 30) for s in range(6)]).astype(np.int32)
    cached = {}
    for expire in (True, False):
        m = flashmem.load(folder, threads=2, max_context=64, offload="flash", window=2, expire_window=expire)
        m._engine.set_trace(steps)
        for t in range(6):  # one token per step of the trace
            m._engine.forward(np.asarray([2], np.int32), t)
        cached[expire] = m.flash_stats()["cached_neurons"]
        assert m.flash_stats()["misses"] == 6 * 30 * 100  # every step picks new neurons
    assert cached[True] == 30 * 200 and cached[False] == 30 * 600


def test_hot_eviction_keeps_neurons_picked_at_every_token(folder):
    """A cache of 4 rows per layer; each token picks the same 4 hot neurons (100-103) and 4 new
    ones with lower ids, which are read (and offered to the cache) first. LRU fills the cache with
    the newest neurons and never hits; eviction="hot" lets the hot neurons replace the colder ones
    at the second token and hits them from then on. Both compute the same picks, from the cache or
    from the reads: the logits are identical."""
    n_tok = 12
    steps = np.stack([np.stack([np.r_[4 * t:4 * t + 4, 100:104]] * 30) for t in range(n_tok)]).astype(np.int32)
    logits, stats = {}, {}
    for eviction in ("lru", "hot"):
        m = flashmem.load(folder, threads=2, max_context=64, offload="flash", window=1, cache_rows=4,
                          eviction=eviction)
        m._engine.set_trace(steps)
        logits[eviction] = np.stack([m._engine.forward(np.asarray([5 + t], np.int32), t) for t in range(n_tok)])
        stats[eviction] = m.flash_stats()
    assert stats["lru"]["hits"] == 0
    assert stats["hot"]["hits"] == 30 * 4 * (n_tok - 2)
    assert stats["hot"]["misses"] == 30 * 8 * n_tok - stats["hot"]["hits"]
    np.testing.assert_array_equal(logits["hot"], logits["lru"])
    with pytest.raises(ValueError, match="eviction must be 'lru' or 'hot'"):
        flashmem.load(folder, threads=2, max_context=64, offload="flash", eviction="lfu")


def _memory_cgroup(limit: int):
    """A new child of this process's cgroup-v1 memory group with `limit` bytes, or None where
    there is none to make (no v1 memory controller, or no permission)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.rstrip("\n").split(":", 2)[2] for line in f if ":memory:" in line)
        group = f"/sys/fs/cgroup/memory{path}/flashmem-test-{os.getpid()}"
        os.mkdir(group)
    except (OSError, StopIteration):
        return None
    with open(f"{group}/memory.limit_in_bytes", "w") as f:
        f.write(str(limit))
    return group


def _remove_cgroup(group: str) -> None:
    """rmdir of a memory cgroup whose last process has just exited can meet EBUSY while the kernel
    still detaches it: a few tries, a moment apart."""
    for attempt in range(20):
        try:
            os.rmdir(group)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or attempt == 19:
                raise
            time.sleep(0.1)


def test_auto_budget_in_a_memory_cgroup(folder):
    """dram_budget="auto" inside a memory cgroup of 520 MB: the engine fits in what the cgroup has
    left, and the process generates without being killed, the page cache of what it loaded
    included (the kernel charges both to the cgroup)."""
    limit = 520_000_000
    group = _memory_cgroup(limit)
    if group is None:
        pytest.skip("no cgroup-v1 memory controller to make a group in")
    script = textwrap.dedent(f"""
        import json, flashmem
        from flashmem.flash.streaming import available_dram
        left, how = available_dram()
        m = flashmem.load({folder!r}, threads=2, max_context=256, offload="flash", dram_budget="auto")
        r = m.generate("Once upon a time", max_new_tokens=8)
        print(json.dumps(dict(left=left, how=how, owned=m.owned_bytes, rows=m.flash_stats()["cache_rows"],
                              read=r.flash["bytes_read_per_token"])))
    """)
    try:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             preexec_fn=lambda: open(f"{group}/cgroup.procs", "w").write(str(os.getpid())))
        with open(f"{group}/memory.max_usage_in_bytes") as f:
            peak = int(f.read())
    finally:
        _remove_cgroup(group)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "cgroup" in r["how"] and r["left"] < limit
    assert r["owned"] <= r["left"] and r["rows"] > 0 and r["read"] > 0
    assert peak <= limit


def test_flash_reads_untied_embedding_rows(tmp_path, monkeypatch):
    """offload="flash" with an LM head of its own: the embedding table stays in the file and the
    rows of the tokens in use are read (a tied table is the LM head and stays in DRAM)."""
    from conftest import make_tiny_hf

    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    folder = str(tmp_path / "hf")
    make_tiny_hf(folder, tied=False, vocab=211)
    ids = list(range(5, 40))
    dense = flashmem.load(folder, dtype="f32", threads=2, max_context=64)
    flash = flashmem.load(folder, dtype="f32", threads=2, max_context=64, offload="flash")
    np.testing.assert_array_equal(flash.logits(ids), dense.logits(ids))
    assert flash._engine.weight_bytes < dense._engine.weight_bytes - 211 * 40 * 4 + 4096
    assert flash._engine.stream_bytes_read >= len(ids) * 40 * 4
