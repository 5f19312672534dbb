"""CTranslate2 Transformer models in and out, with numpy only (no ctranslate2 import).

Import (`from_ctranslate2`): `model.bin` of binary versions 1-6 (`ct2_format`), the spec
`TransformerSpec` (settings stored as scalar variables: heads, pre-norm, activation, embedding
scaling) or the old `TransformerBase`/`TransformerBig` (8/16 heads, pre-norm, ReLU); float32,
float16, bfloat16, int16 and int8 weights, dequantised to float32; fused QKV; pre-norm with the
final layer norms or post-norm; a stored position table (compared with the sinusoids we
compute) or CTranslate2's own formula; the vocabularies (`shared_vocabulary`, or
`source_vocabulary` + `target_vocabulary`, as .json lists or .txt lines) and `config.json`'s
special tokens. A decoder that starts from a zero embedding (`start_from_zero_embedding`, what
CTranslate2's Marian converter writes) gets one extra target token whose embedding is zero, used
as the start token and never emitted.

Export (`export_ctranslate2`): a translator directory written as a float32 TransformerSpec that
`ctranslate2.Translator` loads, the position table stored so CTranslate2 adds exactly ours.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from ..io import CheckpointError, atomic_write_text
from ..models import Transformer, TransformerConfig
from ..nn.layers import position_table
from ..text.vocab import VocabTokenizer
from ..translator import Translator
from ._files import model_dir, read_json, write_directory
from .ct2_format import ModelBin, read_model_bin, write_model_bin

# CTranslate2's Activation enum (python/ctranslate2/specs/common_spec.py).
_ACTIVATIONS = {0: "relu", 2: "swish", 3: "gelu"}
_ACTIVATION_IDS = {v: k for k, v in _ACTIVATIONS.items()}
# Binary version 1 names no spec: CTranslate2 reads such files as TransformerBase.
_OLD_SPECS = {"TransformerBase": 8, "TransformerBig": 16, "": 8}
_INT16_GLOBAL_SCALE = 1000.0  # int16 weights of old models carry no scale
_START_TOKEN = "<ct2_zero_start>"
_NEVER = -1e9  # output bias of the zero start token: never emitted


class _Vars:
    """The variables of a model.bin, each taken at most once, so leftovers show what is not
    supported."""

    def __init__(self, mb: ModelBin, path: pathlib.Path) -> None:
        self.v, self.path, self.used = mb.variables, path, set()

    def has(self, name: str) -> bool:
        return name in self.v

    def raw(self, name: str) -> np.ndarray:
        if name not in self.v:
            raise CheckpointError(f"{self.path}: no variable {name!r}")
        self.used.add(name)
        return self.v[name]

    def flag(self, name: str, default: Any) -> Any:
        return self.raw(name).item() if name in self.v else default

    def float(self, name: str) -> np.ndarray:
        """float32 values of a weight, dequantised with its `_scale` when int8/int16."""
        value = self.raw(name)
        if value.dtype == np.int8 or value.dtype == np.int16:
            scale_name = f"{name}_scale"
            if scale_name in self.v:
                scale = self.raw(scale_name).astype(np.float32)
            elif value.dtype == np.int16:
                scale = np.float32(_INT16_GLOBAL_SCALE)
            else:
                raise CheckpointError(f"{self.path}: int8 {name!r} has no {scale_name!r}")
            if scale.ndim == 1:
                scale = scale[:, None]
            return value.astype(np.float32) / scale
        if value.dtype.kind != "f":
            raise CheckpointError(f"{self.path}: {name!r} has unsupported dtype {value.dtype}")
        return value.astype(np.float32)


def from_ctranslate2(directory: Any, *, sentencepiece: Any = None) -> Translator:
    """Builds a Translator from a CTranslate2 Transformer model directory. sentencepiece: an
    optional SentencePiece model file (path) that tokenizes text for both sides; without it
    `Translator.translate` splits on whitespace and `translate_tokens` takes token lists.
    Raises CheckpointError naming the file for a missing, truncated or unsupported file."""
    root = model_dir(directory, "a CTranslate2 model directory")
    path = root / "model.bin"
    mb = read_model_bin(path)
    conf = read_json(root / "config.json", required=False) or {}
    if not isinstance(conf, dict):
        raise CheckpointError(f"{root / 'config.json'}: expected a JSON object")
    v = _Vars(mb, path)
    settings = _settings(mb, v, conf, path)
    state, extra = _weights(v, settings, path)
    leftovers = sorted(n for n in mb.variables if n not in v.used and not _harmless(n, mb))
    if leftovers:
        raise CheckpointError(
            f"{path}: holds variables this importer does not support: {leftovers[:6]}"
        )
    src_tokens, tgt_tokens, vocab_files = _vocabularies(root)
    for side, tokens, rows in (("source", src_tokens, settings["src_rows"]),
                               ("target", tgt_tokens, settings["tgt_rows"])):
        if len(tokens) != rows:
            raise CheckpointError(
                f"{vocab_files[side]}: {len(tokens)} tokens, the model's {side} embedding has "
                f"{rows} rows"
            )
    if extra:
        tgt_tokens = tgt_tokens + [_START_TOKEN]
        if settings["tie"] in ("all", "embeddings"):
            src_tokens = src_tokens + [_START_TOKEN]
    blob = None
    if sentencepiece is not None:
        blob = pathlib.Path(sentencepiece).read_bytes()
    src_tok, tgt_tok = _tokenizers(conf, src_tokens, tgt_tokens, extra, blob, vocab_files)
    config = _config(settings, src_tok, tgt_tok, extra, root)
    model = Transformer._uninitialised(config)
    try:
        model.load_state_dict(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit together ({exc})") from None
    return Translator(model, src_tok, tgt_tok)


def _harmless(name: str, mb: ModelBin) -> bool:
    """Variables that hold a default we run anyway (flags off, alignment choices)."""
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("alignment_layer", "alignment_heads", "embeddings_merge"):
        return True
    value = mb.variables[name]
    off = leaf in ("alibi", "alibi_use_positive_positions", "scale_alibi", "multi_query_attention")
    return off and value.ndim == 0 and not value.item()


def _settings(mb: ModelBin, v: _Vars, conf: dict, path: pathlib.Path) -> dict[str, Any]:
    if mb.spec in _OLD_SPECS:
        heads, pre_norm, act = _OLD_SPECS[mb.spec], True, 0
    elif mb.spec == "TransformerSpec":
        def setting(name: str, default: Any) -> Any:
            values = {v.flag(f"{side}/{name}", None) for side in ("encoder", "decoder")}
            values.discard(None)
            if not values:
                return v.flag(name, default)
            if len(values) > 1:
                raise CheckpointError(f"{path}: encoder and decoder differ in {name} (unsupported)")
            return values.pop()
        heads, pre_norm, act = setting("num_heads", None), setting("pre_norm", True), \
            setting("activation", 0)
        if heads is None:
            raise CheckpointError(f"{path}: no num_heads variable")
    else:
        raise CheckpointError(
            f"{path}: architecture {mb.spec!r} is not supported "
            "(supported: TransformerSpec, TransformerBase, TransformerBig)"
        )
    if int(act) not in _ACTIVATIONS:
        raise CheckpointError(
            f"{path}: activation {int(act)} is not supported (supported: 0 ReLU, 2 swish, 3 GELU)"
        )
    eps = conf.get("layer_norm_epsilon")
    if conf.get("add_source_bos"):
        raise CheckpointError(f"{path.parent / 'config.json'}: add_source_bos is not supported")
    return {"heads": int(heads), "pre_norm": bool(pre_norm), "activation": _ACTIVATIONS[int(act)],
            "eps": 1e-6 if eps is None else float(eps)}


def _layer_count(v: _Vars, side: str) -> int:
    n = 0
    while any(k.startswith(f"{side}/layer_{n}/") for k in v.v):
        n += 1
    return n


def _linear(v: _Vars, ours: str, theirs: str, out: dict, bias: bool = True) -> None:
    out[f"{ours}.weight"] = v.float(f"{theirs}/weight")
    if bias:
        b = f"{theirs}/bias"
        out[f"{ours}.bias"] = (v.float(b) if v.has(b)
                               else np.zeros(out[f"{ours}.weight"].shape[0], np.float32))


def _norm(v: _Vars, ours: str, theirs: str, out: dict) -> None:
    out[f"{ours}.weight"] = v.float(f"{theirs}/gamma")
    out[f"{ours}.bias"] = v.float(f"{theirs}/beta")


def _weights(v: _Vars, s: dict, path: pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
    """Our state dict, and whether a zero start token was added to the target vocabulary."""
    src_name = ("encoder/embeddings_0/weight" if v.has("encoder/embeddings_0/weight")
                else "encoder/embeddings/weight")
    tgt_name, out_name = "decoder/embeddings/weight", "decoder/projection/weight"
    src, tgt = v.raw(src_name), v.raw(tgt_name)
    out_w = v.raw(out_name)
    tie = {(True, True): "all", (True, False): "embeddings", (False, True): "decoder",
           (False, False): "none"}[(src is tgt, out_w is tgt)]
    s["tie"] = tie
    C = tgt.shape[1]
    s["d_model"], s["src_rows"], s["tgt_rows"] = C, src.shape[0], tgt.shape[0]
    s["layers"] = (_layer_count(v, "encoder"), _layer_count(v, "decoder"))
    if min(s["layers"]) < 1:
        raise CheckpointError(f"{path}: needs at least one encoder and one decoder layer")
    s["d_ff"] = int(v.v["encoder/layer_0/ffn/linear_0/weight"].shape[0])
    s["scale"] = _scale_embeddings(v)
    extra = bool(v.flag("decoder/start_from_zero_embedding", False))
    scale_outputs = v.flag("decoder/scale_outputs", 1.0)
    if scale_outputs != 1.0:
        raise CheckpointError(f"{path}: decoder/scale_outputs {scale_outputs} is not supported")
    state: dict[str, np.ndarray] = {}
    src_f, tgt_f, out_f = v.float(src_name), v.float(tgt_name), v.float(out_name)
    bias_name = "decoder/projection/bias"
    bias = v.float(bias_name) if v.has(bias_name) else np.zeros(out_f.shape[0], np.float32)
    if extra:
        zero = np.zeros((1, C), np.float32)
        tgt_f, bias = np.vstack([tgt_f, zero]), np.append(bias, np.float32(_NEVER))
        out_f = np.vstack([out_f, zero])
        if tie in ("all", "embeddings"):
            src_f = tgt_f
    if tie in ("all", "embeddings"):
        state["embed.weight"] = tgt_f
    else:
        state["src_embed.weight"], state["tgt_embed.weight"] = src_f, tgt_f
    if tie in ("none", "embeddings"):
        state["output.weight"] = out_f
    state["output.bias"] = bias.astype(np.float32)
    for side, n in zip(("encoder", "decoder"), s["layers"], strict=True):
        for i in range(n):
            _layer(v, side, i, state)
        if s["pre_norm"]:
            _norm(v, f"{side}.norm", f"{side}/layer_norm", state)
    s["positional_encoding"], s["max_len"] = _positions(v, C, path)
    return state, extra


def _scale_embeddings(v: _Vars) -> bool:
    values = set()
    for side, emb in (("encoder", "encoder/embeddings_0"), ("decoder", "decoder/embeddings")):
        flag = v.flag(f"{emb}/multiply_by_sqrt_depth", None)
        if flag is None:
            flag = v.flag(f"{side}/scale_embeddings", True)
        values.add(bool(flag))
    if len(values) > 1:
        raise CheckpointError(f"{v.path}: encoder and decoder differ in embedding scaling")
    return values.pop()


def _layer(v: _Vars, side: str, i: int, out: dict) -> None:
    ours, theirs = f"{side}.layers.{i}", f"{side}/layer_{i}"
    sa = f"{theirs}/self_attention"
    _linear(v, f"{ours}.self_attn.qkv", f"{sa}/linear_0", out)
    _linear(v, f"{ours}.self_attn.out", f"{sa}/linear_1", out)
    _norm(v, f"{ours}.norm1", f"{sa}/layer_norm", out)
    last = "norm2"
    if side == "decoder":
        ca = f"{theirs}/attention"
        _linear(v, f"{ours}.cross_attn.q", f"{ca}/linear_0", out)
        _linear(v, f"{ours}.cross_attn.kv", f"{ca}/linear_1", out)
        _linear(v, f"{ours}.cross_attn.out", f"{ca}/linear_2", out)
        _norm(v, f"{ours}.norm2", f"{ca}/layer_norm", out)
        last = "norm3"
    _linear(v, f"{ours}.ffn.fc1", f"{theirs}/ffn/linear_0", out)
    _linear(v, f"{ours}.ffn.fc2", f"{theirs}/ffn/linear_1", out)
    _norm(v, f"{ours}.{last}", f"{theirs}/ffn/layer_norm", out)


def _positions(v: _Vars, C: int, path: pathlib.Path) -> tuple[str, int]:
    """(positional_encoding, max_len): a stored table must be one of our sinusoid layouts."""
    tables = [v.float(n) for n in ("encoder/position_encodings/encodings",
                                   "decoder/position_encodings/encodings") if v.has(n)]
    if not tables:
        return "tensor2tensor", 1024
    rows = min(t.shape[0] for t in tables)
    for kind in ("interleaved", "halves", "tensor2tensor"):
        ref = position_table(kind, rows, C)
        if all(t.shape[1] == C and np.allclose(t[:rows], ref, atol=1e-3) for t in tables):
            return kind, rows
    raise CheckpointError(
        f"{path}: the stored position encodings are not sinusoids (learned positions are not "
        "supported)"
    )


def _read_tokens(path: pathlib.Path) -> list[str]:
    if path.suffix == ".json":
        tokens = read_json(path)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"{path}: expected a JSON list of token strings")
        return tokens
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    return text.rstrip("\n").split("\n") if text else []


def _find_vocab(root: pathlib.Path, stem: str) -> pathlib.Path | None:
    for ext in (".json", ".txt"):
        if (root / f"{stem}{ext}").is_file():
            return root / f"{stem}{ext}"
    return None


def _vocabularies(root: pathlib.Path) -> tuple[list[str], list[str], dict[str, pathlib.Path]]:
    shared = _find_vocab(root, "shared_vocabulary")
    if shared is not None:
        tokens = _read_tokens(shared)
        return tokens, tokens, {"source": shared, "target": shared}
    src, tgt = _find_vocab(root, "source_vocabulary"), _find_vocab(root, "target_vocabulary")
    if src is None or tgt is None:
        raise CheckpointError(
            f"{root}: no shared_vocabulary.(json|txt) nor source_ and target_vocabulary files"
        )
    return _read_tokens(src), _read_tokens(tgt), {"source": src, "target": tgt}


def _tokenizers(conf: dict, src_tokens: list[str], tgt_tokens: list[str], extra: bool,
                blob: bytes | None, files: dict) -> tuple[VocabTokenizer, VocabTokenizer]:
    unk, eos = conf.get("unk_token", "<unk>"), conf.get("eos_token", "</s>")
    start = _START_TOKEN if extra else conf.get("decoder_start_token", "<s>")
    if start is None:
        raise CheckpointError(f"{files['target']}: decoder_start_token null is not supported")
    made = []
    add_eos = bool(conf.get("add_source_eos"))
    for side, tokens, bos, append in (("source", src_tokens, None, add_eos),
                                      ("target", tgt_tokens, start, False)):
        pad = next((t for t in ("<blank>", "<pad>") if t in tokens), unk)
        try:
            made.append(VocabTokenizer(tokens, blob, pad=pad, eos=eos, unk=unk, bos=bos,
                                       append_eos=append, skip=(eos,)))
        except ValueError as exc:
            raise CheckpointError(f"{files[side]}: {exc}") from None
    return made[0], made[1]


def _config(s: dict, src: VocabTokenizer, tgt: VocabTokenizer, extra: bool,
            root: pathlib.Path) -> TransformerConfig:
    pad = src.pad_id
    if pad >= tgt.vocab_size or pad == tgt.eos_id:
        pad = next(i for i in range(tgt.vocab_size) if i != tgt.eos_id)
    try:
        return TransformerConfig(
            src_vocab_size=src.vocab_size, tgt_vocab_size=tgt.vocab_size, d_model=s["d_model"],
            num_heads=s["heads"], d_ff=s["d_ff"], num_encoder_layers=s["layers"][0],
            num_decoder_layers=s["layers"][1], dropout=0.0, activation=s["activation"],
            norm_first=s["pre_norm"], tie_embeddings=s["tie"], output_bias=True,
            max_len=s["max_len"], pad_id=pad, bos_id=tgt.bos_id, eos_id=tgt.eos_id,
            layer_norm_eps=s["eps"], positional_encoding=s["positional_encoding"],
            scale_embedding=s["scale"], suppress_ids=(tgt.bos_id,) if extra else (),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{root / 'model.bin'}: unsupported settings ({exc})") from None


def _token_list(tok: Any, size: int) -> list[str]:
    """The token strings of a tokenizer, index = id, made unique for CTranslate2."""
    if hasattr(tok, "itos"):
        tokens = list(tok.itos)
    elif hasattr(tok, "sp"):
        tokens = [tok.sp.id_to_piece(i) for i in range(size)]
    else:
        tokens = [f"w{i}" for i in range(size)]
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if t in seen:
            tokens[i] = f"{t}@{i}"
        seen.add(tokens[i])
    return tokens


def _export_variables(model: Transformer) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    cfg, p = model.config, model.parameters()
    act = _ACTIVATION_IDS.get(cfg.activation)
    var: dict[str, np.ndarray] = {}
    aliases: dict[str, str] = {}
    src = p.get("embed.weight", p.get("src_embed.weight"))
    tgt = p.get("embed.weight", p.get("tgt_embed.weight"))
    var["encoder/embeddings_0/weight"] = src
    var["decoder/embeddings/weight"] = tgt
    if "output.weight" in p:
        var["decoder/projection/weight"] = p["output.weight"]
    else:
        aliases["decoder/projection/weight"] = "decoder/embeddings/weight"
    if cfg.tie_embeddings in ("all", "embeddings"):
        del var["encoder/embeddings_0/weight"]
        aliases["encoder/embeddings_0/weight"] = "decoder/embeddings/weight"
    if cfg.output_bias:
        var["decoder/projection/bias"] = p["output.bias"]
    flags = {"num_heads": np.int16(cfg.num_heads), "pre_norm": np.int8(cfg.norm_first),
             "activation": np.int8(act), "scale_embeddings": np.int8(cfg.scale_embedding)}
    for side, n in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        for k, value in flags.items():
            var[f"{side}/{k}"] = np.asarray(value)
        var[f"{side}/position_encodings/encodings"] = np.ascontiguousarray(model.positions)
        for i in range(n):
            _export_layer(p, side, i, var)
        if cfg.norm_first:
            var[f"{side}/layer_norm/gamma"] = p[f"{side}.norm.weight"]
            var[f"{side}/layer_norm/beta"] = p[f"{side}.norm.bias"]
    var["encoder/embeddings_merge"] = np.asarray(np.int8(0))
    var["encoder/multi_query_attention"] = np.asarray(np.int8(0))
    var["decoder/alignment_layer"] = np.asarray(np.int16(-1))
    var["decoder/alignment_heads"] = np.asarray(np.int16(1))
    for k in ("alibi", "alibi_use_positive_positions", "scale_alibi", "start_from_zero_embedding"):
        var[f"decoder/{k}"] = np.asarray(np.int8(0))
    return {k: np.asarray(v, dtype=v.dtype) for k, v in var.items()}, aliases


def _export_layer(p: dict, side: str, i: int, var: dict) -> None:
    ours, theirs = f"{side}.layers.{i}", f"{side}/layer_{i}"

    def lin(a: str, b: str) -> None:
        var[f"{theirs}/{b}/weight"] = p[f"{ours}.{a}.weight"]
        var[f"{theirs}/{b}/bias"] = p[f"{ours}.{a}.bias"]

    def norm(a: str, b: str) -> None:
        var[f"{theirs}/{b}/gamma"] = p[f"{ours}.{a}.weight"]
        var[f"{theirs}/{b}/beta"] = p[f"{ours}.{a}.bias"]

    lin("self_attn.qkv", "self_attention/linear_0")
    lin("self_attn.out", "self_attention/linear_1")
    norm("norm1", "self_attention/layer_norm")
    if side == "decoder":
        lin("cross_attn.q", "attention/linear_0")
        lin("cross_attn.kv", "attention/linear_1")
        lin("cross_attn.out", "attention/linear_2")
        norm("norm2", "attention/layer_norm")
    lin("ffn.fc1", "ffn/linear_0")
    lin("ffn.fc2", "ffn/linear_1")
    norm("norm3" if side == "decoder" else "norm2", "ffn/layer_norm")


def export_ctranslate2(model_dir_: Any, out: Any) -> pathlib.Path:
    """Writes the translator directory model_dir_ (Translator.save, `pytransformer train`, an
    import) as a CTranslate2 model directory out: model.bin (float32 TransformerSpec),
    config.json, the vocabularies. out must not exist or be empty; it is written atomically.
    Decoding settings CTranslate2 cannot store (suppress_ids, options.json) are not carried:
    pass them to translate_batch (suppress_sequences, beam_size)."""
    root = model_dir(model_dir_, "a pytransformer translator directory")
    translator = Translator.load(root)
    model, cfg = translator.model, translator.model.config
    if cfg.activation not in _ACTIVATION_IDS:
        raise ValueError(f"activation {cfg.activation!r} has no CTranslate2 equivalent")
    if cfg.encoder_attention_window is not None or cfg.decoder_attention_window is not None:
        raise ValueError("attention windows have no CTranslate2 equivalent")
    src_tokens = _token_list(translator.src_tokenizer, cfg.src_vocab_size)
    tgt_tokens = _token_list(translator.tgt_tokenizer, cfg.tgt_vocab_size)
    unk_id = getattr(translator.tgt_tokenizer, "unk_id", None)
    conf = {
        "add_source_bos": False,
        "add_source_eos": bool(getattr(translator.src_tokenizer, "append_eos", False)),
        "bos_token": tgt_tokens[cfg.bos_id],
        "decoder_start_token": tgt_tokens[cfg.bos_id],
        "eos_token": tgt_tokens[cfg.eos_id],
        "unk_token": tgt_tokens[unk_id] if unk_id is not None else tgt_tokens[cfg.pad_id],
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "multi_query_attention": False,
    }
    variables, aliases = _export_variables(model)

    def fill(tmp: pathlib.Path) -> None:
        write_model_bin(tmp / "model.bin", "TransformerSpec", 7, variables, aliases)
        atomic_write_text(tmp / "config.json", json.dumps(conf, indent=2) + "\n")
        if src_tokens == tgt_tokens:
            atomic_write_text(tmp / "shared_vocabulary.json", json.dumps(src_tokens, indent=1))
        else:
            atomic_write_text(tmp / "source_vocabulary.json", json.dumps(src_tokens, indent=1))
            atomic_write_text(tmp / "target_vocabulary.json", json.dumps(tgt_tokens, indent=1))

    return write_directory(out, fill)
