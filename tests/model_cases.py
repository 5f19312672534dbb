"""Tiny configurations, random padded batches and the finite-difference gradient check shared
by the model tests."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

import pytransformer as pt

PAD, BOS, EOS = 0, 1, 2


def tiny_config(**overrides) -> pt.TransformerConfig:
    """A model small enough for finite differences: C=16, H=2 (D=8), F=24, 2+2 layers."""
    base = dict(
        src_vocab_size=19,
        tgt_vocab_size=23,
        d_model=16,
        num_heads=2,
        d_ff=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=0.0,
        max_len=32,
        pad_id=PAD,
        bos_id=BOS,
        eos_id=EOS,
    )
    base.update(overrides)
    if base.get("tie_embeddings") == "all":
        base["tgt_vocab_size"] = base["src_vocab_size"]
    return pt.TransformerConfig(**base)


def small_config(vocab: int, d_model: int, layers: int = 1, **overrides) -> pt.TransformerConfig:
    """A model with one vocabulary for source and target, 2 heads, d_ff = 2 * d_model and `layers`
    encoder and decoder layers; `overrides` set any other field or replace these."""
    base = dict(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        d_model=d_model,
        num_heads=2,
        d_ff=2 * d_model,
        num_encoder_layers=layers,
        num_decoder_layers=layers,
    )
    base.update(overrides)
    return pt.TransformerConfig(**base)


def padded(rng: np.random.Generator, lengths: np.ndarray, width: int, vocab: int) -> np.ndarray:
    """(B, width) ids in [3, vocab) for positions < length, PAD after."""
    ids = rng.integers(3, vocab, size=(len(lengths), width))
    ids[np.arange(width)[None, :] >= lengths[:, None]] = PAD
    return ids


def random_batch(
    cfg: pt.TransformerConfig, rng: np.random.Generator, B: int = 3, S: int = 7, T: int = 6
) -> SimpleNamespace:
    """A Batch-like object with ragged source and target lengths (the longest fills the width)."""
    src_lengths = rng.integers(1, S + 1, size=B)
    src_lengths[0] = S
    tgt_lengths = rng.integers(1, T + 1, size=B)
    tgt_lengths[-1] = T
    src = padded(rng, src_lengths, S, cfg.src_vocab_size)
    y = padded(rng, tgt_lengths - 1, T, cfg.tgt_vocab_size)
    tgt_in = np.full((B, T), PAD, np.int64)
    tgt_in[:, 0] = BOS
    tgt_in[:, 1:] = y[:, : T - 1]
    tgt_out = y.copy()
    tgt_out[np.arange(B), tgt_lengths - 1] = EOS
    return SimpleNamespace(
        src=src,
        src_lengths=src_lengths,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        tgt_lengths=tgt_lengths,
        labels=None,
        n_tokens=int(tgt_lengths.sum()),
    )


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (b the reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def mean_loss(model, batch, seed):
    """The mean label-smoothed loss of one pass (its gradients left in the model)."""
    model.zero_grad()
    loss_sum, n = model.loss_and_grad(batch, label_smoothing=0.1, dropout_seed=seed)
    return loss_sum / n


def check_gradients(model, batch, seed=5):
    """Compares each parameter tensor's gradient with a central difference of the loss along a
    direction u (unit norm) mixing the gradient's own direction and a random one.

    Our kernels are float32 only, so the loss (~3) carries rounding noise of ~1e-6; a step of
    h = 1e-2 keeps the difference's noise near 1e-5..1e-4 while the truncation error
    h^2/6 * f''' stays smaller still. The directional derivative is about |g|/sqrt(2) or more,
    so 0.2% relative plus 3e-5 absolute lets rounding through (measured: errors stay below ~1%
    of that bound over several seeds) while a gradient off by 1% fails; a wrong sign, a
    missing term or a transposed weight gives errors of order |g|."""
    rng = np.random.default_rng(0)
    mean_loss(model, batch, seed)
    grads = {k: g.astype(np.float64) for k, g in model.gradients().items()}
    h = 1e-2
    checked = 0
    for name, p in model.parameters().items():
        g = grads[name]
        r = rng.standard_normal(p.shape)
        u = r / np.linalg.norm(r)
        if np.linalg.norm(g) > 0:
            u = u + g / np.linalg.norm(g)
            u /= np.linalg.norm(u)
        saved = p.copy()
        p += (h * u).astype(np.float32)
        f_plus = mean_loss(model, batch, seed)
        p[...] = saved - (h * u).astype(np.float32)
        f_minus = mean_loss(model, batch, seed)
        p[...] = saved
        fd = (f_plus - f_minus) / (2 * h)
        predicted = float((g * u).sum())
        assert abs(fd - predicted) <= 3e-5 + 2e-3 * abs(predicted), (name, fd, predicted)
        checked += 1
    assert checked == len(model.parameters())
