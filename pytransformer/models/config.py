"""The hyper-parameters of every model class, validated on construction and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..checks import check_bool, check_float, check_int, check_optional_int

ACTIVATIONS = ("relu", "gelu", "swish")
TIES = ("decoder", "all", "none", "embeddings")
# Sinusoidal position tables (nn.layers.position_table): "interleaved" (ours, the paper's
# sin/cos pairs), "halves" (sines in the first half of each vector, cosines in the second:
# Hugging Face Marian, fairseq), "tensor2tensor" (halves with the timescales of tensor2tensor and
# positions counted from 1: what CTranslate2 computes when a model stores no table).
POSITIONAL_ENCODINGS = ("interleaved", "halves", "tensor2tensor")


class JsonConfig:
    """Dict and JSON round trips for a configuration dataclass (how checkpoints store it)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Any:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: invalid JSON ({exc})") from None
        return cls.from_dict(d)


@dataclasses.dataclass
class TransformerConfig(JsonConfig):
    """Hyper-parameters of the model (defaults: the paper's base model).

    tie_embeddings: "decoder" — the target embedding is the output projection (the paper);
    "all" — source embedding, target embedding and output projection are one matrix (needs
    src_vocab_size == tgt_vocab_size); "embeddings" — source and target embeddings are one
    matrix, the output projection another; "none" — three separate matrices.
    activation: the FFN's "relu", "gelu" or "swish" (SiLU, x * sigmoid(x)).
    positional_encoding: which sinusoidal table is added to the embeddings (see
    POSITIONAL_ENCODINGS); scale_embedding: multiply the token embeddings by sqrt(d_model)
    before adding it (the paper; Marian's `scale_embedding`).
    output_bias: the output projection has a bias (Marian's `final_logits_bias`).
    norm_first: False = post-norm (the paper); True = pre-norm with a final LayerNorm per stack.
    encoder_attention_window, decoder_attention_window: restricted self-attention in that stack,
    position i attending only to the positions j with |i - j| <= window (in the decoder, with
    the causal mask: the last window + 1 positions); None = full attention. Cross-attention is
    never windowed.
    Layer counts may be 0 for a stack a variant does not use (TransformerLM has no encoder).
    pad_id, bos_id and eos_id are target tokens (< tgt_vocab_size), pad_id != eos_id; the models
    that embed a source (Transformer, TransformerEncoderModel) also need pad_id < src_vocab_size.
    bos_id is the decoder start token: the first token fed to the decoder, in training and in
    decoding (Marian models start from their pad token: bos_id == pad_id is allowed).
    suppress_ids: target tokens decoding never emits (Marian's `bad_words_ids`, its pad token).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation: str = "relu"
    norm_first: bool = False
    tie_embeddings: str = "decoder"
    output_bias: bool = True
    max_len: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    layer_norm_eps: float = 1e-5
    encoder_attention_window: int | None = None
    decoder_attention_window: int | None = None
    positional_encoding: str = "interleaved"
    scale_embedding: bool = True
    suppress_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff", "max_len"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        for name in ("num_encoder_layers", "num_decoder_layers", "pad_id", "bos_id", "eos_id"):
            setattr(self, name, check_int(name, getattr(self, name), 0))
        check_layer_settings(self)
        if self.tie_embeddings not in TIES:
            raise ValueError(f"tie_embeddings must be one of {TIES}, got {self.tie_embeddings!r}")
        for name in ("norm_first", "output_bias", "scale_embedding"):
            check_bool(name, getattr(self, name))
        if self.positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(
                f"positional_encoding must be one of {POSITIONAL_ENCODINGS}, "
                f"got {self.positional_encoding!r}"
            )
        self._check_special_ids()
        self.suppress_ids = check_token_ids("suppress_ids", self.suppress_ids, self.tgt_vocab_size)
        for name in ("encoder_attention_window", "decoder_attention_window"):
            setattr(self, name, check_optional_int(name, getattr(self, name), 0))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (suppress_ids as a list: what JSON gives back, so a
        config read from a file compares equal to the one it was written from)."""
        d = super().to_dict()
        d["suppress_ids"] = list(self.suppress_ids)
        return d

    def _check_special_ids(self) -> None:
        """pad, bos and eos are target tokens (fed, predicted, padded); EOS must differ from PAD
        or it drops out of the loss with the padding, and the model never learns to stop."""
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if value >= self.tgt_vocab_size:
                raise ValueError(
                    f"{name}: {value} is outside the target vocabulary of {self.tgt_vocab_size}"
                )
        if self.pad_id == self.eos_id:
            raise ValueError(f"pad_id and eos_id: must differ, both are {self.pad_id}")


def check_token_ids(name: str, ids: Any, vocab_size: int) -> tuple[int, ...]:
    """A list or tuple of distinct token ids below vocab_size, as a sorted tuple (JSON stores
    the tuple as a list: this turns it back)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name}: expected a tuple of token ids, got {type(ids).__name__}")
    out = []
    for i, value in enumerate(ids):
        value = check_int(f"{name}[{i}]", value, 0)
        if value >= vocab_size:
            raise ValueError(
                f"{name}[{i}]: {value} is outside the target vocabulary of {vocab_size}"
            )
        out.append(value)
    return tuple(sorted(set(out)))


def check_layer_settings(cfg: Any) -> None:
    """The fields every attention stack reads (nn.blocks): heads that divide d_model, dropout
    rates in [0, 1), a positive layer-norm epsilon, a known activation. Converts in place."""
    if cfg.d_model % cfg.num_heads:
        raise ValueError(
            f"d_model ({cfg.d_model}) must be divisible by num_heads ({cfg.num_heads})"
        )
    for name in ("dropout", "attention_dropout"):
        setattr(cfg, name, check_float(name, getattr(cfg, name), 0.0, 1.0))
    cfg.layer_norm_eps = check_float("layer_norm_eps", cfg.layer_norm_eps, positive=True)
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {cfg.activation!r}")


def check_same_vocabularies(cfg: TransformerConfig) -> None:
    """tie_embeddings "all" and "embeddings" make the source and target vocabularies one
    matrix."""
    if cfg.src_vocab_size != cfg.tgt_vocab_size:
        raise ValueError(
            f'tie_embeddings="{cfg.tie_embeddings}" needs src_vocab_size == tgt_vocab_size, got '
            f"{cfg.src_vocab_size} and {cfg.tgt_vocab_size}"
        )


def check_source_pad(cfg: TransformerConfig) -> None:
    """A model that embeds a source pads it with pad_id, so pad_id is a source token too."""
    if cfg.pad_id >= cfg.src_vocab_size:
        raise ValueError(
            f"pad_id: {cfg.pad_id} is outside the source vocabulary of {cfg.src_vocab_size}"
        )
