"""MemoryBank: recall of the approximate indexes against flat on real model vectors, payloads,
filters, merge, persistence (atomic saves, corrupt and hostile files, mmap), threads, errors."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import flashmem
from flashmem import MemoryBank

from conftest import shared_data

INDEXES = ["flat", "lsh", "ivf", "hnsw"]


@pytest.fixture(scope="module")
def real_vectors(smollm2_gguf):
    """18k real vectors (d=576): 14k token-embedding rows of SmolLM2 and 4k of its final hidden
    states over Tiny Shakespeare, shuffled; plus 300 held-out queries of the same mix."""
    import gguf

    r = gguf.GGUFReader(smollm2_gguf)
    t = next(t for t in r.tensors if t.name == "token_embd.weight")
    emb = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(-1, 576)
    rng = np.random.default_rng(0)
    emb = emb[rng.permutation(len(emb))[:14150]]
    model = flashmem.load(smollm2_gguf, dtype="f16", threads=2, max_context=512)
    ids = model.tokenizer.encode(shared_data("tinyshakespeare.txt").read_text()[:40000])
    hidden = np.concatenate([model.hidden_states(ids[i:i + 512]) for i in range(0, 4150, 512)])[:4150]
    x = np.concatenate([emb, hidden])
    x = x[rng.permutation(len(x))]
    return x[:-300], x[-300:]


def clustered(n, d, n_clusters=40, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32) * 3
    return (centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)).astype(np.float32)


def recall(found, truth):
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth)]))


def exact(base, queries, k, metric="cosine"):
    if metric == "cosine":
        b = base / np.linalg.norm(base, axis=1, keepdims=True)
        s = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ b.T
    elif metric == "ip":
        s = queries @ base.T
    else:
        s = -((queries[:, None, :] - base[None]) ** 2).sum(-1)
    return np.argsort(-s, axis=1, kind="stable")[:, :k], -np.sort(-s, axis=1)[:, :k]


# --- recall ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_truth(real_vectors):
    base, queries = real_vectors
    flat = MemoryBank(576, "cosine", "flat")
    flat.add(base)
    return flat.search(queries, 10)[0]


def perturbed(x, n, scale, seed):
    """n rows of x moved by Gaussian noise of `scale` times their norm: queries near or far."""
    rng = np.random.default_rng(seed)
    rows = x[rng.choice(len(x), n, replace=False)]
    g = rng.standard_normal(rows.shape).astype(np.float32)
    return rows + g * (scale * np.linalg.norm(rows, axis=1, keepdims=True) / np.linalg.norm(g, axis=1, keepdims=True))


@pytest.mark.parametrize("index, target", [("ivf", 0.95), ("hnsw", 0.95), ("lsh", 0.9)])
def test_tuned_defaults_hold_recall_on_new_and_noisy_queries(real_vectors, real_truth, index, target):
    """The bank tunes its search settings on a sample of its own keys: held-out vectors, and
    noisy copies of stored ones near or far, get the default target's recall (less the sample's
    noise; queries at the far end of the sampled noise get less)."""
    base, queries = real_vectors
    bank = MemoryBank(576, "cosine", index)
    bank.add(base)
    assert bank.get_param("target_recall") == target and bank.get_param("tuned_at") == len(base)
    print(f"{index}: tuned recall {bank.get_param('tuned_recall'):.3f}, exact {bank.get_param('tuned_exact')}")
    got = recall(bank.search(queries, 10)[0], real_truth)
    print(f"{index} recall@10 on held-out vectors: {got:.3f}")
    assert got >= target - 0.02
    flat = MemoryBank(576, "cosine", "flat")
    flat.add(base)
    for scale, slack in ((0.25, 0.02), (0.5, 0.02), (1.0, 0.05)):
        q = perturbed(base, 300, scale, seed=int(scale * 10))
        got = recall(bank.search(q, 10)[0], flat.search(q, 10)[0])
        print(f"{index} recall@10, queries at noise {scale}: {got:.3f}")
        assert got >= target - slack


def test_target_recall_option_and_retuning_as_the_bank_grows(tmp_path):
    x = clustered(9000, 48, seed=11)
    low = MemoryBank(48, "cosine", "hnsw", target_recall=0.6)
    high = MemoryBank(48, "cosine", "hnsw", target_recall=0.99)
    for b in (low, high):
        b.add(x[:1000])
        assert b.get_param("tuned_at") == 0  # below 1024 entries: nothing to tune yet
        b.add(x[1000:1100])
        assert b.get_param("tuned_at") == 1100
        b.add(x[1100:2100])
        assert b.get_param("tuned_at") == 1100  # not doubled yet
        b.add(x[2100:])
        assert b.get_param("tuned_at") == 9000
    assert low.get_param("ef_search") < high.get_param("ef_search") or high.get_param("tuned_exact") == 1
    q = perturbed(x, 200, 0.5, seed=1)
    truth, _ = exact(x, q, 10)
    assert recall(high.search(q, 10)[0], truth) >= 0.97
    assert recall(low.search(q, 10)[0], truth) >= 0.55

    # the tuning and its settings survive save/load
    path = tmp_path / "b.fmb"
    high.save(path)
    loaded = MemoryBank.load(path)
    for key in ("target_recall", "tuned_recall", "tuned_exact", "tuned_at", "ef_search"):
        assert loaded.get_param(key) == high.get_param(key), key
    np.testing.assert_array_equal(loaded.search(q, 10)[0], high.search(q, 10)[0])

    # a search setting given by hand stands, and turns tuning off
    high.set_params(ef_search=12)
    assert high.get_param("target_recall") == 0 and high.get_param("ef_search") == 12
    high.add(x[:9000] + 0.01)
    assert high.get_param("ef_search") == 12
    high.save(path)
    assert MemoryBank.load(path).get_param("ef_search") == 12
    # and setting a target again retunes now
    high.set_params(target_recall=0.9)
    assert high.get_param("tuned_at") == 18000 and high.get_param("tuned_recall") >= 0.9
    with pytest.raises(ValueError, match="target_recall or"):
        MemoryBank(48, "cosine", "hnsw", ef_search=20, target_recall=0.9)
    with pytest.raises(ValueError, match="target_recall must be in"):
        MemoryBank(48, "cosine", "ivf", target_recall=1.5)
    with pytest.raises(ValueError, match="target_recall must be in"):
        high.set_params(target_recall=-0.1)


def test_flat_matches_numpy_on_real_vectors(real_vectors, real_truth):
    base, queries = real_vectors
    ids, scores = exact(base, queries, 10)
    assert recall(real_truth, ids) > 0.999  # equal up to ties


@pytest.mark.parametrize("index, floor", [("ivf", 0.95), ("hnsw", 0.95), ("lsh", 0.9)])
def test_recall_on_clustered_data(index, floor):
    x = clustered(12000, 96)
    base, queries = x[:-200], x[-200:]
    truth, _ = exact(base, queries, 10)
    bank = MemoryBank(96, "cosine", index)
    bank.add(base)
    assert recall(bank.search(queries, 10)[0], truth) >= floor


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_other_metrics_match_numpy(metric):
    x = clustered(3000, 33, seed=2)
    base, queries = x[:-50], x[-50:]
    want_ids, want_scores = exact(base, queries, 7, metric)
    for index in INDEXES:
        bank = MemoryBank(33, metric, index)
        bank.add(base)
        ids, scores = bank.search(queries, 7)
        floor = 1.0 if index == "flat" else 0.85
        assert recall(ids, want_ids) >= floor, index
        if index == "flat":
            np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-3)


def test_recall_drift_as_entries_arrive_after_training(real_vectors, real_truth):
    """IVF trains on the first entries; HNSW grows; both keep their recall as the rest arrive."""
    base, queries = real_vectors
    half = len(base) // 2
    for index in ("ivf", "hnsw"):
        bank = MemoryBank(576, "cosine", index, **({"train_size": half} if index == "ivf" else {}))
        bank.add(base[:half])
        if index == "ivf":
            assert bank.get_param("trained") == 1 and bank.get_param("nlist") > 0
        bank.add(base[half:])
        got = recall(bank.search(queries, 10)[0], real_truth)
        print(f"{index}: recall@10 after adding the second half post-training: {got:.3f}")
        assert got >= 0.93


def test_hnsw_removal_keeps_recall():
    x = clustered(8000, 64, seed=3)
    base, queries = x[:-200], x[-200:]
    bank = MemoryBank(64, "cosine", "hnsw")
    ids = bank.add(base)
    rng = np.random.default_rng(0)
    for round_ in range(3):  # forget a third, add it back, three times
        gone = rng.choice(ids, len(ids) // 3, replace=False)
        bank.remove(gone)
        keep = np.setdiff1d(ids, gone)
        truth_rows, _ = exact(base[keep], queries, 10)
        got = recall(bank.search(queries, 10)[0], keep[truth_rows])
        assert got >= 0.95, (round_, got)
        bank.add(base[gone], ids=gone)
    truth, _ = exact(base, queries, 10)
    assert recall(bank.search(queries, 10)[0], ids[truth]) >= 0.95


# --- entries -------------------------------------------------------------------------------

def test_payloads_roundtrip_and_update():
    bank = MemoryBank(8, "cosine", "flat")
    v16 = np.arange(24, dtype=np.float16).reshape(3, 8)
    ids = bank.add(np.eye(8)[:2], values=[v16, None], texts=["first", "second"],
                   metadata=[{"kind": "fact", "n": 1}, None])
    m = bank.get(ids[0])
    assert m.text == "first" and m.metadata == {"kind": "fact", "n": 1}
    assert m.value.dtype == np.float16 and np.array_equal(m.value, v16)
    assert bank.get(ids[1]).value is None and bank.get(ids[1]).metadata == {}
    created = m.created
    time.sleep(0.01)
    bank.update(ids[0], key=np.ones(8), text="changed", metadata={"kind": "other"},
                value=np.zeros((2, 4), np.float32))
    m2 = bank.get(ids[0])
    assert m2.text == "changed" and m2.metadata == {"kind": "other"} and m2.value.shape == (2, 4)
    assert m2.created == created and m2.updated > created
    np.testing.assert_allclose(m2.key, np.ones(8) / np.sqrt(8), rtol=1e-6)
    assert bank.search(np.ones(8), 1)[0][0, 0] == ids[0]


def test_merge_combines_entries():
    bank = MemoryBank(4, "ip", "hnsw")
    a, b, c = bank.add(np.eye(4)[:3], values=[np.ones((1, 4)), 2 * np.ones((2, 4)), None],
                       texts=["a", "b", "c"], metadata=[{"x": 1}, {"y": 2}, {}])
    new = bank.merge([a, b])
    assert len(bank) == 2 and a not in bank and b not in bank and new in bank
    m = bank.get(new)
    np.testing.assert_allclose(m.key, [0.5, 0.5, 0, 0])
    assert m.value.shape == (3, 4) and m.text == "a\nb" and m.metadata == {"x": 1, "y": 2}
    assert bank.search(np.array([1.0, 1.0, 0, 0]), 1)[0][0, 0] == new
    with pytest.raises(ValueError, match="unknown memory id"):
        bank.merge([c, 999])
    assert c in bank  # nothing was removed


def test_filters():
    x = clustered(2000, 16, seed=5)
    bank = MemoryBank(16, "cosine", "hnsw")
    ids = bank.add(x, metadata=[{"even": int(i) % 2 == 0, "i": int(i)} for i in range(len(x))])
    q = x[:5]
    got, _ = bank.search(q, 10, filter=lambda md: md["even"])
    assert all(int(i) % 2 == 0 for i in got.ravel())
    truth, _ = exact(x[::2], q, 10)
    assert recall(got, ids[::2][truth]) >= 0.95
    allowed = [3, 7, 11]
    got, scores = bank.search(q, 5, filter=allowed)
    assert set(got[0][:3]) == set(allowed) and (got[:, 3:] == -1).all() and np.isinf(scores[:, 3:]).all()


def test_fewer_entries_than_k_and_empty_bank():
    for index in INDEXES:
        bank = MemoryBank(4, "cosine", index)
        ids, scores = bank.search(np.ones(4), 3)
        assert (ids == -1).all() and np.isneginf(scores).all()
        bank.add(np.eye(4)[:2])
        ids, _ = bank.search(np.ones(4), 3)
        assert sorted(ids[0][:2]) == [0, 1] and ids[0][2] == -1


@pytest.mark.parametrize("index", INDEXES)
def test_bad_input(index):
    bank = MemoryBank(8, "cosine", index)
    bank.add(np.eye(8))
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        bank.add(np.zeros((2, 7)))
    bad = np.ones((2, 8), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="row 1 has a non-finite value at column 3"):
        bank.add(bad)
    with pytest.raises(ValueError, match="zero norm"):
        bank.add(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="unknown memory id 99"):
        bank.get(99)
    with pytest.raises(ValueError, match="unknown memory id 99"):
        bank.update(99, text="x")
    with pytest.raises(ValueError, match="unknown memory id 99"):
        bank.remove([0, 99])
    assert len(bank) == 8  # the valid id in that call was not removed either
    with pytest.raises(ValueError, match="already exists"):
        bank.add(np.ones((1, 8)), ids=[3])
    with pytest.raises(ValueError, match="given twice"):
        bank.add(np.ones((2, 8)), ids=[20, 20])
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            bank.search(np.ones(8), k)
    with pytest.raises(ValueError, match=r"queries must have shape \(n, 8\)"):
        bank.search(np.ones(9), 1)
    with pytest.raises(ValueError, match="non-finite"):
        bank.search(np.full(8, np.inf), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        bank.add(np.ones((1, 8)), values=[np.array([[np.nan]])])
    with pytest.raises(ValueError, match="JSON"):
        bank.add(np.ones((1, 8)), metadata=[{"f": object()}])
    with pytest.raises(ValueError, match="got 2 texts for 1 keys"):
        bank.add(np.ones((1, 8)), texts=["a", "b"])


def test_bad_construction():
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(0)
    with pytest.raises(ValueError, match="metric"):
        MemoryBank(4, metric="hamming")
    with pytest.raises(ValueError, match="index"):
        MemoryBank(4, index="annoy")
    with pytest.raises(ValueError, match="no parameter 'ef'"):
        MemoryBank(4, index="hnsw", ef=3)
    with pytest.raises(ValueError, match="M must be"):
        MemoryBank(4, index="hnsw", M=1)
    with pytest.raises(ValueError, match="probes"):
        MemoryBank(4, index="lsh", probes=0)


# --- persistence -------------------------------------------------------------------------

def bank_state(bank):
    ids = np.sort(bank.ids())
    return [(int(i), bank.get(i).key.tobytes(), bank.get(i).text, json.dumps(bank.get(i).metadata)) for i in ids]


@pytest.mark.parametrize("index", INDEXES)
def test_save_load_roundtrip(tmp_path, index):
    x = clustered(3000, 24, seed=7)
    bank = MemoryBank(24, "cosine", index, **({"train_size": 1000} if index == "ivf" else {}))
    ids = bank.add(x, texts=[f"t{i}" for i in range(len(x))], values=[x[i:i + 1] for i in range(len(x))])
    bank.remove(ids[::7])
    bank.update(ids[1], metadata={"edited": True})
    q = x[:50] + 0.01
    want = bank.search(q, 10)
    path = tmp_path / "bank.fmb"
    bank.save(path)
    for mmap in (False, True):
        loaded = MemoryBank.load(path, mmap=mmap)
        assert loaded.index == index and len(loaded) == len(bank)
        assert bank_state(loaded) == bank_state(bank)
        got = loaded.search(q, 10)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1])
        new = loaded.add(np.ones((1, 24)))  # keeps working after loading (copy-on-write for mmap)
        assert new[0] > ids.max()
    assert bank_state(MemoryBank.load(path)) == bank_state(bank)  # the file itself is untouched


_SAVER = r"""
import sys, numpy as np
from flashmem import MemoryBank
path = sys.argv[1]
banks = []
for seed in (1, 2):
    b = MemoryBank(32, "cosine", "hnsw")
    b.add(np.random.default_rng(seed).standard_normal((4000 * seed, 32)).astype(np.float32))
    banks.append(b)
