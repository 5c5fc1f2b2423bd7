"""generate(): streaming, stop strings, sampling, timings; the CLI as a user runs it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import flashmem
from flashmem.sampling import Sampler


def test_stream_equals_plain(smollm2_f32):
    prompt = [{"role": "user", "content": "List three fruits."}]
    r = smollm2_f32.generate(prompt, max_new_tokens=30)
    run = smollm2_f32.generate(prompt, max_new_tokens=30, stream=True)
    pieces = list(run)
    assert "".join(pieces) == r.text == run.result.text
    assert run.result.token_ids == r.token_ids
    assert len(pieces) > 3


def test_stop_string_truncates(smollm2_f32):
    full = smollm2_f32.generate("The capital of France is", max_new_tokens=30)
    word = full.text.strip().split()[1]
    r = smollm2_f32.generate("The capital of France is", max_new_tokens=30, stop=[word])
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.index(word)]
    streamed = "".join(smollm2_f32.generate("The capital of France is", max_new_tokens=30, stop=[word], stream=True))
    assert streamed == r.text


def test_max_new_tokens_and_timings(smollm2_f32):
    r = smollm2_f32.generate("Once upon a time", max_new_tokens=7, eos_token_id=[])
    assert r.finish_reason == "length" and len(r.token_ids) == 7
    assert r.time_to_first_token_s > 0 and r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0


def test_seeded_sampling_is_reproducible(smollm2_f32):
    """The same seed draws the same tokens from the same logits. Each run starts afresh
    (reuse_cache=False): a run that reuses the previous one's KV cache recomputes the prompt's last
    token alone, whose f32 logits differ from the whole prompt's pass in the last bits (about 1e-5
    here), and a draw near the edge of the top-p nucleus can then go the other way."""
    kw = dict(max_new_tokens=20, temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=7, eos_token_id=[],
              reuse_cache=False)
    a = smollm2_f32.generate("In the forest", **kw)
    b = smollm2_f32.generate("In the forest", **kw)
    c = smollm2_f32.generate("In the forest", **{**kw, "seed": 8})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("vocab", [1, 7, 50, 1001])
@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.8),
                                    dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.9),
                                    dict(temperature=1.0, min_p=0.1), dict(temperature=2.0, top_k=40, top_p=0.6, min_p=0.02,
                                                                           repetition_penalty=1.3)])
def test_core_sampler_matches_the_reference(vocab, params):
    """The engine's sampler (csrc/model/sampler.cpp) against the numpy reference: greedy picks the
    same token; sampling draws only tokens the reference allows, at its frequencies (4,000 draws;
    the flat 1,001-token case makes top-p sort past its first prefixes)."""
    from flashmem.sampling import core_sampler

    rng = np.random.default_rng(vocab)
    logits = (rng.standard_normal(vocab) * (0.3 if vocab == 1001 else 2.0)).astype(np.float32)
    history = rng.integers(0, vocab, 4).tolist()
    ref = Sampler(**params)
    core = core_sampler(**params, seed=11)
    core.begin(np.asarray(history, np.int32), vocab)
    if params["temperature"] == 0.0:
        assert core.sample(logits) == ref(logits, history)
        return
    p = ref.probs(logits, history)
    draws = []
    for _ in range(4000):
        core.begin(np.asarray(history, np.int32), vocab)  # the same history for every draw
        draws.append(core.sample(logits))
    freq = np.bincount(draws, minlength=vocab) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p))
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / len(draws)) + 1e-9


def test_core_sampler_seeds_and_errors():
    from flashmem.sampling import core_sampler

    logits = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    draw = lambda seed: [core_sampler(temperature=1.0, seed=seed).sample(logits) for _ in range(1)] + \
        [s.sample(logits) for s in [core_sampler(temperature=1.0, seed=seed)] for _ in range(20)]
    assert draw(5) == draw(5) and draw(5) != draw(6)
    for bad, match in ((dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(min_p=1.0), "min_p"),
                       (dict(top_k=-2), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
                       (dict(seed=-3), "seed"), (dict(temperature=float("nan")), "temperature")):
        with pytest.raises(ValueError, match=match):
            core_sampler(**bad)
    s = core_sampler(repetition_penalty=1.5)
    with pytest.raises(ValueError, match="history token 300 out of range"):
        s.begin(np.asarray([1, 300], np.int32), 300)


def test_sampler_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = lambda s: {s(logits, []) for _ in range(300)}
    assert draws(Sampler(temperature=1.0, top_k=2, seed=0)) == {0, 1}
    assert draws(Sampler(temperature=1.0, top_p=0.7, seed=0)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert draws(Sampler(temperature=1.0, min_p=0.5, seed=0)) == {0, 1}  # p >= 0.25
    assert draws(Sampler(temperature=1.0, seed=0)) == {0, 1, 2, 3}
    # repetition penalty (HF rule): positive logits divided, negative multiplied
    s = Sampler(repetition_penalty=2.0)
    assert s(np.array([1.0, 0.9, -3.0]), [0]) == 1


def test_eos_token_id_override(smollm2_f32):
    r = smollm2_f32.generate("The capital of France is", max_new_tokens=40)
    first = r.token_ids[0]
    r2 = smollm2_f32.generate("The capital of France is", max_new_tokens=40, eos_token_id=first)
    assert r2.token_ids == [first] and r2.finish_reason == "stop" and r2.text == ""


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flashmem.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_generate_info_convert(smollm2_gguf, tmp_path):
    out = tmp_path / "conv"
    r = _cli("convert", smollm2_gguf, str(out), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["flashmem"]["dtype"] == "bf16" and cfg["flashmem"]["ffn"]["stride"] * 2 % 4096 == 0
    r = _cli("generate", str(out), "-p", "The capital of France is", "-n", "12", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "decode" in r.stderr
    r = _cli("info", str(out))
    info = json.loads(r.stdout)
    assert info["layers"] == 30 and info["d_model"] == 576 and info["dtype"] == "bf16"
    r = _cli("generate", str(tmp_path / "missing"), "-p", "x")
    assert r.returncode == 2 and "error" in r.stderr and "missing" in r.stderr


def test_cli_chat(smollm2_gguf, tmp_path):
    p = subprocess.run([sys.executable, "-m", "flashmem.cli", "chat", smollm2_gguf, "-n", "16", "--threads", "2"],
                       input="What is the capital of France? Answer in one word.\n\n", capture_output=True, text=True, timeout=600,
                       env={**os.environ, "FLASHMEM_CACHE": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_bundle_file_layout(smollm2_gguf, smollm2_f32):
    """Every neuron bundle starts at a 4096-byte file offset and holds [gate | up | down column]."""
    from flashmem.checkpoints.safetensors_io import read_header, load_tensor
    from flashmem.checkpoints.gguf_file import GGUFSource

    path = os.path.join(smollm2_f32.path, "ffn_bundles.safetensors")
    infos, meta = read_header(path)
    assert meta["layout"] == "gate_up_down"
    src = GGUFSource(smollm2_gguf)
    for l in (0, 29):
        info = infos[f"model.layers.{l}.mlp.bundles"]
        assert info.offset % 4096 == 0 and (info.shape[1] * 4) % 4096 == 0
        b = load_tensor(path, info)
        np.testing.assert_array_equal(b[:, :576], src.tensor(f"model.layers.{l}.mlp.gate_proj.weight"))
        np.testing.assert_array_equal(b[:, 576:1152], src.tensor(f"model.layers.{l}.mlp.up_proj.weight"))
        np.testing.assert_array_equal(b[:, 1152:1728], src.tensor(f"model.layers.{l}.mlp.down_proj.weight").T)
        assert not b[:, 1728:].any()
