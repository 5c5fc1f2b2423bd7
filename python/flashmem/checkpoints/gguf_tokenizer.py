"""The tokenizer a GGUF file describes, rebuilt from its metadata with the `tokenizers` library alone.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`), each
token's type and score, the merges when the vocabulary has them, and the special token ids. We
build the same `tokenizers.Tokenizer` HF transformers' GGUF loader builds
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers' integrations/gguf), so that
token ids are equal, without importing transformers:

- "gpt2" (byte-level BPE: SmolLM2, Llama 3, Qwen2): the file's merges over the vocabulary spelled
  in GPT-2's byte alphabet.
- "llama" (SentencePiece BPE: Llama 2, Mistral, Gemma): a BPE model with byte fallback
  (`<0x41>` tokens) whose merges, when the file lists none, are derived from the vocabulary
  (`sentencepiece_merges`). Gemma architectures differ from Llama's in the text pipeline (a
  normalizer writes every space as "▁"; no prefix space), in the merge order (token position, not
  score), and in the spelling of their multi-space tokens.

The file's control tokens (type 3) become special added tokens (matched whole in the text, dropped
by decode(skip_special_tokens=True)), its user-defined ones (type 4) plain added tokens (matched
whole, kept by decode).
"""
from __future__ import annotations

from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined
_CONTROL, _USER_DEFINED = 3, 4

GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

# The special tokens HF's LlamaTokenizer / GemmaTokenizer name by default. transformers' GGUF
# loader builds its tokenizer through those classes, which make these special added tokens
# whatever the file says; we do the same (for the ones the vocabulary has) so that ids are equal.
# In Llama and Gemma files they are the file's own special tokens, so this changes nothing there.
_LLAMA_DEFAULT_SPECIAL = ("<unk>", "<s>", "</s>")
_GEMMA_DEFAULT_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

# Gemma 3's chat template as Google publishes it (the "chat_template" of the google/gemma-3-*-it
# tokenizer_config.json). Written into tokenizer_config.json only for a gemma3 GGUF that carries no
# `tokenizer.chat_template`, the way llama.cpp falls back to its built-in template for the family:
# "<bos><start_of_turn>user\n{system}\n\n{text}<end_of_turn>\n<start_of_turn>model\n...", roles
# user and model (for "assistant"), a system message prepended to the first user turn.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# Gemma's chat turns end with <end_of_turn>, not with the vocabulary's <eos>: Google's
# generation_config.json stops on both (eos_token_id [1, 106]); llama.cpp marks it end-of-generation.
GEMMA_END_OF_TURN = "<end_of_turn>"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# the tokenizer fields read here and the types of their values (of each item, for the lists)
_FIELD_TYPES = {"tokenizer.ggml.model": str, "tokenizer.chat_template": str, "tokenizer.ggml.tokens": [str],
                "tokenizer.ggml.merges": [str], "tokenizer.ggml.token_type": [int],
                "tokenizer.ggml.scores": [(int, float)],
                **{f"tokenizer.ggml.{k}_token_id": int for k in ("bos", "eos", "unknown", "padding")},
                **{f"tokenizer.ggml.{k}": (bool, int) for k in ("add_bos_token", "add_eos_token", "add_space_prefix")}}


def _check_types(fields: dict, path: str) -> None:
    """Raises ValueError naming the field unless each tokenizer field present has its type."""
    for key, kind in _FIELD_TYPES.items():
        v = fields.get(key)
        if v is None:
            continue
        ok = isinstance(v, list) and all(isinstance(x, kind[0]) for x in v) if isinstance(kind, list) else \
            isinstance(v, kind)
        if not ok:
            raise ValueError(f"{path}: metadata field '{key}' has the wrong type: {v!r:.80}")


