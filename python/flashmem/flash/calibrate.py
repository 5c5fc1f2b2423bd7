"""`flashmem calibrate`: fits the per-layer sparsity predictors.

The predictor (csrc/ffn/predictor.h) estimates each neuron's contribution
|act(gate_i . x) * (up_i . x)| (act: the FFN's silu, or Gemma's gelu) from 1-bit copies of the gate and up matrices, plus int8 copies
of their columns on the M = 8 input dims that carry most of the FFN input's energy:
    gate_i . x  ~  row_i * sum_k sign(W_ik) * col_k * x_k  +  sum_j q_ij * scale_j * x_{dim_j}
The FFN inputs of this model have a few outlier dims (the top 8 of 576 hold 16-72% of E[x^2],
depending on the layer), and a sign is a poor copy of a weight that such a dim multiplies.
Signs come from the weights; |W| off the outlier dims is approximated by its best rank-1 product
row col^T (the top singular pair of |W|); then row_i is refitted by least squares so that the
estimate matches gate_i . x on the calibration tokens' FFN inputs, which the engine records.
Gate and up together take 2 bits per weight pair plus 2M bytes per neuron and a few vectors:
about 4.9% of an f16 FFN's bytes, under the 5% budget. No training loop: seconds per layer.

The last 10% of the calibration tokens are held out to report recall: the fraction of a token's
true top neurons (by exact contribution) that the predictor's top picks contain, at 50% and at
80% sparsity. Also reported, as a measurement for reading a layer ahead: the recall at 50% when
layer l + 1's predictor scores layer l's FFN input (the residual stream a layer earlier, known
while layer l computes) instead of its own, and the agreement of those early picks with the
picks the predictor makes on the layer's own input (the share of its reads that could start a
layer early). The result is `predictor.safetensors` in the model folder.

The other kind, low-rank (`rank` r > 0, csrc/ffn/predictor.h): the best rank-r linear estimate of
the gate and up pre-activations on the calibration inputs, gate . x ~ out_g (in_g x), with out_g the
top r left singular vectors of W Sigma^1/2 (Sigma = E[x x^T]) and in_g = out_g^T W; both in q8_0.
Its bytes grow with r (d + d_ff) rather than d * d_ff, so it is the smaller one at large shapes: at
Llama-3-8B's, rank 128 takes 5 MB a layer against 15 MB for the signs. `default_rank` picks the
smaller of the two (rank 128, the rank "LLM in a flash" uses at 7B). Held-out recall at 50% on
SmolLM2-135M (4,096 tokens): signs 0.69, rank 64 0.71, rank 128 0.76.
"""
from __future__ import annotations

import os

import gguf
import numpy as np
from tqdm.auto import tqdm

from ..checkpoints import safetensors_io as st
from .streaming import LOWRANK_PARTS, PREDICTOR_FILE, PREDICTOR_PARTS, bundle_bytes, bundle_gate_up, predictor_rank

OUTLIER_DIMS = 8  # csrc/ffn/predictor.h: kOutlierDims
LOWRANK_DEFAULT = 128  # the rank default_rank offers
Q8_BLOCK, Q8_BYTES = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]  # 32 weights in 34 bytes


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def activation(config: dict):
    """The FFN's gate activation of a model config, as numpy computes it (csrc/core/activation.h)."""
    name = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    return _gelu_tanh if name in ("gelu_pytorch_tanh", "gelu_tanh") else _silu


def outlier_dims(x: np.ndarray, m: int = OUTLIER_DIMS) -> np.ndarray:
    """The m input dims of largest mean square over the calibration inputs x (N, d), as int32."""
    return np.sort(np.argsort(-(x.astype(np.float64) ** 2).mean(0))[:min(m, x.shape[1])]).astype(np.int32)


def quantize_columns(W: np.ndarray):
    """Symmetric int8 per column: (q int8 like W, scale f32 per column); W ~ q * scale."""
    scale = np.abs(W).max(0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(W / scale), -127, 127).astype(np.int8), scale


