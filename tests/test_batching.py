"""Batched generation (batching.py, Model.forward_batch): several sequences in their own KV slots,
decoded together, give what each gives alone. The real SmolLM2 (Q4_1 blocks, greedy), in DRAM
and streamed from flash; errors named; slots freed and reused."""
from __future__ import annotations

import numpy as np
import pytest

import flashmem
from flashmem.batching import BatchRunner

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           [{"role": "user", "content": "Name a colour."}], "Water boils at", [1, 504, 3458, 282, 1345, 314]]


@pytest.fixture(scope="module")
def model(smollm2_gguf):
    return flashmem.load(smollm2_gguf, threads=2, max_context=256, max_batch=4)


@pytest.fixture(scope="module")
def singles(model):
    """Each prompt alone, greedy."""
    return [model.generate(p, max_new_tokens=20).text for p in PROMPTS]


def test_forward_batch_logits_equal_one_sequence_at_a_time(model):
    """Logits of a batch step at odd sizes (1, 3, 4), sequences at different positions, against the
    same tokens run one sequence at a time."""
    eng = model._engine
    ids = [model.encode_prompt(p) for p in PROMPTS[:4]]
    nxt = [11, 2034, 17, 905]
    ref = []
    for p, t in zip(ids, nxt):
        eng.forward(np.asarray(p, np.int32), 0, False, 0)
        ref.append(eng.forward(np.asarray([t], np.int32), len(p), False, 0))
    for batch in ([2], [0, 1, 3], [3, 2, 1, 0]):
        for b in batch:
            eng.forward(np.asarray(ids[b], np.int32), 0, False, b)
        out = eng.forward_batch(np.asarray([nxt[b] for b in batch], np.int32), np.asarray(batch, np.int32),
                                np.asarray([len(ids[b]) for b in batch], np.int32))
        assert out.shape == (len(batch), model.vocab_size)
        for row, b in enumerate(batch):
            np.testing.assert_allclose(out[row], ref[b], rtol=0, atol=2e-3 * np.abs(ref[b]).max())
            assert int(np.argmax(out[row])) == int(np.argmax(ref[b]))
            assert eng.slot_length(b) == len(ids[b]) + 1


def test_generate_list_equals_each_alone(model, singles):
    """Six prompts (text, chat, token ids) over four slots: the last two join as others finish."""
    results = model.generate(PROMPTS, max_new_tokens=20)
    assert [r.text for r in results] == singles
    assert all(r.finish_reason in ("stop", "length") and r.prompt_tokens > 0 for r in results)


def test_stream_yields_index_and_piece(model, singles):
    stream = model.generate(PROMPTS, max_new_tokens=20, stream=True)
    texts = [""] * len(PROMPTS)
    order = []
    for i, piece in stream:
        texts[i] += piece
        order.append(i)
    assert texts == singles
    assert [r.text for r in stream.results] == singles
    assert len(set(order[:8])) > 1  # interleaved, not one prompt after another


def test_own_stop_conditions_and_early_finish(model, singles):
    """Per-prompt budgets end sequences early; the others go on to their own end."""
    runner = BatchRunner(model)
    reqs = [runner.submit(p, max_new_tokens=n) for p, n in zip(PROMPTS[:4], (3, 20, 1, 20))]
    sizes = []
    while runner.pending():
        runner.step()
        sizes.append(len(runner._active))
    assert [r.completion_tokens for r in reqs][0::2] == [3, 1]
    assert reqs[1].text == singles[1] and reqs[3].text == singles[3]
    assert max(sizes) <= 4 and sizes[-1] == 0
    stop = singles[1].split()[2]
    r = model.generate([PROMPTS[1], PROMPTS[2]], max_new_tokens=20, stop=[stop])
    assert r[0].text == singles[1][:singles[1].index(stop)] and r[0].finish_reason == "stop"