banks[0].save(path)
print("ready", flush=True)
i = 0
while True:
    banks[i % 2].save(path)
    i += 1
"""


def test_killed_saves_leave_a_loadable_bank(tmp_path):
    """SIGKILL a process that saves two banks alternately at random moments: every load works
    and finds one of the two complete banks; the temporary files of the killed saves are removed
    by the next save. FLASHMEM_KILLS sets the count (default 10)."""
    path = str(tmp_path / "bank.fmb")
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(int(os.environ.get("FLASHMEM_KILLS", "10"))):  # tests/test_crash_safety.py
        p = subprocess.Popen([sys.executable, "-c", _SAVER, path], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        bank = MemoryBank.load(path)
        assert len(bank) in (4000, 8000)
        assert bank.search(np.ones(32), 3)[0].shape == (1, 3)
        sizes.add(len(bank))
    for f in os.listdir(tmp_path):  # leftover temporaries of killed saves are never the bank
        if f != "bank.fmb":
            assert ".tmp-" in f
    MemoryBank.load(path).save(path)  # and the next save removes them
    assert os.listdir(tmp_path) == ["bank.fmb"]


def test_corrupted_files_raise(tmp_path):
    bank = MemoryBank(16, "cosine", "hnsw")
    bank.add(clustered(500, 16), texts=["x"] * 500)
    path = tmp_path / "bank.fmb"
    bank.save(path)
    good = path.read_bytes()
    rng = np.random.default_rng(1)
    bad = tmp_path / "bad.fmb"
    for trial in range(300):
        data = bytearray(good)
        kind = trial % 3
        if kind == 0:  # flip bytes
            for pos in rng.integers(0, len(data), rng.integers(1, 8)):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 1:  # truncate
            data = data[: int(rng.integers(0, len(data)))]
        else:  # append garbage
            data += bytes(rng.integers(0, 256, rng.integers(1, 100), dtype=np.uint8))
        bad.write_bytes(bytes(data))
        with pytest.raises((ValueError, RuntimeError)):
            MemoryBank.load(bad)


def test_hostile_file_with_valid_checksum(tmp_path):
    """A file whose checksum is right but whose counts lie: refused before any huge allocation."""
    import struct

    from flashmem import _core

    bank = MemoryBank(16, "cosine", "flat")
    bank.add(clustered(10, 16))
    path = tmp_path / "bank.fmb"
    bank.save(path)
    raw = bytearray(path.read_bytes())
    payload = raw[64:]
    # payload: dim u32, metric u32, index name (u64 len + bytes), next_id i64, then the ids count
    name_len = struct.unpack_from("<Q", payload, 8)[0]
    ids_count_at = 8 + 8 + name_len + 8
    for lie in (1 << 40, 11):
        p = bytearray(payload)
        struct.pack_into("<Q", p, ids_count_at, lie)
        forged = bytearray(raw[:64])
        struct.pack_into("<Q", forged, 24, _core.bank_checksum(bytes(p)))
        (tmp_path / "forged.fmb").write_bytes(bytes(forged + p))
        with pytest.raises(ValueError, match="hostile|truncated|corrupt"):
            MemoryBank.load(tmp_path / "forged.fmb")


def test_version_1_files_load_and_future_versions_are_refused(tmp_path):
    """Version 1 had no tuning record after the index state (50 bytes when no setting is kept)."""
    import struct

    from flashmem import _core

    bank = MemoryBank(16, "cosine", "hnsw")
    x = clustered(300, 16)
    bank.add(x, texts=[str(i) for i in range(300)])
    path = tmp_path / "bank.fmb"
    bank.save(path)
    raw = path.read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == 2

    def rewrite(version, payload):
        head = bytearray(raw[:64])
        struct.pack_into("<I", head, 8, version)
        struct.pack_into("<Q", head, 16, len(payload))
        struct.pack_into("<Q", head, 24, _core.bank_checksum(bytes(payload)))
        (tmp_path / "v.fmb").write_bytes(bytes(head) + bytes(payload))
        return tmp_path / "v.fmb"

    old = MemoryBank.load(rewrite(1, raw[64:-50]))
    assert bank_state(old) == bank_state(bank) and old.get_param("target_recall") == 0.95
    np.testing.assert_array_equal(old.search(x[:20], 5)[0], bank.search(x[:20], 5)[0])
    with pytest.raises(ValueError, match="unsupported version 3.*newer flashmem"):
        MemoryBank.load(rewrite(3, raw[64:]))


def test_missing_file(tmp_path):
    with pytest.raises(RuntimeError, match="cannot open"):
        MemoryBank.load(tmp_path / "nope.fmb")


# --- threads -------------------------------------------------------------------------------

@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_concurrent_searches_and_mutations(index):
    """Four threads search while two add, update and remove entries that can never enter the
    answers (they point away from every query); every answer is checked against flat."""
    d = 32
    rng = np.random.default_rng(11)
    base = np.abs(rng.standard_normal((3000, d))).astype(np.float32)
    queries = np.abs(rng.standard_normal((100, d))).astype(np.float32)
    bank = MemoryBank(d, "cosine", index)
    bank.add(base)
    truth, _ = exact(base, queries, 10)
    errors, results = [], []
    stop = threading.Event()

    def searcher():
        try:
            while not stop.is_set():
                ids, _ = bank.search(queries, 10)
                results.append(recall(ids, truth))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def writer(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(60):
                far = -np.abs(r.standard_normal((20, d))).astype(np.float32)  # opposite orthant
                new = bank.add(far, metadata=[{"w": seed}] * 20)
                bank.update(int(new[0]), text="touched")
                bank.remove(new[:15])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    writers = [threading.Thread(target=writer, args=(s,)) for s in (1, 2)]
    for t in threads + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) >= 4
    floor = 1.0 if index == "flat" else 0.95
    assert min(results) >= floor
    assert len(bank) == 3000 + 2 * 60 * 5


# --- properties ----------------------------------------------------------------------------

ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "update"]), st.integers(0, 10 ** 6)), min_size=1,
               max_size=25)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.sampled_from(INDEXES), script=ops)
def test_random_operations_stay_consistent(tmp_path, index, script):
    """Any sequence of add/remove/update keeps the bank equal to a plain dict model of it; exact
    search over it equals numpy; save/load reproduces it."""
    d = 6
    bank = MemoryBank(d, "l2", index, **({"train_size": 8} if index == "ivf" else {}))
    model = {}
    for op, seed in script:
        r = np.random.default_rng(seed)
        if op == "add" or not model:
            keys = r.standard_normal((int(r.integers(1, 6)), d)).astype(np.float32)
            for i, k in zip(bank.add(keys, texts=[str(seed)] * len(keys)), keys):
                model[int(i)] = (k, str(seed))
        elif op == "remove":
            gone = r.choice(sorted(model), int(r.integers(1, len(model) + 1)), replace=False)
            bank.remove(gone)
            for g in gone:
                del model[int(g)]
        else:
            i = int(r.choice(sorted(model)))
            k = r.standard_normal(d).astype(np.float32)
            bank.update(i, key=k, text="u")
            model[i] = (k, "u")
    assert sorted(bank.ids()) == sorted(model)
    if not model:
        assert len(bank) == 0 and (bank.search(np.ones(d), 2)[0] == -1).all()
        return
    for i, (k, t) in model.items():
        m = bank.get(i)
        np.testing.assert_array_equal(m.key, k)
        assert m.text == t
    ids = np.array(sorted(model))
    keys = np.stack([model[i][0] for i in ids])
    q = np.random.default_rng(0).standard_normal((3, d)).astype(np.float32)
    k = min(4, len(ids))
    flat = MemoryBank(d, "l2", "flat")
    flat.add(keys, ids=ids)
    want = ids[exact(keys, q, k, "l2")[0]]
    np.testing.assert_array_equal(np.sort(flat.search(q, k)[0], axis=1), np.sort(want, axis=1))
    path = tmp_path / f"p-{index}.fmb"
    bank.save(path)
    again = MemoryBank.load(path)
    assert sorted(again.ids()) == sorted(model)
    np.testing.assert_array_equal(again.search(q, k)[0], bank.search(q, k)[0])
