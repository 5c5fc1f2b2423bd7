"""GGUF tokenizers rebuilt by flashmem (checkpoints/gguf_tokenizer.py, the `tokenizers` library
alone) against HF transformers' GGUF loader (AutoTokenizer.from_pretrained(dir, gguf_file=...)):
the same ids on a varied text set, decode round trips, and llama.cpp's tokenizer for comparison
(where llama.cpp and HF disagree it is reported as a warning, not failed).

Files: Gemma 3 270M (SentencePiece, 262k tokens, no merges in the file, no chat template),
SmolLM2 (byte-level BPE), and a llama-architecture SentencePiece vocabulary written here from
Gemma's tokens (Llama 2's pipeline: prefix space, merges ordered by score)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from functools import lru_cache

import numpy as np
import pytest

from conftest import gemma3_gguf, shared_data

SHAKESPEARE = shared_data("tinyshakespeare.txt").read_text(encoding="utf-8")

CODE = '''import os


class Cache:
    """An LRU cache."""

    def __init__(self, size: int = 128):
        self.size = size
        self.items = {}  # key -> value

    def get(self, key):
        if key in self.items:
\t\treturn self.items[key]
        for k, v in sorted(self.items.items(), key=lambda kv: -kv[1]):
            if v > 0x1F and k != "x":
                print(f"{k!r:>10} = {v:08.3f}")
        return None
'''

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it? \"Yes\", she said.",
    "accents": "Café naïve façade — résumé, jalapeño, Ångström, Straße, Œuvre, ÉCOLE, crème brûlée.",
    "cjk": "東京は日本の首都です。我爱自然语言处理。한국어 텍스트도 있습니다. 「引用」と（括弧）",
    "emoji": "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ✨🔥 ❤️ 🫠",
    "rtl": "مرحبا بالعالم، كيف حالك؟ — שלום עולם! mixed عربي and English",
    "rare": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ⅷ ∮ E⋅da = Q, ⟨ψ|φ⟩ ∑ᵢ xᵢ² zero\u200bwidth nb\u00a0space soft\u00adhyphen \ufeffbom \U0010fffd",
    "control_chars": "bell\x07 esc\x1b[31m nul\x00 del\x7f",
    "spaces": "a  b   c    d     e      f                                g",
    "only_spaces": "      ",
    "one_space": " ",
    "empty": "",
    "leading": "   leading spaces",
    "trailing": "trailing spaces   ",
    "both_ends": "  both  ",
    "newlines": "\n\n\nthree newlines\n\nthen two\nthen one" + "\n" * 34,
    "space_newline": "line \n next  \n\n  indented \r\n windows\r\n",
    "tabs": "word\t\ttab\tend\n\t\t\tindented with tabs\t \t",
    "digits": "1234567890 3.14159265358979 1,000,000 -42 0x1F 2024-06-01 12:30:45 1e-9 ½ ²",
    "long_number": "12345678901234567890123456789012345678901234567890 and 00000000000000000007",
    "code": CODE,
    "url": "See https://example.com/path/to?q=1&r=two#frag or mail me@example.org (v1.2.3).",
    "metaspace_char": "under\u2581score and \u2581\u2581 two, \u2581leading",
    "gemma_specials": "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\nHi<end_of_turn>",
    "bos_inside": "<bos>text<bos> more <bos><eos><pad><unk><mask> <s>Llama's</s>",
    "special_glued": "x<end_of_turn>y <start_of_turn>z<start_of_turn><end_of_turn>",
    "special_partial": "<start_of_turn <end_of_turn> <start_of_image><unused0> [multimodal] <bos",
    "smollm_specials": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|endoftext|><repo_name>",
    "shakespeare_head": SHAKESPEARE[:4096],
    "shakespeare_mid": SHAKESPEARE[500_000:503_000],
}

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "  And 3+3?  "}]


@lru_cache(maxsize=4)
def gguf_fields(path: str) -> tuple[dict, str]:
    """The file's tokenizer.* metadata and general.architecture, read as GGUFSource reads them
    (once: the gguf package takes ~20 s over Gemma's 262k tokens)."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return fields, reader.fields["general.architecture"].contents()


def write_llama_spm(path: str, gemma_path: str, add_space_prefix: bool | None = None) -> None:
    """A vocabulary-only llama-architecture GGUF with a SentencePiece tokenizer as Llama 2 files have:
    Gemma's vocabulary cut to its first 32000 tokens (control, bytes, the best merges) plus every
    single-character token, with the file's scores and no merges. Its user-defined tokens (runs of
    newlines, spaces, tabs) become normal ones, as Llama 2 has none."""
    import gguf

    fields, _ = gguf_fields(gemma_path)
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    keep = [i for i, t in enumerate(tokens) if i < 32000 or len(t) == 1]
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(512)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(keep))
    w.add_tokenizer_model("llama")
    w.add_token_list([tokens[i] for i in keep])
    w.add_token_scores([scores[i] for i in keep])
    w.add_token_types([1 if types[i] == 4 else types[i] for i in keep])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.add_tensor("token_embd.weight", np.zeros((len(keep), 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Case:
    """One GGUF file: our tokenizer and config built from its metadata (and how long that took)."""

    def __init__(self, name: str, path: str):
        from flashmem.checkpoints.gguf_tokenizer import tokenizer_from_gguf

        self.name, self.path = name, path
        self.fields, self.architecture = gguf_fields(path)
        t = time.perf_counter()
        self.tok, self.config = tokenizer_from_gguf(self.fields, path, self.architecture)
        self.build_s = time.perf_counter() - t
        self._hf = None

    @property
    def hf(self):
        """HF transformers' tokenizer from the same file."""
        if self._hf is None:
            transformers = pytest.importorskip("transformers")
            d, f = os.path.split(self.path)
            self._hf = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        return self._hf

    def texts(self) -> dict[str, str]:
        """TEXTS plus the chat prompt rendered with the config's template, when there is one."""
        from flashmem.tokenizer import _compile

        texts = dict(TEXTS)
        if self.config.get("chat_template"):
            texts["chat_prompt"] = _compile(self.config["chat_template"]).render(
                messages=CHAT, add_generation_prompt=True, bos_token=self.config.get("bos_token", ""),
                eos_token=self.config.get("eos_token", ""))
        return texts


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module", params=["gemma3", "smollm2", "llama_spm"])
def case(request, tmp_path_factory) -> Case:
    name = request.param
    if name not in _CASES:
        if name == "gemma3":
            path = gemma3_gguf()
        elif name == "smollm2":
            path = request.getfixturevalue("smollm2_gguf")
        else:
            path = str(tmp_path_factory.mktemp("llama_spm") / "llama-spm.gguf")
            write_llama_spm(path, gemma3_gguf())
        _CASES[name] = Case(name, path)
    return _CASES[name]


def test_same_ids_as_transformers(case):
    hf = case.hf
    wrong = []
    for name, text in case.texts().items():
        for special in (True, False):
            ours = case.tok.encode(text, add_special_tokens=special).ids
            theirs = hf.encode(text, add_special_tokens=special)
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                wrong.append(f"{name} (add_special_tokens={special}): first difference at {at}: "
                             f"ours {ours[at:at + 6]} transformers {theirs[at:at + 6]}")
    assert not wrong, f"{case.name}: ids differ from transformers' on {len(wrong)} texts:\n" + "\n".join(wrong)


def test_same_vocabulary_as_transformers(case):
    hf = case.hf
    assert case.tok.get_vocab_size(with_added_tokens=True) == len(hf)
    assert case.tok.get_vocab(with_added_tokens=True) == hf.get_vocab()
    ours = {t.content: (t.special, t.normalized) for t in case.tok.get_added_tokens_decoder().values()}
    theirs = {t.content: (t.special, t.normalized) for t in hf.backend_tokenizer.get_added_tokens_decoder().values()}
    assert ours == theirs


def test_saved_tokenizer_loads_the_same(case, tmp_path):
    """Written as GGUFSource.write_tokenizer writes it (tokenizer.json, tokenizer_config.json) and
    read back by flashmem's Tokenizer: the same ids, BOS/EOS and chat template."""
    import json

    from flashmem.tokenizer import Tokenizer

    case.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(case.config, indent=1))
    loaded = Tokenizer(str(tmp_path))
    for name, text in case.texts().items():
        assert loaded.encode(text) == case.tok.encode(text).ids, name
    assert loaded.bos_token_id == case.fields.get("tokenizer.ggml.bos_token_id")
    assert loaded.eos_token_id == case.fields.get("tokenizer.ggml.eos_token_id")
    if case.config.get("chat_template"):
        assert loaded.apply_chat_template(CHAT) == case.texts()["chat_prompt"]


def test_decode_round_trips(case):
    """decode(encode(text)) == text, and transformers decodes the ids the same. SentencePiece
    writes spaces as "▁", so a "▁" in the text comes back as a space (so does sentencepiece's).
    With a prefix space (Llama's pipeline), text that starts with a space gets none (HF's Metaspace
    adds it only before text that does not start with "▁"), while decode strips one: that space is
    lost, with transformers' tokenizer as with ours."""
    from flashmem.checkpoints.gguf_tokenizer import GEMMA_ARCHITECTURES

    sentencepiece = case.fields["tokenizer.ggml.model"] == "llama"
    prefix = (sentencepiece and case.architecture not in GEMMA_ARCHITECTURES
              and case.fields.get("tokenizer.ggml.add_space_prefix", True))
    wrong = []
    for name, text in case.texts().items():
        ids = case.tok.encode(text, add_special_tokens=False).ids
        back = case.tok.decode(ids, skip_special_tokens=False)
        want = text.replace("\u2581", " ") if sentencepiece else text
        if prefix and want.startswith(" "):
            want = want[1:]
        if back != want:
            wrong.append(f"{name}: {text[:60]!r} -> {back[:60]!r}")
        if case.hf.decode(ids, skip_special_tokens=False) != back:
            wrong.append(f"{name}: transformers decodes {case.hf.decode(ids, skip_special_tokens=False)[:60]!r}")
    assert not wrong, f"{case.name}:\n" + "\n".join(wrong)


def test_llama_cpp(case):
    """llama.cpp's tokenizer on the same texts: where it and transformers disagree, a warning says
    so (transformers is the reference these tokenizers follow); where they agree, ours must too."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=case.path, vocab_only=True, verbose=False)
    disagree, wrong = [], []
    for name, text in case.texts().items():
        ref = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        hf = case.hf.encode(text)
        ours = case.tok.encode(text).ids
        if ref != hf:
            at = next((i for i, (a, b) in enumerate(zip(ref, hf)) if a != b), min(len(ref), len(hf)))
            disagree.append(f"{name}: from token {at}, llama.cpp {pieces(case.tok, ref[at:at + 5])} "
                            f"transformers {pieces(case.tok, hf[at:at + 5])} ({len(ref)} vs {len(hf)} tokens)")
        elif ours != ref:
            wrong.append(name)
    if disagree:
        warnings.warn(f"{case.name}: llama.cpp and transformers tokenize {len(disagree)} of "
                      f"{len(case.texts())} texts differently:\n" + "\n".join(disagree))
    assert not wrong, f"{case.name}: llama.cpp and transformers agree but ours differs on {wrong}"


def pieces(tok, ids: list[int]) -> list[str]:
    return [f"{i}:{tok.id_to_token(i)!r}" for i in ids]


def test_gemma3_config_and_chat_template():
    c = _CASES.get("gemma3") or Case("gemma3", gemma3_gguf())
    assert "tokenizer.chat_template" not in c.fields  # so the family's published template is used
    assert c.architecture == "gemma3"
    assert {k: c.config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token")} == {
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True}
    assert c.config["flashmem_stop_tokens"] == ["<end_of_turn>"]
    assert c.tok.token_to_id("<end_of_turn>") == 106
    prompt = c.texts()["chat_prompt"]
    assert prompt == ("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n"
                      "<start_of_turn>model\n4.<end_of_turn>\n<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    # the rendered prompt starts with <bos> itself: encoded without the post-processor's BOS
    ids = c.tok.encode(prompt, add_special_tokens=False).ids
    assert ids[:3] == [2, 105, c.tok.token_to_id("user")] and ids[-3:] == [105, c.tok.token_to_id("model"), 107]
    assert c.build_s < 60, f"building Gemma's tokenizer took {c.build_s:.1f} s"


def test_llama_spm_add_space_prefix_false(tmp_path):
    """A SentencePiece file whose tokenizer.ggml.add_space_prefix is false: no "▁" before the first
    word, as llama.cpp tokenizes it (transformers' loader ignores the flag and always adds one)."""
    with_prefix, without = str(tmp_path / "with.gguf"), str(tmp_path / "without.gguf")
    write_llama_spm(with_prefix, gemma3_gguf(), add_space_prefix=True)
    write_llama_spm(without, gemma3_gguf(), add_space_prefix=False)
    tok_with, tok_without = Case("with", with_prefix).tok, Case("without", without).tok
    plain = ["Hello world, hello", "x", "two  inner\nspaces\n\n", "numbers 123 and ünïcödé 😀"]
    leading = ["  two leading", " x", "\n after a newline"]
    a, b = tok_with.encode(plain[0]).ids, tok_without.encode(plain[0]).ids
    assert tok_with.id_to_token(a[1]) == "\u2581Hello" and tok_without.id_to_token(b[1]) == "Hello"
    for tok, texts in ((tok_with, plain), (tok_without, plain + leading)):
        for t in texts:
            assert tok.decode(tok.encode(t, add_special_tokens=False).ids) == t
    # llama.cpp prepends a space to text that starts with one too; transformers (and so ours) not
    llama_cpp = pytest.importorskip("llama_cpp")
    for path, tok, texts in ((with_prefix, tok_with, plain), (without, tok_without, plain + leading)):
        llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        for t in texts:
            assert tok.encode(t).ids == llm.tokenize(t.encode(), add_bos=True, special=True), t


def test_no_transformers_at_run_time(smollm2_gguf):
    """Building either kind of tokenizer imports nothing from transformers."""
    code = ("import sys, gguf\n"
            "from flashmem.checkpoints.gguf_tokenizer import tokenizer_from_gguf\n"
            f"r = gguf.GGUFReader({smollm2_gguf!r})\n"
            "f = {k: v.contents() for k, v in r.fields.items() if k.startswith('tokenizer.')}\n"
            f"tokenizer_from_gguf(f, {smollm2_gguf!r}, 'llama')\n"
            "f = {'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.bos_token_id': 1,\n"
            "     'tokenizer.ggml.tokens': ['<unk>', '<s>', '</s>', '\u2581', 'a', 'b', 'ab', '\u2581ab'],\n"
            "     'tokenizer.ggml.scores': [0, 0, 0, -5, -6, -7, -2, -1]}\n"
            "t, _ = tokenizer_from_gguf(f, 'x.gguf', 'llama')\n"
            "assert t.encode('ab').ids == [1, 7], t.encode('ab').ids\n"
            "assert not [m for m in sys.modules if m.startswith('transformers')]\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