def test_more_requests_than_slots_and_cancel(model, singles):
    runner = BatchRunner(model, max_batch=2)
    reqs = [runner.submit(p, max_new_tokens=20) for p in PROMPTS]
    events = []
    for _ in range(3):
        events += runner.step()
    runner.cancel(reqs[0])
    runner.cancel(reqs[5])  # still waiting
    while runner.pending():
        active = len(runner._active)
        assert active <= 2
        events += runner.step()
    assert reqs[0].finish_reason == reqs[5].finish_reason == "cancelled"
    assert [r.text for r in reqs[1:5]] == singles[1:5]
    done = [r for r, _, d in events if d]
    assert sorted(r.id for r in done) == sorted(r.id for r in reqs)  # one last event each
    assert not model._held


def test_a_slot_keeps_its_prefix_for_the_next_turn(model):
    chat = [{"role": "user", "content": "Name a fruit."}]
    first = model.generate([chat], max_new_tokens=8)[0]
    follow = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a vegetable?"}]
    second = model.generate([follow, "Hello"], max_new_tokens=8)[0]
    assert second.cached_tokens > first.prompt_tokens // 2
    assert second.text == model.generate(follow, max_new_tokens=8, reuse_cache=False).text


def test_memory_injection_per_prompt(model):
    bank = flashmem.MemoryBank(model.d_model)
    for fact in ("Jana lives in Kyoto.", "Omar's cat is called Pixel."):
        bank.add_text(model, fact)
    asks = [[{"role": "user", "content": "Where does Jana live?"}], [{"role": "user", "content": "What is Omar's cat called?"}],
            "The capital of France is"]
    alone = [model.generate(a, max_new_tokens=12, memory=bank) for a in asks]
    batch = model.generate(asks, max_new_tokens=12, memory=bank)
    assert [r.text for r in batch] == [r.text for r in alone]
    assert [[m["id"] for m in r.memories] for r in batch] == [[m["id"] for m in r.memories] for r in alone]
    assert [[m["text"] for m in r.memories] for r in batch] == [["Jana lives in Kyoto."], ["Omar's cat is called Pixel."], []]


def test_single_calls_use_free_slots_while_a_runner_holds_others(model, singles):
    runner = BatchRunner(model, max_batch=3)
    reqs = [runner.submit(p, max_new_tokens=20) for p in PROMPTS[:3]]
    runner.step()
    assert model.generate(PROMPTS[4], max_new_tokens=20).text == singles[4]  # in slot 3
    assert np.isfinite(model.perplexity("The quick brown fox jumps over the lazy dog."))
    while runner.pending():
        runner.step()
    assert [r.text for r in reqs] == singles[:3]
    full = BatchRunner(model)
    held = [full.submit(p, max_new_tokens=20) for p in PROMPTS[:4]]
    full.step()
    with pytest.raises(RuntimeError, match="KV-cache slots hold a BatchRunner"):
        model.generate("Hi", max_new_tokens=2)
    for r in held:
        full.cancel(r)
    full.step()
    assert model.generate(PROMPTS[4], max_new_tokens=20).text == singles[4]


