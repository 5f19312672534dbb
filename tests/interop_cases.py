"""Tiny Hugging Face Marian models built locally for the interop tests (no model hub): random
weights, a SentencePiece model trained on generated text, a MarianTokenizer-style vocab.json."""

from __future__ import annotations

import io
import json
import os

import numpy as np

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron", "pi"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 9))) for _ in range(n)]


def _spm(lines: list[str], vocab: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab, model_type="unigram",
        character_coverage=1.0, minloglevel=2, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
    )
    return buf.getvalue()


def _vocab(blob: bytes, size: int | None = None) -> dict[str, int]:
    """</s>, <unk>, the pieces, fillers up to size - 1, <pad>."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=blob)
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    while size is not None and len(vocab) < size - 1:
        vocab[f"<fill{len(vocab)}>"] = len(vocab)
    vocab["<pad>"] = len(vocab)  # Marian: the pad token last, the decoder's start token
    return vocab


def make_marian(out, *, share=True, tie=True, enc=2, dec=1, d_model=16, heads=2, ffn=24,
                activation="swish", scale_embedding=True, safetensors=True, seed=0):
    """Writes a Marian model directory (save_pretrained + tokenizer files); returns the model."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    os.makedirs(out, exist_ok=True)
    lines = sentences(300, seed)
    src_blob = _spm(lines, 26)
    src_vocab = _vocab(src_blob)
    files = {"source.spm": src_blob, "target.spm": src_blob}
    tgt_vocab = src_vocab
    if not share:
        tgt_blob = _spm([" ".join(reversed(s.split())) + " pi" for s in lines], 24)
        files["target.spm"] = tgt_blob
        tgt_vocab = _vocab(tgt_blob, len(src_vocab))  # the same pad id on both sides
        with open(os.path.join(out, "target_vocab.json"), "w") as f:
            json.dump(tgt_vocab, f)
    for name, blob in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump(src_vocab, f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"separate_vocabs": not share, "source_lang": "xx", "target_lang": "yy"}, f)
    V, Vt = len(src_vocab), len(tgt_vocab)
    pad = V - 1
    cfg = MarianConfig(
        vocab_size=V, decoder_vocab_size=Vt, d_model=d_model, encoder_layers=enc,
        decoder_layers=dec, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=64, pad_token_id=pad,
        eos_token_id=0, decoder_start_token_id=pad, share_encoder_decoder_embeddings=share,
        tie_word_embeddings=tie, scale_embedding=scale_embedding,
        activation_function=activation, init_std=0.3, dropout=0.0,
    )
    torch.manual_seed(seed)
    model = MarianMTModel(cfg).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
        for emb in {id(e): e for e in (model.model.encoder.embed_tokens,
                                         model.model.decoder.embed_tokens)}.values():
            emb.weight[pad] = 0  # as trained Marian models have it (padding_idx)
    model.save_pretrained(out)
    if not safetensors:  # Transformers 5 writes safetensors only: the older PyTorch form
        os.remove(os.path.join(out, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(out, "pytorch_model.bin"))
    return model
