"""Training recipes sized for CPUs: ``pytransformer train --preset tiny|small|base|big``.

Each preset is a model shape (TransformerConfig fields) with the batch size, peak learning rate
and warm-up that go with it. ``small`` is the default of ``train``: on a Multi30k-sized corpus
(29,000 pairs, about 400,000 target tokens) an epoch is about a hundred updates of 4,096 tokens,
minutes on two cores. ``base`` is the paper's base model and ``big`` its big one (hours per
epoch of the same corpus on two cores); their learning rates follow common fairseq recipes for
4k-token batches. Parameter counts depend on the vocabulary: ``parameter_count(name, V)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "get_preset", "parameter_count"]


@dataclass(frozen=True)
class Preset:
    """A recipe: ``model`` (TransformerConfig fields), ``max_tokens`` per batch, the peak ``lr``
    of the warm-up / inverse-square-root schedule and its ``warmup`` updates."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)
    max_tokens: int = 4096
    lr: float = 1e-3
    warmup: int = 400
    description: str = ""


def _shape(d: int, heads: int, ff: int, layers: int, dropout: float) -> dict[str, Any]:
    return {"d_model": d, "num_heads": heads, "d_ff": ff, "num_encoder_layers": layers,
            "num_decoder_layers": layers, "dropout": dropout}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", _shape(128, 4, 512, 2, 0.1), 4096, 2e-3, 200,
               "smoke tests and very small corpora"),
        Preset("small", _shape(256, 4, 1024, 3, 0.1), 4096, 1e-3, 400,
               "the default: Multi30k-sized corpora on a few cores"),
        Preset("base", _shape(512, 8, 2048, 6, 0.1), 4096, 7e-4, 4000,
               "the paper's base model: large corpora, many cores or long runs"),
        Preset("big", _shape(1024, 16, 4096, 6, 0.3), 4096, 5e-4, 4000,
               "the paper's big model (dropout 0.3): for comparison, slow on CPUs"),
    )
}
DEFAULT_PRESET = "small"


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (ValueError naming the choices otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def parameter_count(name: str, vocab_size: int, *, shared_vocab: bool = True) -> int:
    """Parameters of the preset's model for a vocabulary of ``vocab_size`` (one shared and tied
    embedding when ``shared_vocab``, else source and target embeddings of that size each, the
    target one tied to the output projection), counted without building it."""
    m = get_preset(name).model
    C, F, L = m["d_model"], m["d_ff"], m["num_encoder_layers"]
    ln = 2 * C
    attn = 4 * C * C + 4 * C  # fused QKV (3C x C) and output (C x C), with biases
    ffn = 2 * C * F + F + C
    enc = L * (attn + ffn + 2 * ln)
    dec = m["num_decoder_layers"] * (2 * attn + ffn + 3 * ln)
    emb = vocab_size * C * (1 if shared_vocab else 2)
    return enc + dec + emb + vocab_size  # + the output bias
