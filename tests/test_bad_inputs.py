"""Bad input raises a Python exception naming the file, tensor or argument; never a crash."""
import json
import os
import shutil
import struct

import numpy as np
import pytest

import flashmem
from flashmem import _core

from conftest import make_tiny_hf


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny HF folder and its flashmem conversion."""
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    hf = str(tmp_path / "hf")
    make_tiny_hf(hf)
    conv = flashmem.convert(hf, str(tmp_path / "conv"), dtype="f16", progress=False)
    return hf, conv


def copy_of(folder, dest):
    shutil.copytree(folder, dest)
    return str(dest)


def rewrite_header(path, edit):
    """Applies edit(header_dict) to a safetensors file's header, keeping the data bytes."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        flashmem.load(str(tmp_path / "nowhere"))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="config.json"):
        flashmem.load(str(tmp_path / "empty"))


@pytest.mark.parametrize("fname", ["model.safetensors", "ffn_bundles.safetensors"])
def test_truncated_weight_file(tiny, tmp_path, fname):
    conv = copy_of(tiny[1], tmp_path / "trunc")
    path = os.path.join(conv, fname)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(ValueError, match=f"{fname}.*truncated"):
        flashmem.load(conv)


def test_file_shorter_than_its_header(tiny, tmp_path):
    conv = copy_of(tiny[1], tmp_path / "short")
    with open(os.path.join(conv, "model.safetensors"), "r+b") as f:
        f.truncate(5)
    with pytest.raises(ValueError, match="too short"):
        flashmem.load(conv)


def test_header_lies_about_sizes(tiny, tmp_path):
    conv = copy_of(tiny[1], tmp_path / "lies")

    def edit(h):
        h["model.norm.weight"]["shape"] = [4000]

    rewrite_header(os.path.join(conv, "model.safetensors"), edit)
    with pytest.raises(ValueError, match="model.norm.weight.*lies"):
        flashmem.load(conv)


def test_header_length_impossible(tiny, tmp_path):
    conv = copy_of(tiny[1], tmp_path / "huge")
    path = os.path.join(conv, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 62))
    with pytest.raises(ValueError, match="header length"):
        flashmem.load(conv)