def tokenizer_from_gguf(fields: dict, path: str, architecture: str | None = None) -> tuple[Tokenizer, dict]:
    """Builds the tokenizer a GGUF file describes, giving the same ids as HF transformers' GGUF
    loader. `fields` are the file's `tokenizer.*` metadata values, `architecture` its
    general.architecture (Gemma vocabularies need their own handling). Returns the tokenizer and
    the tokenizer_config.json entries: special tokens, add_bos_token, the chat template, and for
    Gemma "flashmem_stop_tokens" (the turn end, which should stop generation as well as EOS)."""
    _check_types(fields, path)
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{path}: GGUF has no tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: GGUF has {len(types)} token types for {len(tokens)} tokens")
    merges = fields.get("tokenizer.ggml.merges")
    if model == "gpt2":
        if not merges:
            raise ValueError(f"{path}: GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
        tok, in_vocab = _byte_level(tokens, merges)
    elif model == "llama":
        scores = fields.get("tokenizer.ggml.scores")
        if scores is not None and len(scores) != len(tokens):
            raise ValueError(f"{path}: GGUF has {len(scores)} token scores for {len(tokens)} tokens")
        tok = _sentencepiece(tokens, scores, merges, gemma=architecture in GEMMA_ARCHITECTURES,
                             unk=_token(fields, tokens, "unknown"),
                             add_space_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
        in_vocab = None
    else:
        raise ValueError(f"{path}: GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")
    _add_file_tokens(tok, tokens, types, in_vocab)

    bos, eos = _token(fields, tokens, "bos"), _token(fields, tokens, "eos")
    named = {"bos_token": bos, "eos_token": eos, "unk_token": _token(fields, tokens, "unknown"),
             "pad_token": _token(fields, tokens, "padding")}
    # HF makes the named special tokens added special tokens too, where the file's types left one
    # out (Llama 2's <unk> is type 2, "unknown", not control). Only spellings the vocabulary has:
    # one it lacks (a byte-level token written outside the byte alphabet) would get a new id.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named.values()
                            if t is not None and tok.token_to_id(t) is not None])

    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", model == "llama")) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    _set_post_processor(tok, (bos, fields.get("tokenizer.ggml.bos_token_id")) if add_bos else None,
                        (eos, fields.get("tokenizer.ggml.eos_token_id")) if add_eos else None)

    chat_template = fields.get("tokenizer.chat_template")
    if chat_template is None and architecture == "gemma3":
        chat_template = GEMMA3_CHAT_TEMPLATE  # the family's published template: the file has none
    config = {**named, "add_bos_token": add_bos, "chat_template": chat_template}
    if "tokenizer.ggml.add_eos_token" in fields:
        config["add_eos_token"] = add_eos
    if architecture in GEMMA_ARCHITECTURES and tok.token_to_id(GEMMA_END_OF_TURN) is not None:
        config["flashmem_stop_tokens"] = [GEMMA_END_OF_TURN]
    return tok, {k: v for k, v in config.items() if v is not None}


def _token(fields: dict, tokens: list, key: str) -> str | None:
    """The text of the token `tokenizer.ggml.{key}_token_id` names, if it names one."""
    i = fields.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None