def fit_matrix(W: np.ndarray, x: np.ndarray, dims: np.ndarray):
    """Fit of W (n, d) on inputs x (N, d): packed signs (n, ceil(d/8)), row (n), col (d) (0 on the outlier
    `dims`), and the outlier columns as int8 q (n, len(dims)) with their scales."""
    q, scale = quantize_columns(W[:, dims])
    A = np.abs(W).astype(np.float64)
    A[:, dims] = 0  # the int8 part covers these dims
    col = A.mean(0)  # power iteration for the top singular pair of |W| (all entries >= 0)
    for _ in range(30):
        row = A @ col
        col = A.T @ row
        col /= np.linalg.norm(col) + 1e-30
    row = A @ col
    S = np.where(W > 0, 1.0, -1.0)
    x64 = x.astype(np.float64)
    est = (x64 * col) @ S.T  # (N, n): sum_k sign * col_k * x_k
    exact = x64 @ W.T.astype(np.float64) - x64[:, dims] @ (q * scale).T.astype(np.float64)
    den = (est * est).sum(0)
    fitted = np.where(den > 0, (est * exact).sum(0) / np.maximum(den, 1e-30), row)
    bits = np.packbits(W > 0, axis=1, bitorder="little")
    return bits, fitted.astype(np.float32), col.astype(np.float32), q, scale


def fit_layer(gate: np.ndarray, up: np.ndarray, x: np.ndarray) -> dict:
    """The predictor tensors of one layer (see PREDICTOR_PARTS) from its gate and up (n, d) and FFN inputs x (N, d)."""
    dims = outlier_dims(x)
    p = {"outlier_dims": dims}
    p["gate_sign"], p["gate_row"], p["gate_col"], qg, sg = fit_matrix(gate, x, dims)
    p["up_sign"], p["up_row"], p["up_col"], qu, su = fit_matrix(up, x, dims)
    p["outlier_weight"] = np.ascontiguousarray(np.concatenate([qg, qu], axis=1))
    p["outlier_scale"] = np.concatenate([sg, su]).astype(np.float32)
    return p


def q8_0(W: np.ndarray) -> np.ndarray:
    """W (rows, K), K a multiple of 32, as q8_0 rows (rows, K / 32 * 34) uint8, as ggml quantizes."""
    return np.asarray(gguf.quants.quantize(np.ascontiguousarray(W, np.float32), gguf.GGMLQuantizationType.Q8_0))


def from_q8_0(raw: np.ndarray) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0), np.float32)


def input_root(x: np.ndarray) -> np.ndarray:
    """Sigma^1/2 (d, d) of inputs x (N, d), Sigma = E[x x^T]: what weighs a low-rank fit."""
    x64 = x.astype(np.float64)
    ev, V = np.linalg.eigh(x64.T @ x64 / len(x64))
    return (V * np.sqrt(np.maximum(ev, 0))) @ V.T


def fit_lowrank(W: np.ndarray, root: np.ndarray, rank: int):
    """The best rank-`rank` estimate of x @ W.T over inputs whose input_root is `root`: (out (n, rank),
    in (rank, d)), W ~ out @ in (out: the top left singular vectors of W Sigma^1/2)."""
    M = W.astype(np.float64) @ root
    s2, R = np.linalg.eigh(M.T @ M)  # its right singular vectors, ascending: U = M R / s
    top = np.argsort(-s2)[:rank]
    U = M @ R[:, top] / np.sqrt(np.maximum(s2[top], 1e-30))
    return U.astype(np.float32), (U.T @ W.astype(np.float64)).astype(np.float32)


def fit_lowrank_layer(gate: np.ndarray, up: np.ndarray, x: np.ndarray, rank: int) -> dict:
    """The low-rank predictor tensors of one layer (LOWRANK_PARTS), in q8_0."""
    root = input_root(x)
    og, ig = fit_lowrank(gate, root, rank)
    ou, iu = fit_lowrank(up, root, rank)
    return {"lowrank_in": q8_0(np.concatenate([ig, iu])), "lowrank_out": q8_0(np.concatenate([og, ou]))}


def act_blocks(x: np.ndarray) -> np.ndarray:
    """x (N, K) as the quantized matmul takes it: 8 bits per block of 32 with one scale (max |x| / 127),
    back in float (quantize_act in csrc/kernels/quant)."""
    x = np.asarray(x, np.float32)
    b = x.reshape(x.shape[0], -1, Q8_BLOCK)
    d = np.abs(b).max(axis=2, keepdims=True) / np.float32(127)
    q = np.rint(b * np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0))
    return (q * d).reshape(x.shape).astype(np.float32)


