"""Text in, text out: a trained Transformer with its tokenizers, and the training pipeline behind
the ``pytransformer train`` command and the demo.

A translator directory holds::

    src_tokenizer.json, tgt_tokenizer.json   the tokenizers (the same file twice when shared)
    model/                                   config.json + model.safetensors (the final model)
    checkpoints/step-*/                      resumable training checkpoints
    checkpoints/log.jsonl                    the training log (``pytransformer plot`` reads it)
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .models import Transformer, TransformerConfig
from .text.tokenizer import CharTokenizer, SentencePieceTokenizer, load_tokenizer
from .train.data import TokenBatcher, make_batch
from .train.optim import Adam
from .train.schedule import Noam
from .train.trainer import Trainer, latest_checkpoint

__all__ = ["Translator", "TrainOptions", "train_translator"]


class Translator:
    """A Transformer and the tokenizers of its two languages."""

    def __init__(self, model: Transformer, src_tokenizer: Any, tgt_tokenizer: Any):
        if not isinstance(model, Transformer):
            raise TypeError(f"model: expected a Transformer, got {type(model).__name__}")
        cfg = model.config
        for name, tok, size in (("src_tokenizer", src_tokenizer, cfg.src_vocab_size),
                                ("tgt_tokenizer", tgt_tokenizer, cfg.tgt_vocab_size)):
            if tok.vocab_size != size:
                raise ValueError(
                    f"{name}: vocabulary of {tok.vocab_size} does not match the model's {size}"
                )
        self.model = model.eval()
        self.src_tokenizer, self.tgt_tokenizer = src_tokenizer, tgt_tokenizer

    @classmethod
    def load(cls, directory: str | os.PathLike, compute_type: str | None = None) -> Translator:
        """Loads ``directory/model`` (or, before training finished, the newest checkpoint);
        compute_type "int8" runs it in int8, "float32" in float32, None as stored (see
        `Transformer.load`)."""
        root = pathlib.Path(directory)
        if not root.is_dir():
            raise FileNotFoundError(f"directory: {root} does not exist")
        model_dir = root / "model"
        if not (model_dir / "config.json").exists():
            latest = latest_checkpoint(root / "checkpoints")
            if latest is None:
                raise FileNotFoundError(f"directory: no model or checkpoint under {root}")
            model_dir = pathlib.Path(latest)
        model = Transformer.load(model_dir, compute_type=compute_type)
        return cls(model, load_tokenizer(root / "src_tokenizer.json"),
                   load_tokenizer(root / "tgt_tokenizer.json"))

    def save(self, directory: str | os.PathLike) -> None:
        root = pathlib.Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.src_tokenizer.save(root / "src_tokenizer.json")
        self.tgt_tokenizer.save(root / "tgt_tokenizer.json")
        self.model.save(root / "model")

    def encode_sources(self, sentences: Sequence[str]) -> list[list[int]]:
        if isinstance(sentences, str):
            raise TypeError("sentences: expected a list of strings, got one string")
        return [self.src_tokenizer.encode(s) for s in sentences]

    def translate(self, sentences: Sequence[str], *, n_best: int = 1, **options: Any) -> list[Any]:
        """Translates each sentence; returns strings, or lists of ``n_best`` strings when
        ``n_best`` > 1. ``options`` go to ``Transformer.translate`` (beam_size,
        length_penalty, max_decoding_length, max_batch_size, ...)."""
        results = self.model.translate(
            self.encode_sources(sentences), num_hypotheses=n_best, **options
        )
        texts = [[self.tgt_tokenizer.decode(h) for h in r.hypotheses] for r in results]
        return texts if n_best > 1 else [t[0] for t in texts]

    def attention(
        self, sentence: str, **options: Any
    ) -> tuple[list[str], list[str], np.ndarray, str]:
        """(source tokens, target tokens, attention, translation) of the best translation.
        attention is (target x source): the last decoder layer's cross-attention averaged over
        heads, or the layer `attention_layer=` chooses; (heads x target x source) with
        `attention_heads=True`. Other options go to `translate`."""
        result = self.model.translate(
            self.encode_sources([sentence]), return_attention=True, **options
        )[0]
        ids = result.hypotheses[0]
        src_tokens = self.src_tokenizer.tokens(sentence)
        tgt_tokens = [self.tgt_tokenizer.decode([i]) or "·" for i in ids]
        return src_tokens, tgt_tokens, result.attention[0], self.tgt_tokenizer.decode(ids)


@dataclass
class TrainOptions:
    """Settings of ``train_translator`` (the CLI's --config file holds the same keys)."""

    model: dict[str, Any] = field(default_factory=dict)  # TransformerConfig fields
    tokenizer: str = "sentencepiece"  # or "char"
    vocab_size: int = 8000
    shared_vocab: bool = False
    steps: int = 2000
    max_tokens: int = 4096
    lr: float = 1e-3  # peak learning rate, reached after `warmup` steps (the paper's schedule)
    warmup: int = 400
    label_smoothing: float = 0.1
    max_grad_norm: float | None = 1.0
    checkpoint_every: int = 500
    valid_every: int = 250
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOptions:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}")
        return cls(**d)