def test_bad_batches_are_named(model):
    eng = model._engine
    one = np.asarray([5], np.int32)
    eng.forward(np.asarray([1, 2, 3], np.int32), 0, False, 1)
    with pytest.raises(ValueError, match="slot 4 out of range"):
        eng.forward_batch(one, np.asarray([4], np.int32), np.asarray([0], np.int32))
    with pytest.raises(ValueError, match="slot 1 appears twice"):
        eng.forward_batch(np.asarray([5, 6], np.int32), np.asarray([1, 1], np.int32), np.asarray([3, 3], np.int32))
    with pytest.raises(ValueError, match="position 9 of slot 1 must lie in"):
        eng.forward_batch(one, np.asarray([1], np.int32), np.asarray([9], np.int32))
    with pytest.raises(ValueError, match="token id 99999"):
        eng.forward_batch(np.asarray([99999], np.int32), np.asarray([1], np.int32), np.asarray([3], np.int32))
    with pytest.raises(ValueError, match="same length"):
        eng.forward_batch(one, np.asarray([1, 2], np.int32), np.asarray([3], np.int32))
    with pytest.raises(ValueError, match="runs 1 to"):
        eng.forward_batch(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="slot 7 out of range"):
        eng.forward(one, 0, False, 7)
    assert eng.slot_length(1) == 3  # nothing was run
    runner = BatchRunner(model)
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature="hot"), "temperature"),
                       (dict(stop=[""]), "stop"), (dict(seed=-1), "seed"), (dict(eos_token_id=10**9), "eos_token_id"),
                       (dict(memory_position="middle"), "memory_position")):
        with pytest.raises(ValueError, match=match):
            runner.submit("Hi", **bad)
    with pytest.raises(ValueError, match="max_context"):
        runner.submit("word " * 300)
    with pytest.raises(ValueError, match="max_batch must be an integer in"):
        BatchRunner(model, max_batch=9)
    with pytest.raises(ValueError, match="max_batch must be an integer in"):
        flashmem.load(model.path, max_batch=0)
    with pytest.raises(ValueError, match="inputs_embeds goes with one prompt"):
        model.generate(["a", "b"], inputs_embeds=np.zeros((2, model.d_model), np.float32))
    assert runner.pending() == 0


def test_flash_offloaded_batch_equals_each_alone(smollm2_f32):
    """Streaming the FFN from flash (exact: sparsity 0), one read of the batch's neurons per layer."""
    model = flashmem.load(smollm2_f32.path, threads=2, max_context=256, max_batch=4, offload="flash",
                          dram_budget="600MB")
    alone = [model.generate(p, max_new_tokens=12).text for p in PROMPTS[:4]]
    model._engine.reset_sparse_stats()
    assert [r.text for r in model.generate(PROMPTS[:4], max_new_tokens=12)] == alone
    assert model.flash_stats()["tokens"] > 0


def test_prefix_identity_is_kept_by_the_kv_cache(model):
    """Each slot records what each held position holds (token id, or an input embedding's
    identity); rewinding or a new sequence drops what lies past it; -1 never matches."""
    eng = model._engine
    ids = np.asarray(model.encode_prompt("The capital of France is"), np.int32)
    eng.forward(ids, 0, False, 2)
    assert eng.reusable(ids.astype(np.int64), 2) == len(ids)
    assert eng.reusable(ids.astype(np.int64), 3) == 0
    other = ids.astype(np.int64).copy()
    other[3] = 7
    assert eng.reusable(other, 2) == 3
    eng.forward(ids[2:4], 2, False, 2)  # rewound: positions past 4 are gone
    assert eng.slot_length(2) == 4 and eng.reusable(ids.astype(np.int64), 2) == 4
    emb = model.input_embeddings([5, 6])
    src = np.asarray([ids[0], -1, -2, ids[1]], np.int32)
    eng.forward_inputs(src, emb, 0, False, 2, np.asarray([-9, -12], np.int64))
    assert eng.reusable(np.asarray([ids[0], -9, -12, ids[1], 1], np.int64), 2) == 4
    assert eng.reusable(np.asarray([ids[0], -9, -13], np.int64), 2) == 2
    eng.forward_inputs(src, emb, 0, False, 2)  # no identities for the rows: unknown, never reused
    assert eng.reusable(np.asarray([ids[0], -1, -1], np.int64), 2) == 1
    with pytest.raises(ValueError, match="identity is <= -2"):
        eng.forward_inputs(src, emb, 0, False, 2, np.asarray([5, -12], np.int64))
    eng.forward_batch(np.asarray([9], np.int32), np.asarray([2], np.int32), np.asarray([1], np.int32))
    assert eng.slot_length(2) == 2 and eng.reusable(np.asarray([ids[0], 9], np.int64), 2) == 2
