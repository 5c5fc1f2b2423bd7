"""The `flashmem` command: generate, chat, convert, info, calibrate, eval-ppl, serve."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .checkpoints.convert import ALL_DTYPES, BUNDLE_DOWN_FORMATS

DTYPE_HELP = ("weights: gguf (a GGUF file's own block formats; the default for .gguf), f16 (the default for HF "
              "folders), f32, bf16, or a block format to quantize to (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)")

def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="flashmem folder, HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=ALL_DTYPES, default=None, help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--kv-dtype", choices=("f32", "f16"), default=None,
                   help="KV cache storage (default f16 with block formats, f32 with float weights)")
    p.add_argument("--offload", choices=("flash", "all", "auto"), default=None,
                   help="flash: stream the FFN weights from the model folder instead of holding them in DRAM; "
                        "all: the attention matrices, embeddings and LM head too; auto: flash where --dram-budget "
                        "holds its minimum, else all")
    p.add_argument("--dram-budget", default=None,
                   help="with --offload flash: DRAM the engine may own, e.g. 200MB, or 'auto' (what the process "
                        "may still take: its memory cgroup's limit, else the available memory)")
    p.add_argument("--sparsity", type=float, default=0.0,
                   help="fraction of FFN neurons left out per token (needs `flashmem calibrate`)")
    p.add_argument("--window", type=int, default=5, help="tokens a neuron stays in DRAM after its last use")
    p.add_argument("--eviction", choices=("lru", "hot"), default="lru",
                   help="with --offload flash: which neurons a full cache drops (least recent, or least often picked)")


def _sampling(a) -> dict:
    return dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)


def _load(a):
    import flashmem

    return flashmem.load(a.model, dtype=a.dtype, threads=a.threads, max_context=a.max_context, offload=a.offload,
                         dram_budget=a.dram_budget, sparsity=a.sparsity, window=a.window, eviction=a.eviction,
                         kv_dtype=a.kv_dtype)


def cmd_generate(a) -> None:
    model = _load(a)
    prompt = [{"role": "user", "content": a.prompt}] if a.chat else a.prompt
    run = model.generate(prompt, stream=True, **_sampling(a))
    for piece in run:
        sys.stdout.write(piece)
        sys.stdout.flush()
    r = run.result
    sys.stdout.write("\n")
    print(f"[{r.prompt_tokens} prompt tokens, {len(r.token_ids)} new, {r.finish_reason}; "
          f"ttft {r.time_to_first_token_s * 1e3:.0f} ms, prefill {r.prefill_tokens_per_s:.0f} tok/s, "
          f"decode {r.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    if r.flash:
        f = r.flash
        weights = f"; other weights read {f['weights_read_per_token'] / 1e6:.1f} MB per token" \
            if f.get("weights_read_per_token") else ""
        print(f"[flash: FFN {f['bytes_read_per_token'] / 1e6:.2f} MB and {f['requests_per_token']:.0f} reads per token, "
              f"cache hit rate {f['neuron_cache_hit_rate']:.1%}, I/O {f['io_ms_per_token']:.2f} ms/token, "
              f"{f['read_bandwidth_gbps']:.2f} GB/s{weights}; engine owns {model.owned_bytes / 1e6:.0f} MB]",
              file=sys.stderr)


def cmd_chat(a) -> None:
    model = _load(a)
    memory = None
    if a.memory:  # long-term memory: what was said is stored in the bank file and retrieved later
        from .memory.conversation import ChatMemory

        memory = ChatMemory(model, a.memory, system=a.system)
        print(f"flashmem chat: {len(memory.bank)} memories in {a.memory}", file=sys.stderr)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print("flashmem chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        if memory is not None:
            run = memory.send(user, stream=True, **_sampling(a))
        else:
            messages.append({"role": "user", "content": user})
            run = model.generate(messages, stream=True, **_sampling(a))
        text = ""
        for piece in run:
            text += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if memory is None:
            messages.append({"role": "assistant", "content": text})


def cmd_convert(a) -> None:
    from .checkpoints.convert import convert

    out = convert(a.src, a.out, dtype=a.dtype, align=a.align, bundle_down=a.bundle_down)
    print(out)


def cmd_info(a) -> None:
    model = _load(a)
    c = model.config
    e = model._engine
    from . import _core

    info = {"path": model.path, "model_type": c.get("model_type"), "dtype": model.dtype,
            "layers": c["num_hidden_layers"], "d_model": c["hidden_size"], "d_ff": c["intermediate_size"],
            "heads": c["num_attention_heads"], "kv_heads": c.get("num_key_value_heads"),
            "vocab": c["vocab_size"], "tied_embeddings": c.get("tie_word_embeddings", False),
            "max_context": model.max_context, "threads": e.n_threads, "isa": _core.isa(),
            "cuda": _core.cuda_available(), "weight_MB": round(e.weight_bytes / 1e6, 1),
            "state_MB": round(e.state_bytes / 1e6, 1), "ffn": c["flashmem"]["ffn"]}
    print(json.dumps(info, indent=1))


def cmd_calibrate(a) -> None:
    import flashmem
    from .flash.calibrate import calibrate

    model = flashmem.load(a.model, dtype=a.dtype, threads=a.threads)
    with open(a.data, encoding="utf-8") as f:
        text = f.read()
    r = calibrate(model, text, tokens=a.tokens, rank=a.rank)
    kind = f"low-rank, rank {r['rank']}" if r["rank"] else "signs"
    print(f"predictors ({kind}; {r['predictor_share_of_ffn']:.1%} of the FFN's bytes) written to {r['path']}")
    print(f"held-out recall of the true top neurons: {r['mean_recall_at_50']:.3f} at 50% sparsity, "
          f"{r['mean_recall_at_80']:.3f} at 80% (min over layers {min(r['recall_at_50']):.3f} / "
          f"{min(r['recall_at_80']):.3f}); {r['tokens']} tokens, {r['held_out_tokens']} held out")
    if r["mean_recall_ahead_at_50"] is not None:
        print(f"a layer ahead (layer l + 1's predictor on layer l's FFN input): "
              f"recall {r['mean_recall_ahead_at_50']:.3f} at 50% sparsity, agreement with its own picks "
              f"{r['mean_ahead_agreement_at_50']:.3f}")


def cmd_eval_ppl(a) -> None:
    with open(a.data, encoding="utf-8") as f:
        text = f.read()
    model = _load(a)
    ids = model.tokenizer.encode(text)
    ids = ids[-a.tokens:]  # the end of the file: calibrate fits on its beginning
    ppl = model.perplexity(ids, stepwise=a.stepwise)
    out = {"perplexity": round(ppl, 4), "tokens": len(ids), "sparsity": a.sparsity, "window": a.window,
           "offload": a.offload, "stepwise": a.stepwise}
    if a.compare_dense and (a.sparsity or a.offload):
        import flashmem

        dense = flashmem.load(model.path, threads=a.threads, max_context=a.max_context).perplexity(ids)
        out["dense_perplexity"] = round(dense, 4)
        out["increase"] = f"{ppl / dense - 1:+.2%}"
    print(json.dumps(out))


def cmd_serve(a) -> None:
    try:
        from .serving import serve
    except ImportError as e:  # the optional extra is missing: its message says what to install
        raise RuntimeError(str(e)) from None
    serve(a.model, host=a.host, port=a.port, max_batch=a.max_batch, max_queue=a.max_queue, model_name=a.model_name,
          dtype=a.dtype, threads=a.threads, max_context=a.max_context, offload=a.offload, dram_budget=a.dram_budget,
          sparsity=a.sparsity, window=a.window, eviction=a.eviction, kv_dtype=a.kv_dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="flashmem", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text, streamed to the terminal")
    _model_args(g)
    g.add_argument("--prompt", "-p", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _sampling_args(g)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat loop")
    _model_args(c)
    c.add_argument("--system", default=None)
    c.add_argument("--memory", default=None, metavar="FILE",
                   help="long-term memory: a bank file (created if missing) that stores what you say and "
                        "retrieves it on later turns and runs")
    _sampling_args(c)
    c.set_defaults(fn=cmd_chat)
    v = sub.add_parser("convert", help="convert a HF folder or GGUF file to a flashmem folder")
    v.add_argument("src")
    v.add_argument("out")
    v.add_argument("--dtype", choices=ALL_DTYPES, default=None, help=DTYPE_HELP)
    v.add_argument("--align", type=int, default=4096, help="float bundle alignment in bytes (default 4096)")
    v.add_argument("--bundle-down", choices=BUNDLE_DOWN_FORMATS, default="split",
                   help="the block-format bundles' down columns: split (default: the down matrix's own quants, "
                        "their scales resident; q4_0, q4_1, q8_0, else q8_0) or requantized to a format")
    v.set_defaults(fn=cmd_convert)
    i = sub.add_parser("info", help="show a model's configuration and memory")
    _model_args(i)
    i.set_defaults(fn=cmd_info)
    k = sub.add_parser("calibrate", help="fit the sparsity predictors from calibration text")
    k.add_argument("model", nargs="?", default=None)
    k.add_argument("--data", required=True, help="UTF-8 text file (its first --tokens tokens are used)")
    k.add_argument("--dtype", choices=ALL_DTYPES, default=None, help=DTYPE_HELP)
    k.add_argument("--threads", type=int, default=None)
    k.add_argument("--tokens", type=int, default=8192)
    k.add_argument("--rank", type=int, default=None,
                   help="0: the sign predictor; r > 0 (a multiple of 32): the low-rank one of rank r "
                        "(default: whichever of sign and rank 128 takes fewer bytes at the model's shapes)")
    k.set_defaults(fn=cmd_calibrate)
    e = sub.add_parser("eval-ppl", help="perplexity on the last --tokens tokens of a text file")
    _model_args(e)
    e.add_argument("--data", required=True)
    e.add_argument("--tokens", type=int, default=4096)
    e.add_argument("--compare-dense", action="store_true", help="also report the dense engine's perplexity")
    e.add_argument("--stepwise", action="store_true",
                   help="one token at a time, exactly as generation runs (slower; with --offload flash the "
                        "neuron cache evolves as when decoding)")
    e.set_defaults(fn=cmd_eval_ppl)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions), "
                                     "continuous batching; needs pip install \"flashmem[server]\"")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed once listening)")
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting or running at most; more are refused with 503 (default 64)")
    s.add_argument("--model-name", default=None, help="the model id clients use (default: the file or folder name)")
    s.set_defaults(fn=cmd_serve)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"flashmem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
