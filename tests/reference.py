"""A float64 NumPy reference for the Llama forward pass, written from the formulas.

It imports nothing from model.py: the tests read the torch model's state_dict into a dict
of NumPy arrays by key name and check that both implementations agree. Shapes use
B batch, T sequence, D model width, H query heads, K key/value heads, E head size.
"""

import numpy as np


def embedding(table, tokens):
    """Row lookup: (V, D) table, (B, T) ints -> (B, T, D)."""
    return table[tokens]


def rmsnorm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def layernorm(x, weight, bias, eps):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance."""
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def rope(x, positions, theta):
    """Rotary embedding in the half-split layout, x (B, T, heads, E), positions (T,).

    Dimension i (< E/2) is paired with i + E/2 and the pair is rotated by the angle
    p * theta^(-2i/E) for a token at position p:
        y_i       = x_i cos(a) - x_{i+E/2} sin(a)
        y_{i+E/2} = x_{i+E/2} cos(a) + x_i sin(a)
    Rotations compose, so q(p) . k(s) depends on p - s only.
    """
    E = x.shape[-1]
    half = E // 2
    freq = theta ** (-2.0 * np.arange(half) / E)
    angle = np.asarray(positions, dtype=np.float64)[:, None] * freq[None, :]  # (T, E/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]  # broadcast over heads
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def softmax(x, axis=-1):
    """Subtract the max first so exp never overflows; masked (-inf) entries become 0."""
    z = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return z / np.sum(z, axis=axis, keepdims=True)


def attention(q, k, v, q_positions=None, k_positions=None):
    """Causal scaled dot-product attention with grouped-query heads.

    q (B, H, Tq, E); k, v (B, K, Tk, E) with H a multiple of K: query head h reads kv head
    h // (H / K). A query at position p sees keys at positions <= p. Positions default to
    0..T-1, i.e. the ordinary causal triangle when Tq == Tk.
    scores = q k^T / sqrt(E), softmax over keys, output = weights v.
    """
    H, K = q.shape[1], k.shape[1]
    k = np.repeat(k, H // K, axis=1)
    v = np.repeat(v, H // K, axis=1)
    qp = np.arange(q.shape[2]) if q_positions is None else np.asarray(q_positions)
    kp = np.arange(k.shape[2]) if k_positions is None else np.asarray(k_positions)
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
    scores = np.where(kp[None, :] <= qp[:, None], scores, -np.inf)
    return softmax(scores) @ v


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, w1, w2, w3):
    """w2 (silu(w1 x) * w3 x), weights stored torch-style as (out, in)."""
    return (silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def norm(x, w, prefix, cfg):
    if cfg["norm"] == "rmsnorm":
        return rmsnorm(x, w[prefix + ".weight"], cfg["norm_eps"])
    return layernorm(x, w[prefix + ".weight"], w[prefix + ".bias"], cfg["norm_eps"])


def forward(w, tokens, cfg):
    """Logits (B, T, V) for tokens (B, T) at positions 0..T-1.

    w maps state_dict keys to float64 arrays; cfg holds n_layers, n_heads, n_kv_heads,
    norm, norm_eps, rope_theta and tie_embeddings. Each block is pre-norm:
        h = x + wo(attention(rope(wq n(x)), rope(wk n(x)), wv n(x)))
        x = h + swiglu(n(h))
    """
    B, T = tokens.shape
    H, K = cfg["n_heads"], cfg["n_kv_heads"]
    x = embedding(w["tok_embeddings.weight"], tokens)
    E = x.shape[-1] // H
    pos = np.arange(T)
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        a = norm(x, w, p + "attention_norm", cfg)
        q = rope((a @ w[p + "attention.wq.weight"].T).reshape(B, T, H, E), pos, cfg["rope_theta"])
        k = rope((a @ w[p + "attention.wk.weight"].T).reshape(B, T, K, E), pos, cfg["rope_theta"])
        v = (a @ w[p + "attention.wv.weight"].T).reshape(B, T, K, E)
        o = attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        x = x + o.transpose(0, 2, 1, 3).reshape(B, T, H * E) @ w[p + "attention.wo.weight"].T
        f = norm(x, w, p + "ffn_norm", cfg)
        x = x + swiglu(
            f,
            w[p + "feed_forward.w1.weight"],
            w[p + "feed_forward.w2.weight"],
            w[p + "feed_forward.w3.weight"],
        )
    head = w["tok_embeddings.weight"] if cfg["tie_embeddings"] else w["output.weight"]
    return norm(x, w, "norm", cfg) @ head.T


def cross_entropy(logits, targets, ignore_index=-100):
    """Mean over non-ignored targets of -log softmax(logits)[target].

    log softmax = z - max - log(sum(exp(z - max))), stable for large logits.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != ignore_index
    z = logits[keep] - logits[keep].max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.mean(logp[np.arange(len(logp)), targets[keep]])