def test_header_not_json(tiny, tmp_path):
    conv = copy_of(tiny[1], tmp_path / "garbage")
    path = os.path.join(conv, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe{{{{")
    with pytest.raises(ValueError, match="not valid JSON"):
        flashmem.load(conv)


def test_wrong_tensor_shape_in_converted_folder(tiny, tmp_path):
    """A header that is self-consistent but disagrees with config.json: the engine names the tensor."""
    conv = copy_of(tiny[1], tmp_path / "shape")

    def edit(h):  # swap the shapes of q_proj (40x40) into (20x80): same bytes, wrong shape
        h["model.layers.1.self_attn.q_proj.weight"]["shape"] = [20, 80]

    rewrite_header(os.path.join(conv, "model.safetensors"), edit)
    with pytest.raises(ValueError, match=r"wq' of layer 1.*expected shape \(40, 40\), got \(20, 80\)"):
        flashmem.load(conv)


def test_hf_folder_with_mismatched_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMEM_CACHE", str(tmp_path / "cache"))
    hf = str(tmp_path / "hf")
    make_tiny_hf(hf)
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 80
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"gate_proj.weight' has shape \(72, 40\), expected \(80, 40\)"):
        flashmem.load(hf)
    assert not os.listdir(str(tmp_path / "cache" / "models"))  # no half-written conversion left behind


def test_unsupported_model_type(tmp_path):
    hf = str(tmp_path / "hf")
    make_tiny_hf(hf)
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt_neox"
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="gpt_neox.*not supported"):
        flashmem.convert(hf, str(tmp_path / "out"))


def _gguf(path, arch="llama", tensor_type=None):
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_embedding_length(32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    else:
        qt = getattr(gguf.GGMLQuantizationType, tensor_type)
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        w.add_tensor("token_embd.weight", np.zeros((8, 32 // bs * ts), np.uint8), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unsupported_architecture(tmp_path):
    p = str(tmp_path / "m.gguf")
    _gguf(p, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        flashmem.load(p)


def test_gguf_unsupported_tensor_type(tmp_path):
    p = str(tmp_path / "m.gguf")
    _gguf(p, tensor_type="IQ4_NL")
    with pytest.raises(ValueError, match="token_embd.weight' has type IQ4_NL"):
        flashmem.load(p)


def test_gguf_truncated(tmp_path, smollm2_gguf):
    p = str(tmp_path / "cut.gguf")
    with open(smollm2_gguf, "rb") as src, open(p, "wb") as dst:
        dst.write(src.read(5_000_000))
    with pytest.raises(ValueError, match="cut.gguf"):
        flashmem.load(p)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "noise.gguf"
    p.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="noise.gguf"):
        flashmem.load(str(p))


def test_converted_dtype_mismatch(tiny):
    with pytest.raises(ValueError, match="converted with dtype f16"):
        flashmem.load(tiny[1], dtype="f32")


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="q4"), "dtype"), (dict(threads=0), "threads"), (dict(max_context=0), "max_context"),
    (dict(max_context=1.5), "max_context"),
])
def test_bad_load_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        flashmem.load(tiny[1], **kw)


@pytest.fixture
def model(tiny):
    return flashmem.load(tiny[1], threads=2, max_context=16)


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match="max_context 16"):
        model.generate(list(range(2, 20)), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_context 16"):
        model.logits(list(range(2, 20)))


def test_generation_stops_at_context_end(model):
    r = model.generate(list(range(2, 14)), max_new_tokens=50, eos_token_id=[])
    assert r.finish_reason == "length" and len(r.token_ids) == 16 - 12


@pytest.mark.parametrize("ids", [[5, 97], [-1, 3], [1 << 40]])
def test_token_ids_out_of_range(model, ids):
    with pytest.raises((ValueError, OverflowError), match="out of range|too large|int"):
        model.generate(ids, max_new_tokens=2)


def test_engine_rejects_bad_ids_and_positions(model):
    eng = model._engine
    with pytest.raises(ValueError, match="token id 97 at position 1"):
        eng.forward(np.asarray([3, 97], np.int32), 0)
    with pytest.raises(ValueError, match="start_pos 5"):
        eng.forward(np.asarray([3], np.int32), 5)  # nothing cached yet
    src = np.asarray([-1, -2], np.int32)
    with pytest.raises(ValueError, match="width 40"):
        eng.forward_inputs(src, np.zeros((2, 39), np.float32), 0)
    bad = np.zeros((2, 40), np.float32)
    bad[1, 7] = np.nan
    with pytest.raises(ValueError, match="non-finite value at row 1, column 7"):
        eng.forward_inputs(src, bad, 0)
    with pytest.raises(ValueError, match="embedding row 2 of 2"):
        eng.forward_inputs(np.asarray([-3], np.int32), np.zeros((2, 40), np.float32), 0)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_parameters(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model.generate([3, 4, 5], **kw)


def test_bad_prompt_types(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate("", max_new_tokens=2)
    with pytest.raises(TypeError, match="prompt"):
        model.generate(3.5, max_new_tokens=2)
    with pytest.raises(ValueError, match="chat template"):  # the tiny tokenizer has none
        model.generate([{"role": "user", "content": "w3"}], max_new_tokens=2)


def test_engine_survives_errors(model):
    """After each rejected call the engine still answers correctly."""
    ref = model.logits([3, 4, 5])
    for bad in ([3, 200], [-5]):
        with pytest.raises(ValueError):
            model.logits(bad)
    np.testing.assert_array_equal(model.logits([3, 4, 5]), ref)


def test_convert_refuses_non_empty_output(tiny, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        flashmem.convert(tiny[0], str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_native_load_tensor_checks(tiny):
    m = flashmem.load(tiny[1], threads=1, max_context=8)
    with pytest.raises(ValueError, match="unknown tensor kind 'wz'"):
        m._engine.load_tensor("wz", 0, os.path.join(tiny[1], "model.safetensors"), 8, "f16", [40, 40])
    with pytest.raises(ValueError, match="layer index 9"):
        m._engine.load_tensor("wq", 9, os.path.join(tiny[1], "model.safetensors"), 8, "f16", [40, 40])
    with pytest.raises(RuntimeError, match="cannot open"):
        m._engine.load_tensor("wq", 0, "/nonexistent/file", 8, "f16", [40, 40])
    with pytest.raises(RuntimeError, match="truncated"):
        m._engine.load_tensor("wq", 0, os.path.join(tiny[1], "config.json"), 0, "f16", [40, 40])


def test_kernel_cpu_features():
    assert _core.isa() in ("avx2", "avx512")


def test_forward_before_weights_are_loaded(tiny):
    """An engine whose weights were never loaded refuses to run, with an error, not a crash."""
    from flashmem.checkpoints.config import read_json
    from flashmem.loading import engine_config

    cfg = read_json(os.path.join(tiny[1], "config.json"))
    engine = _core.Model(engine_config(cfg, "config.json", 16), 1)
    with pytest.raises(ValueError, match="not loaded"):
        engine.forward(np.asarray([1, 2], np.int32), 0)


def test_tensor_missing_from_the_schema(tiny, tmp_path):
    """A folder whose model.safetensors lacks a tensor the weight schema (Config.schema) needs:
    the error names it, its layer and shape, before anything is loaded."""
    _, conv = tiny
    bad = copy_of(conv, tmp_path / "bad")
    rewrite_header(os.path.join(bad, "model.safetensors"),
                   lambda h: h.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"tensor 'wk' of layer 1 \(shape \(20, 40\)\) is missing from .*model.safetensors"):
        flashmem.load(bad)
    c = _core.Config()
    c.vocab_size, c.d_model, c.d_ff, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim = 97, 40, 72, 2, 4, 2, 10
    kinds = [k for k, layer, _ in c.schema("bundles") if layer == 0]
    assert kinds == ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "ffn_bundles"]
    with pytest.raises(ValueError, match="ffn must be 'bundles', 'matrices'"):
        c.schema("dense")
    for kind, layer, _ in c.schema("bundles") + c.schema("matrices"):  # one name table, in the engine
        assert _core.tensor_kind(_core.tensor_name(kind, layer)) == (kind, layer)
    for name in ("model.layers.1.mlp.gate", "model.layers.one.mlp.bundles", "model.embed_tokens"):
        with pytest.raises(ValueError, match=f"unexpected tensor '{name}'"):
            _core.tensor_kind(name)
    with pytest.raises(ValueError, match="unknown tensor kind 'ffn_gates'"):
        _core.tensor_name("ffn_gates", 0)


def test_sparse_options_and_file_layout_are_checked_in_the_engine(tiny):
    """SparseOptions and FileLayout are validated once, in C++: each bad field is named, whether
    it comes through flashmem.load or straight to the engine."""
    from flashmem.checkpoints.config import read_json
    from flashmem.flash.streaming import layout, sparse_options
    from flashmem.loading import engine_config

    for field, value, match in [("sparsity", 1.0, r"SparseOptions\.sparsity must lie in \[0, 1\)"),
                                ("window", -2, r"SparseOptions\.window must be >= 0"),
                                ("queue_depth", 0, r"SparseOptions\.queue_depth must lie in \[1, 4096\]"),
                                ("max_request", 5000, r"SparseOptions\.max_request must be a multiple of 4096"),
                                ("cache_rows", -5, r"SparseOptions\.cache_rows must be >= 0"),
                                ("coalesce_gap", -1, r"SparseOptions\.coalesce_gap must be >= 0"),
                                ("read_ahead", -2, r"SparseOptions\.read_ahead must be >= 0"),
                                ("staging_rows", -1, r"SparseOptions\.staging_rows must be >= 0"),
                                ("eviction", "fifo", r"SparseOptions\.eviction must be 'lru' or 'hot'"),
                                ("window", 2.5, r"SparseOptions\.window must be a int"),
                                ("sparsity", True, r"SparseOptions\.sparsity must be a float")]:
        with pytest.raises(ValueError, match=match):
            sparse_options(**{field: value})
    with pytest.raises(ValueError, match=r"SparseOptions\.window must be >= 0"):
        flashmem.load(tiny[1], offload="flash", window=-1)

    _, conv = tiny
    cfg = read_json(os.path.join(conv, "config.json"))
    good = layout(conv, cfg)
    n_layers, bundle = cfg["num_hidden_layers"], good.piece_bytes[0]
    good.validate(n_layers, bundle)
    assert good.n_pieces == 1

    def broken(**fields):
        bad = layout(conv, cfg)
        for name, value in fields.items():
            setattr(bad, name, value)
        return bad

    cases = [(broken(piece_bytes=[bundle] * 4, piece_stride=[bundle] * 4),
              r"FileLayout\.piece_bytes: a neuron has 1 to 3 pieces"),
             (broken(piece_stride=[bundle - 1]), r"FileLayout\.piece_stride\[0\] .* is shorter than the piece"),
             (broken(piece_bytes=[bundle - 2]), r"FileLayout\.piece_bytes: a neuron's pieces .* take"),
             (broken(piece_base=good.piece_base[:1]), r"FileLayout\.piece_base: 1 layers, the model has 2"),
             (broken(piece_stride=[bundle, bundle]), r"FileLayout\.piece_stride: 2 strides for 1 pieces"),
             (broken(path=""), r"FileLayout\.path: no file named")]
    opts = sparse_options()
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            bad.validate(n_layers, bundle)
        engine = _core.Model(engine_config(cfg, "config.json", 16), 1)
        with pytest.raises(ValueError, match=match):
            engine.configure_sparse("flash", opts, 0, False, bad)
    engine = _core.Model(engine_config(cfg, "config.json", 16), 1)
    with pytest.raises(ValueError, match="offload to flash needs the bundle file's FileLayout"):
        engine.configure_sparse("flash", opts)
    with pytest.raises(ValueError, match="a FileLayout is for source 'flash' only"):
        engine.configure_sparse("dram", opts, 0, False, good)
