"""Decoding a real test set with a trained model: speed and accuracy of pytransformer float32
and int8 beside CTranslate2 float32 and int8 on the same weights.

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_real_decode.py WORK DATA_DIR
        [--model pytransformer-60min] [--threads 1] [--beams 1,4] [--repeats 2] [--write]

WORK is bench_multi30k.py's work directory: WORK/data (the preprocessed corpus, whose
tokenizers are used) and WORK/models/NAME (a model it saved at a budget). DATA_DIR holds
test_2016_flickr.{en,de}. Every system translates the 1,000 test sources (max_batch_size 32,
sorted by length inside each system, length_penalty 0.6, max_decoding_length 2 x the longest
source + 10) with greedy search and beam 4; the runs alternate the systems and the median
time counts. Reported per system: generated tokens/s (EOS included), BLEU and chrF (sacrebleu,
detokenised) and the share of sentences identical to pytransformer float32 (CTranslate2 int8:
also to CTranslate2 float32). CTranslate2 gets our weights through
``pytransformer.interop.export_ctranslate2`` and quantizes them itself when it loads with
compute_type="int8"; its rows are left out when ctranslate2 is not installed.

This is issue 15's accuracy check (int8 BLEU within 0.3 of float32) on the Multi30k model, and
the free-running speed rows of issues 12 and 15 on real sentences (outputs end where the model
ends them, not at a forced length). --write puts the table in bench/RESULTS.md (section
"real-decode").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from _common import command_line, markdown_table, update_results  # noqa: E402
from bench_decode import _alternating_medians, _keeping  # noqa: E402
from bench_multi30k import read  # noqa: E402

import pytransformer as pt  # noqa: E402
from pytransformer.models import Transformer  # noqa: E402
from pytransformer.text.tokenizer import load_tokenizer  # noqa: E402

LENGTH_PENALTY, BATCH = 0.6, 32
Decode = Callable[[list[list[int]], int, int], list[list[int]]]


def ours(model: Transformer) -> Decode:
    def decode(sources: list[list[int]], beam: int, length: int) -> list[list[int]]:
        out = model.translate(sources, beam_size=beam, length_penalty=LENGTH_PENALTY,
                              max_decoding_length=length, max_batch_size=BATCH)  # fmt: skip
        return [list(r.hypotheses[0]) for r in out]

    return decode


def ctranslate2_systems(model: Transformer, tokenizers: tuple, threads: int,
                        tmp: str) -> dict[str, Decode]:  # fmt: skip
    """CTranslate2 float32 and int8 on model's weights ({} without ctranslate2)."""
    try:
        import ctranslate2
    except ImportError:
        print("ctranslate2 is not installed: its rows are left out", flush=True)
        return {}
    from pytransformer.interop import export_ctranslate2
    from pytransformer.translator import Translator

    Translator(model, *tokenizers).save(os.path.join(tmp, "translator"))
    ct2_dir = export_ctranslate2(os.path.join(tmp, "translator"), os.path.join(tmp, "ct2"))
    vocab = _vocabulary(ct2_dir)
    index = {t: i for i, t in enumerate(vocab)}
    systems = {}
    for compute_type in ("float32", "int8"):
        engine = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=compute_type,
                                        inter_threads=1, intra_threads=threads)  # fmt: skip
        systems[f"CTranslate2 {compute_type}"] = _ct2_decode(engine, vocab, index)
    return systems


def _vocabulary(ct2_dir: pathlib.Path) -> list[str]:
    path = ct2_dir / "shared_vocabulary.json"
    if not path.exists():
        raise SystemExit(f"{ct2_dir}: separate vocabularies; this bench expects a shared one")
    return json.loads(path.read_text(encoding="utf-8"))


def _ct2_decode(engine, vocab: list[str], index: dict[str, int]) -> Decode:
    def decode(sources: list[list[int]], beam: int, length: int) -> list[list[int]]:
        out = engine.translate_batch(
            [[vocab[i] for i in s] for s in sources], beam_size=beam,
            length_penalty=LENGTH_PENALTY, max_decoding_length=length, max_batch_size=BATCH,
        )  # fmt: skip
        return [[index[t] for t in r.hypotheses[0]] for r in out]

    return decode


