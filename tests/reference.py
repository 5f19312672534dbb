"""float64 numpy oracles for every kernel, written from the definitions.

One copy of each, shared by the kernel tests and the fuzzers. Nothing here imports pytransformer:
an oracle must not share a bug with what it checks. Inputs may be float32 (or anything numpy
converts); results are float64 (plain floats for scalars).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


# ---------------------------------------------------------------------------- matmul, activations


def relu(x):
    return np.maximum(f64(x), 0.0)


def relu_backward(dout, out):
    """The gradient through relu given its output: dout where out > 0, else 0."""
    return np.where(f64(out) > 0, f64(dout), 0.0)


def gelu(x):
    """The exact (erf) GELU."""
    x = f64(x)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_grad(x):
    """d gelu / dx."""
    x = f64(x)
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(
        2 * math.pi
    )


ACTIVATIONS = {None: f64, "relu": relu, "gelu": gelu}


def matmul(a, b, trans_a=False, trans_b=False, bias=None, activation=None, out=None):
    """activation(op(a) @ op(b) + bias), plus `out` when accumulating (op transposes the last two
    axes when asked; batch axes broadcast)."""
    A = np.swapaxes(f64(a), -1, -2) if trans_a else f64(a)
    B = np.swapaxes(f64(b), -1, -2) if trans_b else f64(b)
    r = A @ B
    if out is not None:
        r = r + f64(out)
    if bias is not None:
        r = r + f64(bias)
    return ACTIVATIONS[activation](r)


# ---------------------------------------------------------------------------- layer norm


def layer_norm(x, gamma, beta, eps):
    """y, mean, rstd over the last axis."""
    x = f64(x)
    mean = x.mean(-1)
    xc = x - mean[..., None]
    rstd = 1.0 / np.sqrt((xc * xc).mean(-1) + eps)
    return xc * rstd[..., None] * f64(gamma) + f64(beta), mean, rstd


def layer_norm_backward(dy, x, gamma, eps):
    """Analytic gradients (dx, dgamma, dbeta) of sum(dy * layer_norm(x))."""
    dy, x, gamma = f64(dy), f64(x), f64(gamma)
    _, mean, rstd = layer_norm(x, gamma, 0.0, eps)
    xh = (x - mean[..., None]) * rstd[..., None]
    g = dy * gamma
    dx = rstd[..., None] * (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True))
    C = x.shape[-1]
    return dx, (dy * xh).reshape(-1, C).sum(0), dy.reshape(-1, C).sum(0)


# ---------------------------------------------------------------------------- attention


def attention_scale(D: int, scale=None) -> float:
    return 1.0 / math.sqrt(D) if scale is None else scale


def attention_mask(B, Lq, Lk, key_lengths=None, causal=False, query_offset=0, window=None):
    """(B, Lq, Lk) bool, True where query i of batch b (at position p = i + query_offset) may
    attend key j: j < key_lengths[b], j <= p when causal, |p - j| <= window when windowed (the
    explicit band mask)."""
    p = np.arange(Lq)[:, None] + query_offset
    j = np.arange(Lk)[None, :]
    mask = np.ones((B, Lq, Lk), bool)
    if key_lengths is not None:
        mask &= (j < np.asarray(key_lengths)[:, None])[:, None, :]
    if causal:
        mask &= (j <= p)[None]
    if window is not None:
        mask &= (np.abs(p - j) <= window)[None]
    return mask


def _attention_rows(q, k, mask, scale) -> Iterator:
    """(b, i, js, p, lse) for every query row that sees some key: the keys js it may see
    (mask[b, i]), probabilities p (H, len(js)) and log-sum-exp (H,). Keys a row cannot see are
    never read, whatever they hold."""
    B, Lq = q.shape[:2]
    for b in range(B):
        for i in range(Lq):
            js = np.flatnonzero(mask[b, i])
            if js.size == 0:
                continue
            s = np.einsum("hd,jhd->hj", q[b, i], k[b, js]) * scale
            mx = s.max(-1, keepdims=True)
            e = np.exp(s - mx)
            z = e.sum(-1, keepdims=True)
            yield b, i, js, e / z, (mx + np.log(z))[:, 0]


def attention(q, k, v, key_lengths=None, causal=False, query_offset=0, scale=None, window=None):
    """softmax(q k^T * scale) v per head for (B, L, H, D) q, k, v under attention_mask: out
    (B, Lq, H, D) and lse (B, H, Lq). A row with no visible key is zero with lse -inf."""
    q, k, v = f64(q), f64(k), f64(v)
    B, Lq, H, D = q.shape
    scale = attention_scale(D, scale)
    mask = attention_mask(B, Lq, k.shape[1], key_lengths, causal, query_offset, window)
    out = np.zeros((B, Lq, H, D))
    lse = np.full((B, H, Lq), -np.inf)
    for b, i, js, p, row_lse in _attention_rows(q, k, mask, scale):
        out[b, i] = np.einsum("hj,jhd->hd", p, v[b, js])
        lse[b, :, i] = row_lse
    return out, lse


def attention_backward(
    dout, q, k, v, key_lengths=None, causal=False, query_offset=0, scale=None, window=None
):
    """Analytic gradients (dq, dk, dv) of sum(dout * attention(q, k, v)); keys no row sees get
    zero gradient."""
    do, q, k, v = f64(dout), f64(q), f64(k), f64(v)
    scale = attention_scale(q.shape[-1], scale)
    mask = attention_mask(q.shape[0], q.shape[1], k.shape[1], key_lengths, causal, query_offset,
                          window)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b, i, js, p, _ in _attention_rows(q, k, mask, scale):
        dv[b, js] += np.einsum("hj,hd->jhd", p, do[b, i])
        dp = np.einsum("hd,jhd->hj", do[b, i], v[b, js])
        ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
        dq[b, i] = np.einsum("hj,jhd->hd", ds, k[b, js])
        dk[b, js] += np.einsum("hj,hd->jhd", ds, q[b, i])
    return dq, dk, dv


# ---------------------------------------------------------------------------- losses


def log_softmax(x):
    """log-softmax over the last axis."""
    x = f64(x)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def softmax_cross_entropy(logits, targets, label_smoothing=0.0, ignore_index=-100):
    """Mean label-smoothed cross-entropy over the rows whose target is not ignore_index (0.0 when
    none is) and its gradient (N, V); ignored rows get zero gradient."""
    lp = log_softmax(logits)
    N, V = lp.shape
    eps = label_smoothing
    targets = np.asarray(targets)
    rows = np.flatnonzero(targets != ignore_index)
    grad = np.zeros((N, V))
    if rows.size == 0:
        return 0.0, grad
    t = targets[rows]
    nll = -lp[rows, t]
    smooth = -lp[rows].mean(-1)
    loss = float(((1 - eps) * nll + eps * smooth).sum() / rows.size)
    q = np.full((rows.size, V), eps / V)
    q[np.arange(rows.size), t] += 1 - eps
    grad[rows] = (np.exp(lp[rows]) - q) / rows.size
    return loss, grad


# ---------------------------------------------------------------------------- embedding


def embedding(weight, ids, scale=1.0):
    return f64(weight)[np.asarray(ids)] * scale


def embedding_backward(dout, ids, dweight, scale=1.0):
    """dweight plus scale * dout scattered (summed) into the rows `ids` name."""
    dw = f64(dweight).copy()
    C = dw.shape[-1]
    np.add.at(dw, np.asarray(ids).reshape(-1), f64(dout).reshape(-1, C) * scale)
    return dw


# ---------------------------------------------------------------------------- optimizer


def adam_step(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam step (AdamW's decoupled decay when `decoupled`, else L2 added to the gradient):
    the new param, m, v."""
    p, g, m, v = f64(param), f64(grad), f64(m), f64(v)
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat = m / (1 - beta1**step)
    vhat = v / (1 - beta2**step)
    with np.errstate(invalid="ignore"):
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p, m, v


