"""An imported Marian model: pytransformer vs CTranslate2 float32 vs Hugging Face generate().

A base-size MarianMTModel (d_model 512, 8 heads, FFN 2048, 6 + 6 layers, SiLU, V = 32000,
random weights) is saved with save_pretrained, imported with `interop.from_marian` and
converted for CTranslate2 with its own TransformersConverter; the three decode the same 32
sources (16..48 pieces) to a forced length of 64 tokens (min = max decoding length, no EOS),
greedy and beam 4, as one batch of 32 and one sentence at a time. Each system is warmed up
once; medians of --repeats runs that alternate the systems. Writes the `marian` section of
bench/RESULTS.md unless --no-write (or --quick, a tiny model for a smoke run).

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_marian.py
        [--threads 1] [--repeats 3] [--quick] [--no-write]

Needs the interop-test extra (transformers, torch, ctranslate2, sentencepiece).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer.interop import from_marian  # noqa: E402

BASE = dict(d_model=512, heads=8, ffn=2048, layers=6, vocab=32000, sentences=32,
            min_len=16, max_len=48, out_len=64)
QUICK = dict(d_model=64, heads=4, ffn=128, layers=2, vocab=1000, sentences=4,
             min_len=3, max_len=8, out_len=8)


def build(out: pathlib.Path, size: dict) -> None:
    """A Marian directory: random weights, a SentencePiece model on generated text, vocab.json
    of its pieces padded with filler tokens to the vocabulary size (pad last)."""
    import torch
    from interop_cases import _spm, _vocab, sentences
    from transformers import MarianConfig, MarianMTModel

    out.mkdir(parents=True, exist_ok=True)
    blob = _spm(sentences(300), 26)
    vocab = _vocab(blob, size["vocab"])
    (out / "source.spm").write_bytes(blob)
    (out / "target.spm").write_bytes(blob)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "tokenizer_config.json").write_text(json.dumps({"separate_vocabs": False}))
    V = len(vocab)
    cfg = MarianConfig(
        vocab_size=V, decoder_vocab_size=V, d_model=size["d_model"],
        encoder_layers=size["layers"], decoder_layers=size["layers"],
        encoder_attention_heads=size["heads"], decoder_attention_heads=size["heads"],
        encoder_ffn_dim=size["ffn"], decoder_ffn_dim=size["ffn"], max_position_embeddings=512,
        pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1,
        activation_function="swish",
    )
    torch.manual_seed(0)
    MarianMTModel(cfg).eval().save_pretrained(out)


def sources(size: dict, vocab: int) -> list[list[int]]:
    """Source ids (pieces and fillers, EOS last as MarianTokenizer ends them)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(size["min_len"], size["max_len"] + 1, size["sentences"])
    return [[*rng.integers(2, vocab - 1, n - 1).tolist(), 0] for n in lengths]


def systems(root: pathlib.Path, srcs: list[list[int]], size: dict, threads: int) -> dict:
    """name -> run(beam, batched) for ours, CTranslate2 and Hugging Face."""
    import ctranslate2
    import torch
    from ctranslate2.converters import TransformersConverter
    from transformers import MarianMTModel

    torch.set_num_threads(threads)
    pytransformer.set_num_threads(threads)
    L = size["out_len"]
    ours = from_marian(root).model
    TransformersConverter(str(root)).convert(str(root / "ct2"), quantization="float32")
    ct2 = ctranslate2.Translator(str(root / "ct2"), device="cpu", compute_type="float32",
                                 inter_threads=1, intra_threads=threads)
    itos = sorted(json.loads((root / "vocab.json").read_text()).items(), key=lambda kv: kv[1])
    pieces = [[itos[i][0] for i in s] for s in srcs]
    hf = MarianMTModel.from_pretrained(root).eval()

    def groups(items, batched):
        return [items] if batched else [[x] for x in items]

    def run_ours(beam, batched):
        for g in groups(srcs, batched):
            ours.translate(g, beam_size=beam, min_decoding_length=L, max_decoding_length=L,
                           length_penalty=0.0)

    def run_ct2(beam, batched):
        for g in groups(pieces, batched):
            ct2.translate_batch(g, beam_size=beam, min_decoding_length=L,
                                max_decoding_length=L, length_penalty=0.0,
                                max_batch_size=len(g))

    def run_hf(beam, batched):
        for g in groups(srcs, batched):
            width = max(map(len, g))
            ids = torch.full((len(g), width), hf.config.pad_token_id)
            mask = torch.zeros((len(g), width), dtype=torch.long)
            for r, s in enumerate(g):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, num_beams=beam,
                            min_new_tokens=L, max_new_tokens=L, do_sample=False,
                            **({"length_penalty": 0.0} if beam > 1 else {}))

    return {"pytransformer": run_ours, "ctranslate2 f32": run_ct2, "hf generate": run_hf}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny model: a smoke run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    size = QUICK if args.quick else BASE
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "marian"
        build(root, size)
        srcs = sources(size, size["vocab"])
        fns = systems(root, srcs, size, args.threads)
        rows = []
        tokens = size["sentences"] * size["out_len"]
        for beam in (1, 4):
            for batched in (True, False):
                for fn in fns.values():
                    fn(beam, batched)  # warm-up
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn(beam, batched)
                        times[name].append(time.perf_counter() - t0)
                med = {name: statistics.median(t) for name, t in times.items()}
                ours = med["pytransformer"]
                for name, t in med.items():
                    batching = f"batch {size['sentences']}" if batched else "batch 1"
                    rows.append([f"beam {beam}", batching, name,
                                 f"{tokens / t:.0f}", f"{t / ours:.2f}x" if name != "pytransformer"
                                 else "1.00x"])
    header = ["search", "batching", "system", "tokens/s", "time vs ours"]
    table = markdown_table(header, rows)
    print(table)
    if not (args.no_write or args.quick):
        note = (f"Base Marian (d_model 512, 6+6 layers, SiLU, V={size['vocab']}), random "
                f"weights, {size['sentences']} sources, forced {size['out_len']} tokens, "
                f"{args.threads} thread(s), median of {args.repeats}; "
                f"{os.cpu_count()} CPUs visible.\n\n")
        update_results("marian", note + table)


if __name__ == "__main__":
    main()