def generated(hyps: list[list[int]]) -> int:
    """Generated tokens, each hypothesis's EOS included (neither system returns it)."""
    return sum(len(h) + 1 for h in hyps)


def time_systems(systems: dict[str, Decode], sources: list[list[int]], beam: int, length: int,
                 repeats: int) -> tuple[dict[str, float], dict[str, list[list[int]]]]:  # fmt: skip
    """Median seconds per full decode of each system (alternating), and each one's outputs."""
    outputs: dict[str, list[list[int]]] = {}
    fns = {name: (lambda d=decode: d(sources, beam, length)) for name, decode in systems.items()}
    return _alternating_medians(_keeping(fns, outputs), repeats), outputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=pathlib.Path)
    ap.add_argument("data_dir", type=pathlib.Path)
    ap.add_argument("--model", default="pytransformer-60min", help="a name under WORK/models")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="put the table into bench/RESULTS.md")
    args = ap.parse_args()
    import sacrebleu

    model_dir, data = args.work / "models" / args.model, args.work / "data"
    for path in (model_dir / "config.json", data / "src_tokenizer.json",
                 args.data_dir / "test_2016_flickr.en", args.data_dir / "test_2016_flickr.de"):
        if not path.is_file():
            ap.error(f"{path} is missing")  # fmt: skip
    pt.set_num_threads(args.threads)
    src_tok, tgt_tok = (load_tokenizer(data / f"{s}_tokenizer.json") for s in ("src", "tgt"))
    sources = [src_tok.encode(s) for s in read(args.data_dir / "test_2016_flickr.en")]
    refs = read(args.data_dir / "test_2016_flickr.de")
    length = 2 * max(map(len, sources)) + 10
    models = {c: Transformer.load(model_dir, compute_type=c).eval() for c in ("float32", "int8")}
    systems = {f"pytransformer {c}": ours(m) for c, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        systems.update(ctranslate2_systems(models["float32"], (src_tok, tgt_tok), args.threads,
                                           tmp))  # fmt: skip
        for beam in map(int, args.beams.split(",")):
            seconds, outputs = time_systems(systems, sources, beam, length, args.repeats)
            base = "pytransformer float32"
            base_rate = generated(outputs[base]) / seconds[base]
            for name, hyps in outputs.items():
                text = [tgt_tok.decode(h) for h in hyps]
                rate = generated(hyps) / seconds[name]
                same = _same(hyps, outputs[base])
                peer = outputs.get("CTranslate2 float32") if name == "CTranslate2 int8" else None
                rows.append([
                    f"beam {beam}" if beam > 1 else "greedy", name, f"{rate:.0f}",
                    f"{rate / base_rate:.2f}x",
                    f"{sacrebleu.corpus_bleu(text, [refs]).score:.2f}",
                    f"{sacrebleu.corpus_chrf(text, [refs]).score:.2f}",
                    f"{same:.3f}" + (f" ({_same(hyps, peer):.3f})" if peer else ""),
                ])  # fmt: skip
                print(" | ".join(rows[-1]), flush=True)
    header = ["search", "system", "tokens/s", "speed vs ours float32", "BLEU", "chrF",
              "same sentences as ours float32 (as CTranslate2 float32)"]  # fmt: skip
    table = markdown_table(header, rows)
    print(table)
    if args.write:
        cmd = command_line("bench_real_decode.py", ["WORK", "DATA_DIR", *sys.argv[3:]])
        note = (f"Command: `{cmd}` (model WORK/models/{args.model}, {args.threads} thread(s), "
                f"{len(sources)} sentences of test_2016_flickr, median of {args.repeats} "
                "alternating runs).\n\n")  # fmt: skip
        update_results("real-decode", note + table)
    return 0


def _same(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


if __name__ == "__main__":
    sys.exit(main())