def global_norm(arrays: Sequence) -> float:
    """The 2-norm of all elements of all arrays."""
    return math.sqrt(sum(float((f64(a) ** 2).sum()) for a in arrays))


def clip_grad_norm(arrays: Sequence, max_norm: float):
    """(norm, arrays scaled by max_norm / (norm + 1e-6) when norm > max_norm)."""
    norm = global_norm(arrays)
    coef = max_norm / (norm + 1e-6) if norm > max_norm else 1.0
    return norm, [f64(a) * coef for a in arrays]


# ---------------------------------------------------------------------------- vision transformer


def vit_patches(images, patch):
    """(B, K, S, S) -> (B, P, K * p * p): patches in row-major grid order, cut one by one."""
    images = f64(images)
    B, n = images.shape[0], images.shape[-1] // patch
    rows = [
        images[:, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].reshape(B, -1)
        for i in range(n)
        for j in range(n)
    ]
    return np.stack(rows, axis=1)


def vit_forward(params, images, patch, num_heads, num_layers, eps):
    """Logits (B, classes) of a pre-norm Vision Transformer with GELU feed-forward layers, and
    the class token's attention probabilities over every token, per layer: (B, H, L) each. The
    parameters are named as pytransformer names them."""
    w = {k: f64(v) for k, v in params.items()}
    tokens = vit_patches(images, patch) @ w["patch_embed.weight"].T + w["patch_embed.bias"]
    B, C = tokens.shape[0], tokens.shape[-1]
    cls = np.broadcast_to(w["cls_token"], (B, 1, C))
    x = np.concatenate([cls, tokens], axis=1) + w["pos_embed"]
    L, H = x.shape[1], num_heads
    probs = []
    for i in range(num_layers):
        pre = f"encoder.layers.{i}."
        h = layer_norm(x, w[pre + "norm1.weight"], w[pre + "norm1.bias"], eps)[0]
        qkv = (h @ w[pre + "self_attn.qkv.weight"].T + w[pre + "self_attn.qkv.bias"])
        q, k, v = qkv.reshape(B, L, 3, H, C // H).transpose(2, 0, 1, 3, 4)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(C // H)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs.append(p[:, :, 0])
        ctx = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, L, C)
        x = x + ctx @ w[pre + "self_attn.out.weight"].T + w[pre + "self_attn.out.bias"]
        h = layer_norm(x, w[pre + "norm2.weight"], w[pre + "norm2.bias"], eps)[0]
        f = gelu(h @ w[pre + "ffn.fc1.weight"].T + w[pre + "ffn.fc1.bias"])
        x = x + f @ w[pre + "ffn.fc2.weight"].T + w[pre + "ffn.fc2.bias"]
    h = layer_norm(x[:, 0], w["encoder.norm.weight"], w["encoder.norm.bias"], eps)[0]
    return h @ w["head.weight"].T + w["head.bias"], probs