def estimate_lowrank(parts: dict, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The low-rank predictor's estimates (N, n) of gate . x and up . x, as the engine computes them."""
    w_in, w_out = from_q8_0(parts["lowrank_in"]), from_q8_0(parts["lowrank_out"])
    r, n = w_in.shape[0] // 2, w_out.shape[0] // 2
    h = act_blocks(x) @ w_in.T
    return act_blocks(h[:, :r]) @ w_out[:n].T, act_blocks(h[:, r:]) @ w_out[n:].T


def estimate(parts: dict, x: np.ndarray, name: str) -> np.ndarray:
    """The predictor's estimate (N, n) of gate . x or up . x (name "gate" or "up") for inputs x (N, d)."""
    if "lowrank_in" in parts:
        return estimate_lowrank(parts, x)[("gate", "up").index(name)]
    d = x.shape[1]
    dims, q, scale = parts["outlier_dims"], parts["outlier_weight"].astype(np.float32), parts["outlier_scale"]
    m, j = len(dims), ("gate", "up").index(name)
    s = np.unpackbits(parts[f"{name}_sign"], axis=1, bitorder="little", count=d).astype(np.float32) * 2 - 1
    exact = x[:, dims] @ (q[:, j * m:(j + 1) * m] * scale[j * m:(j + 1) * m]).T
    return (quantized_z(x * parts[f"{name}_col"]) @ s.T) * parts[f"{name}_row"] + exact


def quantized_z(z: np.ndarray) -> np.ndarray:
    """z (N, d) as the engine takes it: each row in int8 with one scale, max |z| / 127
    (quantize_predictor_z in csrc/ffn/predictor.cpp), back in float."""
    z = np.asarray(z, np.float32)
    mx = np.abs(z).max(axis=1, keepdims=True)
    safe = np.where(mx > 0, mx, np.float32(1))
    q = np.rint(z * (np.float32(127) / safe))
    return (q * (safe / np.float32(127))).astype(np.float32) * (mx > 0)


def predict(parts: dict, x: np.ndarray, act=_silu) -> np.ndarray:
    """Scores (N, n) of inputs x (N, d), as the engine computes them (act: the FFN's activation)."""
    if "lowrank_in" in parts:
        g, u = estimate_lowrank(parts, x)
        return np.abs(act(g) * u)
    return np.abs(act(estimate(parts, x, "gate")) * estimate(parts, x, "up"))


def load_parts(path: str, layer: int) -> dict:
    """Layer `layer`'s predictor tensors from a predictor file, of either kind."""
    infos, _ = st.read_header(path)
    parts = LOWRANK_PARTS if predictor_rank(path) else PREDICTOR_PARTS
    return {p: st.load_tensor(path, infos[f"model.layers.{layer}.mlp.predictor.{p}"]) for p in parts}


def recall(scores, target, keep):
    """Mean fraction of each row's top-`keep` target neurons among its top-`keep` scores."""
    t = np.argpartition(-target, keep - 1, axis=1)[:, :keep]
    p = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
    hit = np.zeros(target.shape, bool)
    np.put_along_axis(hit, p, True, axis=1)
    return float(np.take_along_axis(hit, t, axis=1).mean())


def predictor_bytes(d: int, ff: int, rank: int = 0) -> int:
    """A layer's predictor bytes: the sign kind (rank 0) or the low-rank one."""
    if rank:
        return 2 * rank * (d // Q8_BLOCK) * Q8_BYTES + 2 * ff * (rank // Q8_BLOCK) * Q8_BYTES
    m = min(OUTLIER_DIMS, d)
    return 2 * ff * ((d + 7) // 8) + 4 * (2 * ff + 2 * d) + 4 * m + 2 * m * ff + 8 * m


def default_rank(d: int, ff: int) -> int:
    """The predictor kind calibrate fits unless told: low-rank at rank 128 where that takes fewer bytes
    than the signs (large shapes: 5 MB a layer against 15 MB at Llama-3-8B's), else the signs (0)."""
    r = LOWRANK_DEFAULT
    if d % Q8_BLOCK or r > min(d, ff):
        return 0
    return r if predictor_bytes(d, ff, r) < predictor_bytes(d, ff) else 0


def predictor_specs(n_layers: int, d: int, ff: int, rank: int = 0) -> list[tuple[str, str, tuple]]:
    """(name, tag, shape) of every layer's predictor tensors (PREDICTOR_PARTS, or LOWRANK_PARTS for
    rank > 0), in file order."""
    rb, m = (d + 7) // 8, min(OUTLIER_DIMS, d)
    specs = []
    for l in range(n_layers):
        p = f"model.layers.{l}.mlp.predictor."
        if rank:
            specs += [(p + "lowrank_in", "u8", (2 * rank, d // Q8_BLOCK * Q8_BYTES)),
                      (p + "lowrank_out", "u8", (2 * ff, rank // Q8_BLOCK * Q8_BYTES))]
            continue
        specs += [(p + "gate_sign", "u8", (ff, rb)), (p + "up_sign", "u8", (ff, rb)), (p + "gate_row", "f32", (ff,)),
                  (p + "up_row", "f32", (ff,)), (p + "gate_col", "f32", (d,)), (p + "up_col", "f32", (d,)),
                  (p + "outlier_dims", "i32", (m,)), (p + "outlier_weight", "i8", (ff, 2 * m)),
                  (p + "outlier_scale", "f32", (2 * m,))]
    return specs


def calibrate(model, text: str, tokens: int = 8192, progress: bool = True, rank: int | None = None) -> dict:
    """Fits predictors for a loaded dense `flashmem.Model` and writes them to its folder.
    rank: 0 the sign predictor, r > 0 (a multiple of 32) the low-rank one, None default_rank.
    Returns the report (per-layer held-out recall)."""
    cfg = model.config
    act = activation(cfg)
    d, ff, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    rank = default_rank(d, ff) if rank is None else int(rank)
    if rank < 0 or rank % Q8_BLOCK or rank > min(d, ff) or (rank and d % Q8_BLOCK):
        raise ValueError(f"rank must be 0 (sign predictor) or a multiple of {Q8_BLOCK} up to min(d_model, d_ff) = "
                         f"{min(d, ff)} with d_model a multiple of {Q8_BLOCK} (d_model {d}), got {rank}")
    ids = model.tokenizer.encode(text)[:tokens]
    if len(ids) < 256:
        raise ValueError(f"calibration text has {len(ids)} tokens; at least 256 are needed")
    window = min(model.max_context, 1024)
    X = np.concatenate([model.ffn_inputs(ids[s:s + window]) for s in range(0, len(ids), window)],
                       axis=1)  # (layers, N, d)
    n = X.shape[1]
    n_train = n - max(n // 10, 64)
    out = os.path.join(model.path, PREDICTOR_FILE)
    specs = predictor_specs(n_layers, d, ff, rank)
    ffn_bytes = bundle_bytes(cfg) * ff
    report = {"tokens": n, "held_out_tokens": n - n_train, "rank": rank,
              "predictor_share_of_ffn": predictor_bytes(d, ff, rank) / ffn_bytes,
              "recall_at_50": [], "recall_at_80": [], "recall_ahead_at_50": [],
              "ahead_agreement_at_50": []}
    kind = f"low-rank {rank}, q8_0" if rank else "1-bit gate/up, rank-1 magnitudes, int8 outlier dims"
    w = st.Writer(out + ".part", specs, {"predictor": kind, "rank": str(rank), "tokens": str(n)})
    for l in tqdm(range(n_layers), desc="calibrate predictors", unit="layer", disable=not progress):
        gate, up = bundle_gate_up(model.path, cfg, l)
        x = X[l]
        parts = fit_lowrank_layer(gate, up, x[:n_train], rank) if rank else fit_layer(gate, up, x[:n_train])
        xh = x[n_train:]
        contrib = np.abs(act(xh @ gate.T) * (xh @ up.T))
        scores = predict(parts, xh, act)
        report["recall_at_50"].append(recall(scores, contrib, ff // 2))
        report["recall_at_80"].append(recall(scores, contrib, ff // 5))
        if l > 0:  # this layer's predictor on the previous layer's FFN input
            ahead = predict(parts, X[l - 1][n_train:], act)
            report["recall_ahead_at_50"].append(recall(ahead, contrib, ff // 2))
            report["ahead_agreement_at_50"].append(recall(ahead, scores, ff // 2))
        for part in LOWRANK_PARTS if rank else PREDICTOR_PARTS:
            w.write(f"model.layers.{l}.mlp.predictor.{part}", parts[part])
    w.close()
    os.replace(out + ".part", out)
    report["mean_recall_at_50"] = float(np.mean(report["recall_at_50"]))
    report["mean_recall_at_80"] = float(np.mean(report["recall_at_80"]))
    for key in ("recall_ahead_at_50", "ahead_agreement_at_50"):  # none for a one-layer model
        report[f"mean_{key}"] = float(np.mean(report[key])) if report[key] else None
    report["path"] = out
    return report
