"""`flashmem calibrate`: fits the per-layer sparsity predictors from calibration text.

For every layer, the engine records the FFN inputs x of the calibration tokens; the targets are
the neurons whose contribution |silu(gate_i . x) * (up_i . x)| is in the top half for that token
(computed exactly from the model's own bundles). A low-rank MLP, scores = B relu(A x + a) + b, is
trained on them with Adam and a binary cross-entropy loss (numpy, CPU). Its rank keeps it at most
5% of the FFN's bytes. The last 10% of the tokens are held out to report recall: the fraction of
a token's true top neurons that the predictor's top picks contain, at 50% and at the sparsities
listed. The result is `predictor.safetensors` in the model folder.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from . import safetensors_io as st
from .flash import PREDICTOR_FILE

MAX_SHARE = 0.05  # predictor bytes / FFN bytes


def max_rank(d: int, ff: int) -> int:
    """The largest rank whose A (rank, d) and B (ff, rank) stay within 5% of the FFN's 3*d*ff weights."""
    return max(1, int(MAX_SHARE * 3 * d * ff // (d + ff)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _train_layer(x, labels, rank, epochs, rng, lr=3e-3, batch=256):
    """Adam on BCE(B relu(A xs + a) + b, labels), xs = standardised x; returns the float32
    weights with the standardisation folded into A and a."""
    n, d = x.shape
    ff = labels.shape[1]
    mu, sd = x.mean(0), x.std(0)
    sd = np.maximum(sd, 1e-2 * sd.mean() + 1e-8)  # a floor keeps A / sd representable in f16
    xs = np.clip((x - mu) / sd, -20, 20)
    params = [rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(d), np.zeros(rank, np.float32),
              rng.standard_normal((ff, rank)).astype(np.float32) / np.sqrt(rank), np.zeros(ff, np.float32)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    step = 0
    for _ in range(epochs):
        for i in range(0, n, batch):
            j = slice(i, i + batch)
            xb, yb = xs[j], labels[j]
            A, a, B, b = params
            pre = xb @ A.T + a
            h = np.maximum(pre, 0)
            z = h @ B.T + b
            gz = (1.0 / (1.0 + np.exp(-np.clip(z, -30, 30))) - yb) / (len(xb) * ff)  # d BCE / d z
            gB, gb = gz.T @ h, gz.sum(0)
            gh = (gz @ B) * (pre > 0)
            grads = [gh.T @ xb, gh.sum(0), gB, gb]
            step += 1
            for k, (p, g) in enumerate(zip(params, grads)):
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                p -= lr * (m[k] / (1 - 0.9 ** step)) / (np.sqrt(v[k] / (1 - 0.999 ** step)) + 1e-8)
        perm = rng.permutation(n)
        xs, labels = xs[perm], labels[perm]
    A, a, B, b = params
    A_folded = (A / sd).astype(np.float32)
    return A_folded, (a - A_folded @ mu).astype(np.float32), B, b


def recall(scores, target, keep):
    """Mean fraction of each row's top-`keep` target neurons among its top-`keep` scores."""
    t = np.argpartition(-target, keep - 1, axis=1)[:, :keep]
    p = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    hit = np.zeros(target.shape, bool)
    np.put_along_axis(hit, p, True, axis=1)
    return float(np.take_along_axis(hit, t, axis=1).mean())


def calibrate(model, text: str, tokens: int = 8192, rank: int | None = None, epochs: int = 8, seed: int = 0,
              progress: bool = True) -> dict:
    """Fits predictors for a loaded dense `flashmem.Model` and writes them to its folder.
    Returns the report (per-layer held-out recall)."""
    cfg = model.config
    d, ff, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    tag = cfg["flashmem"]["dtype"]
    rank = rank or max_rank(d, ff)
    if not 1 <= rank <= max_rank(d, ff):
        raise ValueError(f"rank must lie in [1, {max_rank(d, ff)}] (5% of the FFN's bytes), got {rank}")
    ids = model.tokenizer.encode(text)[:tokens]
    if len(ids) < 256:
        raise ValueError(f"calibration text has {len(ids)} tokens; at least 256 are needed")
    window = min(model.max_context, 1024)
    xs = [model._engine.ffn_inputs(np.asarray(ids[s:s + window], np.int32)) for s in range(0, len(ids), window)]
    X = np.concatenate(xs, axis=1)  # (layers, N, d)
    n = X.shape[1]
    n_train = n - max(n // 10, 64)
    bundles = os.path.join(model.path, cfg["flashmem"]["ffn"].get("file", "ffn_bundles.safetensors"))
    infos, _ = st.read_header(bundles)
    rng = np.random.default_rng(seed)
    keep = ff // 2
    out = os.path.join(model.path, PREDICTOR_FILE)
    specs = []
    for l in range(n_layers):
        specs += [(f"model.layers.{l}.mlp.predictor.A", tag, (rank, d)), (f"model.layers.{l}.mlp.predictor.a", "f32", (rank,)),
                  (f"model.layers.{l}.mlp.predictor.B", tag, (ff, rank)), (f"model.layers.{l}.mlp.predictor.b", "f32", (ff,))]
    report = {"tokens": n, "held_out_tokens": n - n_train, "rank": rank, "epochs": epochs,
              "predictor_share_of_ffn": rank * (d + ff) / (3 * d * ff), "recall_at_50": [], "recall_at_80": []}
    w = st.Writer(out + ".part", specs, {"rank": str(rank), "tokens": str(n)})
    for l in tqdm(range(n_layers), desc="calibrate predictors", unit="layer", disable=not progress):
        b = st.to_f32(st.load_tensor(bundles, infos[f"model.layers.{l}.mlp.bundles"]), tag)
        x = X[l]
        contrib = np.abs(_silu(x @ b[:, :d].T) * (x @ b[:, d:2 * d].T))  # (N, ff)
        labels = np.zeros_like(contrib)
        np.put_along_axis(labels, np.argpartition(-contrib, keep - 1, axis=1)[:, :keep], 1.0, axis=1)
        A, a, B, bb = _train_layer(x[:n_train], labels[:n_train], rank, epochs, rng)
        if not all(np.isfinite(t).all() for t in (A, a, B, bb)):
            raise RuntimeError(f"predictor training diverged at layer {l}")
        A, B = (st.to_f32(st.from_f32(t, tag), tag) for t in (A, B))  # recall as stored (f16/bf16)
        scores = np.maximum(x[n_train:] @ A.T + a, 0) @ B.T + bb
        report["recall_at_50"].append(recall(scores, contrib[n_train:], keep))
        report["recall_at_80"].append(recall(scores, contrib[n_train:], ff // 5))
        for part, arr in (("A", A), ("a", a), ("B", B), ("b", bb)):
            w.write(f"model.layers.{l}.mlp.predictor.{part}", arr)
    w.close()
    os.replace(out + ".part", out)
    report["mean_recall_at_50"] = float(np.mean(report["recall_at_50"]))
    report["mean_recall_at_80"] = float(np.mean(report["recall_at_80"]))
    report["path"] = out
    return report