def _make_tokenizers(src: Sequence[str], tgt: Sequence[str], opts: TrainOptions):
    def build(texts: Sequence[str]):
        if opts.tokenizer == "char":
            return CharTokenizer.train(texts)
        if opts.tokenizer == "sentencepiece":
            return SentencePieceTokenizer.train(texts, vocab_size=opts.vocab_size)
        raise ValueError(f"tokenizer: expected 'sentencepiece' or 'char', got {opts.tokenizer!r}")

    if opts.shared_vocab:
        shared = build(list(src) + list(tgt))
        return shared, shared
    return build(src), build(tgt)


def _check_parallel(src: Sequence[str], tgt: Sequence[str], what: str) -> None:
    if len(src) != len(tgt):
        raise ValueError(f"{what}: {len(src)} source lines but {len(tgt)} target lines")
    if len(src) == 0:
        raise ValueError(f"{what}: no sentence pairs")


def _paper_schedule(d_model: int, warmup: int, peak_lr: float) -> Noam:
    """The paper's warm-up then inverse-sqrt decay, scaled so its peak is ``peak_lr``."""
    if not peak_lr > 0:
        raise ValueError(f"lr: expected a positive peak learning rate, got {peak_lr}")
    return Noam(d_model, warmup, factor=peak_lr * (d_model * warmup) ** 0.5)


def _encode_pairs(src_tok, tgt_tok, src: Sequence[str], tgt: Sequence[str]) -> list:
    return [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in zip(src, tgt, strict=True)]


def train_translator(
    train_src: Sequence[str],
    train_tgt: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    valid_src: Sequence[str] | None = None,
    valid_tgt: Sequence[str] | None = None,
    options: TrainOptions | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Translator:
    """Trains tokenizers and a Transformer on parallel text and saves everything in ``out_dir``.

    With ``resume=True`` the tokenizers and the newest checkpoint in ``out_dir`` are reused and
    training continues where it stopped, bit-identically to an uninterrupted run.
    A KeyboardInterrupt saves a checkpoint before it propagates.
    """
    opts = options or TrainOptions()
    _check_parallel(train_src, train_tgt, "training data")
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt_dir = root / "checkpoints"
    latest = latest_checkpoint(ckpt_dir) if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"resume: no checkpoint under {ckpt_dir}")
    if latest is not None:
        src_tok = load_tokenizer(root / "src_tokenizer.json")
        tgt_tok = load_tokenizer(root / "tgt_tokenizer.json")
    else:
        src_tok, tgt_tok = _make_tokenizers(train_src, train_tgt, opts)
        src_tok.save(root / "src_tokenizer.json")
        tgt_tok.save(root / "tgt_tokenizer.json")
    pairs = _encode_pairs(src_tok, tgt_tok, train_src, train_tgt)
    longest = max(max(len(s), len(t) + 1) for s, t in pairs)
    model_cfg = {"max_len": max(256, longest), **opts.model}
    if opts.shared_vocab:
        model_cfg.setdefault("tie_embeddings", "all")
    config = TransformerConfig(
        src_vocab_size=src_tok.vocab_size, tgt_vocab_size=tgt_tok.vocab_size,
        pad_id=src_tok.pad_id, bos_id=tgt_tok.bos_id, eos_id=tgt_tok.eos_id, **model_cfg,
    )
    model = Transformer(config, seed=opts.seed)
    ids = dict(pad_id=config.pad_id, bos_id=config.bos_id, eos_id=config.eos_id)
    batcher = TokenBatcher(pairs, max(opts.max_tokens, longest), seed=opts.seed, **ids)
    valid = None
    if valid_src is not None and valid_tgt is not None:
        _check_parallel(valid_src, valid_tgt, "validation data")
        vpairs = _encode_pairs(src_tok, tgt_tok, valid_src, valid_tgt)
        valid = [make_batch(vpairs[i : i + 64], **ids) for i in range(0, len(vpairs), 64)]
    optimizer = Adam(
        model.parameters(), lr=_paper_schedule(config.d_model, opts.warmup, opts.lr),
        max_grad_norm=opts.max_grad_norm,
    )
    trainer = Trainer(
        model, optimizer, batcher, valid_data=valid, label_smoothing=opts.label_smoothing,
        seed=opts.seed, checkpoint_dir=ckpt_dir, checkpoint_every=opts.checkpoint_every,
        valid_every=opts.valid_every, progress=progress,
    )
    if latest is not None:
        trainer.load_checkpoint(latest)
    try:
        trainer.fit(opts.steps)
    except KeyboardInterrupt:
        trainer.save_checkpoint()
        raise
    translator = Translator(model, src_tok, tgt_tok)
    model.save(root / "model")
    return translator