def _byte_level(tokens: list, merges: list) -> tuple[Tokenizer, set]:
    """Byte-level BPE: GGUF stores tokens as UTF-8 text, the model spells them in GPT-2's byte
    alphabet (tokens already written in it are kept as they are). Returns the tokenizer and that
    alphabet, which a control token must be written in to be added (see _add_file_tokens)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok, alphabet


def _sentencepiece(tokens: list, scores: list | None, merges: list | None, *, gemma: bool, unk: str | None,
                   add_space_prefix: bool) -> Tokenizer:
    """SentencePiece BPE as HF's LlamaTokenizer / GemmaTokenizer build it: words are spelled with
    "▁" for the space, pieces merged by the BPE merges, and a character no token covers falls back
    to its UTF-8 bytes (<0xNN> tokens)."""
    if gemma:
        # Gemma files store their multi-space tokens with real spaces ("  "), while the text reaches
        # the model with "▁" for each space: respell them "▁▁"..., as transformers does (its test
        # also catches whitespace mixes such as " \n", respelled with one "▁" per character).
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id, as in HF
    if merges:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif gemma or scores is None:
        # Gemma's scores do not follow its merge order; the order the tokens appear in does (and it
        # is all a file without scores has; transformers' loader needs scores there).
        pairs = sentencepiece_merges(vocab, {t: -i for i, t in enumerate(tokens)})
    else:
        pairs = sentencepiece_merges(vocab, dict(zip(tokens, scores)))
    # HF's LlamaTokenizer gives the BPE model no unk token (byte fallback covers every character);
    # GemmaTokenizer gives it "<unk>".
    bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True,
                     unk_token=(unk or "<unk>") if gemma else None)
    tok = Tokenizer(bpe)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # Every space becomes "▁", no space is prepended (Gemma's add_space_prefix is false).
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    else:
        # Metaspace writes spaces as "▁" and, when tokenizer.ggml.add_space_prefix is true (or
        # absent), prepends one to the text (only at its start, not after each special token:
        # "first"; and not when the text starts with a space already), which decode strips again.
        # HF's loader always prepends (it ignores the flag); llama.cpp follows the flag, and so do
        # we: files that clear it come from tokenizers that add no prefix.
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
        if add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            (_GEMMA_DEFAULT_SPECIAL if gemma else _LLAMA_DEFAULT_SPECIAL) if t in vocab])
    return tok


def sentencepiece_merges(vocab: dict[str, int], ranks: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies (its files list none): each way to cut a
    token into two tokens of the vocabulary, best token first (highest rank: its score, or minus
    its position), and for one token the longer left piece first. This is transformers'
    generate_merges (tokenization_utils_base) with vocab_scores = ranks, in the same order, ties
    included: a token's cuts in vocabulary-id order of their pieces, then a stable sort on
    (rank, left length, right length), descending. A few seconds for Gemma's 262k tokens."""
    cuts = []  # (rank, left length, right length, left, right)
    for token, rank in ranks.items():
        n = len(token)
        if n < 2:
            continue
        here = [(token[:k], token[k:]) for k in range(1, n) if token[:k] in vocab and token[k:] in vocab]
        if len(here) > 1:
            here.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        cuts.extend((rank, len(left), len(right), left, right) for left, right in here)
    cuts.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)  # stable, like transformers' sort
    return [(c[3], c[4]) for c in cuts]


def _add_file_tokens(tok: Tokenizer, tokens: list, types: list, alphabet: set | None) -> None:
    """The file's control tokens (type 3, e.g. <bos>, <start_of_turn>) as special added tokens, its
    user-defined ones (type 4, e.g. <think>, Gemma's runs of newlines) as plain added tokens: both
    are matched whole in the text, never cut into pieces. In a byte-level vocabulary (`alphabet`
    given) a control token written outside the byte alphabet is a llama.cpp mislabel and is skipped,
    and a user-defined one only counts when the vocabulary spells it as the file does."""
    control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED and tok.token_to_id(t) is not None])


def _set_post_processor(tok: Tokenizer, bos: tuple | None, eos: tuple | None) -> None:
    """BOS before / EOS after each sequence, as the file's add_bos_token / add_eos_token ask
    (`bos`, `eos`: (text, id), or None when not added); type ids as HF's update_post_processor."""
    if bos is None and eos is None:
        return

    def seq(name, type_id):
        return " ".join(([f"{bos[0]}:{type_id}"] if bos else []) + [f"${name}:{type_id}"]
                        + ([f"{eos[0]}:{type_id}"] if eos else []))
    special = dict(s for s in (bos, eos) if s is not None)
    tok.post_processor = processors.TemplateProcessing(single=seq("A", 0), pair=f"{seq('A', 0)} {seq('B', 1)}",
                                                       special_tokens=[(t, int(i)) for t, i in special.items()])


def save_compact(tok: Tokenizer, path: str) -> None:
    """Writes tok as tokenizer.json with its BPE merges as "a b" strings where no merged piece
    holds a space (else as `tokenizers` writes them, pairs): loading Gemma 3's 514,906 merges
    then peaks at 179 MB of memory instead of 371 MB (the file: 13 MB instead of 33), which counts
    against a memory limit as much as the weights do. The ids are the same."""
    import json

    data = json.loads(tok.to_str())
    model = data.get("model") or {}
    merges = model.get("merges")
    if merges and all(isinstance(m, list) and " " not in m[0] and " " not in m[1] for m in merges):
        model["merges"] = [f"{a} {b}" for a, b in merges]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
