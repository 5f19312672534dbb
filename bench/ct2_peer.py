"""CTranslate2 as a decoding peer: our Transformer's weights in a CTranslate2 model directory.

Needs `pip install ctranslate2` (optional; bench_decode.py skips this peer without it). Only the
paper's architecture is mapped: post-norm, ReLU, tie_embeddings "decoder" or "none", an output
bias. Positions go in as a table (ours: the paper's interleaved sinusoids), so CTranslate2 adds
exactly our encodings; token ids become the strings "<blank>", "<s>", "</s>", "w3", "w4", ...
for pad, bos, eos and the rest (ids must follow our defaults 0, 1, 2).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _tokens(vocab: int) -> list[str]:
    special = ["<blank>", "<s>", "</s>"]
    return special + [f"w{i}" for i in range(len(special), vocab)]


def convert(model: Any, out_dir: str) -> None:
    """Writes `model` (a pytransformer.Transformer) as a float32 CTranslate2 model in out_dir."""
    from ctranslate2.specs import TransformerSpec, common_spec

    cfg = model.config
    if cfg.norm_first or cfg.activation != "relu" or cfg.tie_embeddings == "all":
        raise ValueError("ct2_peer maps post-norm ReLU models with tie_embeddings decoder/none")
    if (cfg.pad_id, cfg.bos_id, cfg.eos_id) != (0, 1, 2):
        raise ValueError("ct2_peer expects pad_id=0, bos_id=1, eos_id=2")
    p = model.parameters()
    spec = TransformerSpec.from_config(
        (cfg.num_encoder_layers, cfg.num_decoder_layers),
        cfg.num_heads,
        pre_norm=False,
        activation=common_spec.Activation.RELU,
    )
    spec.config.layer_norm_epsilon = cfg.layer_norm_eps
    spec.config.decoder_start_token = "<s>"
    spec.config.unk_token = "w3"  # never produced specially: CTranslate2 needs one to exist
    positions = np.ascontiguousarray(model.positions)
    for side, stack in (("encoder", spec.encoder), ("decoder", spec.decoder)):
        emb = p["src_embed.weight" if side == "encoder" else "tgt_embed.weight"]
        embeddings = stack.embeddings  # the encoder has a list (one per input feature)
        (embeddings[0] if isinstance(embeddings, list) else embeddings).weight = emb
        stack.scale_embeddings = True  # x * sqrt(d_model), as ours
        stack.position_encodings.encodings = positions
        for i, layer in enumerate(stack.layer):
            _set_layer(layer, p, f"{side}.layers.{i}", side == "decoder")
    out_w = p["tgt_embed.weight"] if cfg.tie_embeddings == "decoder" else p["output.weight"]
    spec.decoder.projection.weight = out_w
    if cfg.output_bias:
        spec.decoder.projection.bias = p["output.bias"]
    spec.register_source_vocabulary(_tokens(cfg.src_vocab_size))
    spec.register_target_vocabulary(_tokens(cfg.tgt_vocab_size))
    spec.validate()
    spec.optimize(quantization="float32")
    spec.save(out_dir)


def _set_layer(layer: Any, p: dict, prefix: str, decoder: bool) -> None:
    attn = layer.self_attention
    _linear(attn.linear[0], p, f"{prefix}.self_attn.qkv")
    _linear(attn.linear[1], p, f"{prefix}.self_attn.out")
    _norm(attn.layer_norm, p, f"{prefix}.norm1")
    if decoder:
        cross = layer.attention
        _linear(cross.linear[0], p, f"{prefix}.cross_attn.q")
        _linear(cross.linear[1], p, f"{prefix}.cross_attn.kv")
        _linear(cross.linear[2], p, f"{prefix}.cross_attn.out")
        _norm(cross.layer_norm, p, f"{prefix}.norm2")
    _linear(layer.ffn.linear_0, p, f"{prefix}.ffn.fc1")
    _linear(layer.ffn.linear_1, p, f"{prefix}.ffn.fc2")
    _norm(layer.ffn.layer_norm, p, f"{prefix}.norm3" if decoder else f"{prefix}.norm2")


def _linear(spec: Any, p: dict, name: str) -> None:
    spec.weight = p[f"{name}.weight"]
    spec.bias = p[f"{name}.bias"]


def _norm(spec: Any, p: dict, name: str) -> None:
    spec.gamma = p[f"{name}.weight"]
    spec.beta = p[f"{name}.bias"]


class Peer:
    """translate(sources) with CTranslate2 on `threads` threads, forced to `length` tokens."""

    def __init__(self, model_dir: str, threads: int) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(
            model_dir, device="cpu", compute_type="float32", inter_threads=1,
            intra_threads=threads,
        )

    def translate(self, sources: list[list[int]], beam: int, length: int) -> list[list[int]]:
        batch = [[_name(i) for i in s] for s in sources]
        out = self.translator.translate_batch(
            batch, beam_size=beam, min_decoding_length=length, max_decoding_length=length,
            max_batch_size=len(batch), length_penalty=0.0,
        )
        return [[_id(t) for t in r.hypotheses[0]] for r in out]


def _name(i: int) -> str:
    return _tokens(3)[i] if i < 3 else f"w{i}"


def _id(token: str) -> int:
    return {"<blank>": 0, "<s>": 1, "</s>": 2}.get(token) or int(token[1:])

