"""Hugging Face Marian (OPUS-MT) models as pytransformer translators, without PyTorch.

A Marian model directory holds `config.json`, the weights (`model.safetensors`, read here with
numpy, or `pytorch_model.bin`, which needs torch), the SentencePiece models `source.spm` and
`target.spm`, `vocab.json` (and `target_vocab.json` when the vocabularies are separate),
`tokenizer_config.json` and `generation_config.json`. What the architecture needs from ours
(read from the Hugging Face modelling code, written here anew): post-norm layers, sinusoidal
positions with the sines in the first half of each vector ("halves"), SiLU ("swish") FFNs,
embeddings scaled by sqrt(d_model) or not (`scale_embedding`), an output bias
(`final_logits_bias`), the decoder started from the pad token (`decoder_start_token_id`) and
the pad token never emitted (`bad_words_ids`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from .. import io
from ..io import CheckpointError
from ..models import Transformer, TransformerConfig
from ..nn.layers import position_table
from ..text.vocab import VocabTokenizer
from ..translator import Translator
from ._files import model_dir, read_json

_ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}


def from_marian(directory: Any) -> Translator:
    """Builds a Translator from a local Hugging Face Marian model directory (see the module
    docstring). Raises CheckpointError naming the file for a missing, unreadable or
    inconsistent file, ImportError when only pytorch_model.bin is there and torch is not
    installed."""
    root = model_dir(directory, "a Hugging Face Marian model directory")
    hf = read_json(root / "config.json")
    gen = read_json(root / "generation_config.json", required=False)
    if gen is None:
        gen = hf  # older models keep the generation settings in config.json
    config = marian_config(hf, root / "config.json", _bad_words(gen))
    weights, weights_path = _load_weights(root)
    config = dataclasses.replace(
        config, tie_embeddings=tie_of(*embedding_matrices(weights, weights_path))
    )
    state = marian_state(weights, hf, config, weights_path)
    model = Transformer._uninitialised(config)
    try:
        model.load_state_dict(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: does not fit config.json ({exc})") from None
    src_tok, tgt_tok = marian_tokenizers(root, config)
    translator = Translator(model, src_tok, tgt_tok)
    translator.options.update(_generation_defaults(gen, config))
    return translator


def marian_config(
    hf: Any, path: pathlib.Path, suppress: tuple[int, ...] = ()
) -> TransformerConfig:
    """Our TransformerConfig for a Marian config.json (a dict); suppress: token ids decoding
    never emits besides the pad token."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    arch = hf.get("architectures") or ["MarianMTModel"]
    if hf.get("model_type", "marian") != "marian" or "MarianMTModel" not in arch:
        raise CheckpointError(
            f"{path}: model_type {hf.get('model_type')!r}, architectures {arch}: not a "
            "MarianMTModel"
        )

    def get(key: str, default: Any = None) -> Any:
        if key not in hf and default is None:
            raise CheckpointError(f"{path}: no {key!r}")
        return hf.get(key, default)

    activation = get("activation_function", "swish")
    if activation not in _ACTIVATIONS:
        raise CheckpointError(
            f"{path}: activation_function {activation!r} is not supported "
            f"(supported: {sorted(_ACTIVATIONS)})"
        )
    for a, b in (("encoder_attention_heads", "decoder_attention_heads"),
                 ("encoder_ffn_dim", "decoder_ffn_dim")):
        if get(a) != get(b):
            raise CheckpointError(f"{path}: {a} {get(a)} differs from {b} {get(b)} (unsupported)")
    if hf.get("normalize_before", False) or hf.get("normalize_embedding", False):
        raise CheckpointError(f"{path}: normalize_before/normalize_embedding are not Marian's")
    share = bool(hf.get("share_encoder_decoder_embeddings", True))
    tie_output = bool(hf.get("tie_word_embeddings", True))
    vocab = get("vocab_size")
    tgt_vocab = vocab if share else (hf.get("decoder_vocab_size") or vocab)
    tie = {(True, True): "all", (True, False): "embeddings",
           (False, True): "decoder", (False, False): "none"}[(share, tie_output)]
    pad = get("pad_token_id")
    start = hf.get("decoder_start_token_id", pad)
    try:
        return TransformerConfig(
            src_vocab_size=vocab, tgt_vocab_size=tgt_vocab, d_model=get("d_model"),
            num_heads=get("encoder_attention_heads"), d_ff=get("encoder_ffn_dim"),
            num_encoder_layers=get("encoder_layers"), num_decoder_layers=get("decoder_layers"),
            dropout=0.0, activation=_ACTIVATIONS[activation], norm_first=False,
            tie_embeddings=tie, output_bias=True, max_len=get("max_position_embeddings"),
            pad_id=pad, bos_id=start, eos_id=get("eos_token_id"), layer_norm_eps=1e-5,
            positional_encoding="halves", scale_embedding=bool(hf.get("scale_embedding", True)),
            suppress_ids=(pad, *suppress),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unsupported settings ({exc})") from None


def _load_weights(root: pathlib.Path) -> tuple[dict[str, np.ndarray], pathlib.Path]:
    st = root / "model.safetensors"
    if st.is_file():
        tensors, _ = io.load_safetensors(st)
        return tensors, st
    pt = root / "pytorch_model.bin"
    if pt.is_file():
        return _load_torch(pt), pt
    raise CheckpointError(f"{root}: no model.safetensors or pytorch_model.bin")


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading pytorch_model.bin needs PyTorch (pip install torch), or give "
            "the model as model.safetensors, which needs no torch"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _pick(weights: dict, names: list[str], path: pathlib.Path) -> np.ndarray:
    for name in names:
        for key in (name, name.removeprefix("model.")):
            if key in weights:
                return np.asarray(weights[key], np.float32)
    raise CheckpointError(f"{path}: no tensor {names[0]!r}")


def marian_state(
    weights: dict[str, np.ndarray], hf: dict, cfg: TransformerConfig, path: pathlib.Path
) -> dict[str, np.ndarray]:
    """Our parameters from a Marian state dict: q/k/v fused, layer norms renamed, the tied
    embeddings found under whichever name the file kept."""
    def get(*names: str) -> np.ndarray:
        return _pick(weights, list(names), path)

    _check_positions(weights, cfg, path)
    out: dict[str, np.ndarray] = {}
    src, tgt, lm = embedding_matrices(weights, path)
    if cfg.tie_embeddings in ("all", "embeddings"):
        out["embed.weight"] = src
    else:
        out["src_embed.weight"], out["tgt_embed.weight"] = src, tgt
    if cfg.tie_embeddings in ("none", "embeddings"):
        out["output.weight"] = lm
    bias = weights.get("final_logits_bias")
    if bias is None:
        bias = np.zeros(cfg.tgt_vocab_size, np.float32)
    out["output.bias"] = np.asarray(bias, np.float32).reshape(-1)
    for side, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for i in range(n):
            out.update(_layer(get, side, i))
    return out


def embedding_matrices(
    weights: dict, path: pathlib.Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source embedding, target embedding, output projection), under whichever names the
    file kept (tied tensors are stored once)."""
    src = _pick(weights, ["model.encoder.embed_tokens.weight", "model.shared.weight"], path)
    tgt = _pick(weights, ["model.decoder.embed_tokens.weight", "model.shared.weight"], path)
    lm = _pick(weights, ["lm_head.weight", "model.decoder.embed_tokens.weight",
                         "model.shared.weight"], path)
    return src, tgt, lm


def tie_of(src: np.ndarray, tgt: np.ndarray, lm: np.ndarray) -> str:
    """Which matrices are one: decided on the tensors themselves, since Transformers' tying
    rules (share_encoder_decoder_embeddings, tie_word_embeddings) changed across versions."""
    same_in = src.shape == tgt.shape and np.array_equal(src, tgt)
    same_out = lm.shape == tgt.shape and np.array_equal(lm, tgt)
    return {(True, True): "all", (True, False): "embeddings",
            (False, True): "decoder", (False, False): "none"}[(same_in, same_out)]


def _linear(get, ours: str, *theirs: str) -> dict[str, np.ndarray]:
    return {
        f"{ours}.weight": np.concatenate([get(f"{t}.weight") for t in theirs]),
        f"{ours}.bias": np.concatenate([get(f"{t}.bias") for t in theirs]),
    }


def _layer(get, side: str, i: int) -> dict[str, np.ndarray]:
    ours, theirs = f"{side}.layers.{i}", f"model.{side}.layers.{i}"
    sa = f"{theirs}.self_attn"
    out = _linear(get, f"{ours}.self_attn.qkv", f"{sa}.q_proj", f"{sa}.k_proj", f"{sa}.v_proj")
    out |= _linear(get, f"{ours}.self_attn.out", f"{sa}.out_proj")
    out |= _linear(get, f"{ours}.norm1", f"{theirs}.self_attn_layer_norm")
    out |= _linear(get, f"{ours}.ffn.fc1", f"{theirs}.fc1")
    out |= _linear(get, f"{ours}.ffn.fc2", f"{theirs}.fc2")
    if side == "encoder":
        return out | _linear(get, f"{ours}.norm2", f"{theirs}.final_layer_norm")
    ca = f"{theirs}.encoder_attn"
    out |= _linear(get, f"{ours}.cross_attn.q", f"{ca}.q_proj")
    out |= _linear(get, f"{ours}.cross_attn.kv", f"{ca}.k_proj", f"{ca}.v_proj")
    out |= _linear(get, f"{ours}.cross_attn.out", f"{ca}.out_proj")
    out |= _linear(get, f"{ours}.norm2", f"{theirs}.encoder_attn_layer_norm")
    return out | _linear(get, f"{ours}.norm3", f"{theirs}.final_layer_norm")


def _check_positions(weights: dict, cfg: TransformerConfig, path: pathlib.Path) -> None:
    """A stored position table must be the sinusoids we compute (Marian's are fixed)."""
    expected = position_table("halves", cfg.max_len, cfg.d_model)
    for side in ("encoder", "decoder"):
        for key in (f"model.{side}.embed_positions.weight", f"{side}.embed_positions.weight"):
            table = weights.get(key)
            if table is None:
                continue
            if table.shape != expected.shape or not np.allclose(table, expected, atol=1e-4):
                raise CheckpointError(
                    f"{path}: {key} is not the sinusoidal table Marian computes (shape "
                    f"{table.shape}); learned positions are not supported"
                )


def _vocab_list(path: pathlib.Path, size: int) -> list[str]:
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise CheckpointError(f"{path}: expected a JSON object of token -> id")
    tokens: list[str | None] = [None] * size
    for token, i in vocab.items():
        if not 0 <= i < size:
            raise CheckpointError(
                f"{path}: {token!r} has id {i}, outside the model's vocabulary of {size}"
            )
        if tokens[i] is not None:
            raise CheckpointError(f"{path}: id {i} is given to {tokens[i]!r} and {token!r}")
        tokens[i] = token
    missing = [i for i, t in enumerate(tokens) if t is None]
    if missing:
        raise CheckpointError(
            f"{path}: {len(vocab)} tokens for a model vocabulary of {size} (ids {missing[:5]} "
            "have no token)"
        )
    return tokens  # type: ignore[return-value]


def _spm(path: pathlib.Path) -> bytes:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (the SentencePiece model)")
    return path.read_bytes()


def marian_tokenizers(root: pathlib.Path, cfg: TransformerConfig) -> tuple[VocabTokenizer, ...]:
    """MarianTokenizer's behaviour: source pieces from source.spm looked up in vocab.json with
    `</s>` appended; target ids through target_vocab.json (separate vocabularies) or vocab.json,
    detokenised with target.spm (separate) or source.spm (shared, as Hugging Face decodes)."""
    tc = read_json(root / "tokenizer_config.json", required=False) or {}
    separate = bool(tc.get("separate_vocabs", False))
    specials = {k: _token(tc, f"{k}_token", d)
                for k, d in (("pad", "<pad>"), ("eos", "</s>"), ("unk", "<unk>"))}
    src_tokens = _vocab_list(root / "vocab.json", cfg.src_vocab_size)
    tgt_file = "target_vocab.json" if separate else "vocab.json"
    tgt_tokens = _vocab_list(root / tgt_file, cfg.tgt_vocab_size)
    source_spm = _spm(root / "source.spm")
    target_spm = _spm(root / "target.spm") if separate else source_spm
    try:
        src = VocabTokenizer(src_tokens, source_spm, append_eos=True, **specials)
        tgt = VocabTokenizer(tgt_tokens, target_spm, **specials)
    except ValueError as exc:
        raise CheckpointError(f"{root / 'tokenizer_config.json'}: {exc}") from None
    for tok, file in ((src, "vocab.json"), (tgt, tgt_file)):
        if (tok.pad_id, tok.eos_id) != (cfg.pad_id, cfg.eos_id):
            raise CheckpointError(
                f"{root / file}: pad/eos ids {tok.pad_id}/{tok.eos_id} differ from config.json's "
                f"{cfg.pad_id}/{cfg.eos_id}"
            )
    return src, tgt


def _token(tc: dict, key: str, default: str) -> str:
    value = tc.get(key, default)
    if isinstance(value, dict):  # the AddedToken form
        value = value.get("content", default)
    return value if isinstance(value, str) else default


def _bad_words(gen: Any) -> tuple[int, ...]:
    """The single-token entries of bad_words_ids (longer sequences cannot be suppressed by id)."""
    bad = gen.get("bad_words_ids") if isinstance(gen, dict) else None
    if not isinstance(bad, list):
        return ()
    return tuple(b[0] for b in bad if isinstance(b, list) and len(b) == 1 and isinstance(b[0], int))


def _generation_defaults(gen: Any, cfg: TransformerConfig) -> dict[str, Any]:
    """beam_size and max_decoding_length from the generation settings. Hugging Face's
    max_length counts the decoder start token, ours only generated tokens."""
    out: dict[str, Any] = {}
    if not isinstance(gen, dict):
        return out
    beams = gen.get("num_beams")
    if isinstance(beams, int) and not isinstance(beams, bool) and beams >= 1:
        out["beam_size"] = beams
    max_length = gen.get("max_length")
    if isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 2:
        out["max_decoding_length"] = min(max_length - 1, cfg.max_len)
    return out
