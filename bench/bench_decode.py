"""Decoding throughput: generated tokens/s of Transformer.translate vs a PyTorch eager KV-cache
decoder and CTranslate2 float32 on identical (random) weights.

Three kinds of rows, configs "small" and "base", 1 and 2 threads, greedy and beam 4; medians of
runs that alternate the systems:
- forced: 32 sources of lengths uniform in 16..48, output length forced to 64 (min = max decoding
  length), so every system generates 32 x 64 tokens; against torch and CTranslate2.
- free: the same 32 sources on a copy of the model whose EOS output row and bias make greedy
  hypotheses end at varied lengths (half of max_decoding_length = 64 on average), so beams finish
  at different steps and finished sentences leave the batch; EOS allowed, length_penalty 1 (score
  / L, CTranslate2's default); against CTranslate2 (torch's decoder follows no peer's EOS rules).
- latency: one sentence at a time (batch 1), the first 8 sources in turn, forced length 64;
  against CTranslate2. Also reported as milliseconds per sentence.
One call is long (seconds to a minute), so each system is warmed up on a short decode rather than
a full one, and "base" takes one timed run per system unless --repeats says otherwise. Writes the
`decode` section of bench/RESULTS.md.

    [OMP_WAIT_POLICY=PASSIVE] PYTHONPATH=$PWD python bench/bench_decode.py
        [--configs small,base] [--threads 1,2] [--beams 1,4] [--rows forced,free,latency]
        [--repeats N] [--no-write]

On the shared machine, OMP_WAIT_POLICY=PASSIVE (it applies to torch's OpenMP as well) keeps a
descheduled team thread from stalling every 2-thread call.
"""

from __future__ import annotations

import argparse
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

from _common import command_line, markdown_table, update_results  # noqa: E402

import pytransformer  # noqa: E402
from pytransformer import Transformer, TransformerConfig  # noqa: E402

CONFIGS = {
    "small": dict(d_model=256, num_heads=4, d_ff=1024, num_encoder_layers=3,
                  num_decoder_layers=3, src_vocab_size=8000, tgt_vocab_size=8000),
    "base": dict(d_model=512, num_heads=8, d_ff=2048, num_encoder_layers=6,
                 num_decoder_layers=6, src_vocab_size=32000, tgt_vocab_size=32000),
}
N_SOURCES, LENGTH = 32, 64
N_LATENCY = 8  # sources translated one at a time in a latency row
REPEATS = {"small": 3, "base": 1}


def make_sources(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=int(rng.integers(16, 49))).tolist()
            for _ in range(N_SOURCES)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="small,base")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--beams", default="1,4")
    ap.add_argument("--rows", default="forced,free,latency")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per system")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args()
    try:
        import torch
        from torch_reference import build_torch_model
    except ImportError:
        torch = None
    ct2 = _ct2_available()
    kinds = args.rows.split(",")
    rows = []
    load_start = os.getloadavg()[0]
    for name in args.configs.split(","):
        cfg = TransformerConfig(**CONFIGS[name], dropout=0.0, max_len=256)
        sources = make_sources(cfg.src_vocab_size)
        models = {"forced": Transformer(cfg, seed=0).eval()}
        if "free" in kinds:
            models["free"] = eos_biased(models["forced"], sources[:8])
        models["latency"] = models["forced"]
        tm = build_torch_model(cfg, models["forced"].state_dict()).eval() if torch else None
        dirs = {}
        if ct2:
            import ct2_peer

            for kind in {"forced", "free"} & set(models):
                dirs[kind] = tempfile.TemporaryDirectory()
                ct2_peer.convert(models[kind], dirs[kind].name)
            dirs["latency"] = dirs["forced"]
        for threads in map(int, args.threads.split(",")):
            pytransformer.set_num_threads(threads)
            if torch:
                torch.set_num_threads(threads)
            for kind in kinds:
                peer = ct2_peer.Peer(dirs[kind].name, threads) if dirs else None
                for beam in map(int, args.beams.split(",")):
                    row = _row(kind, name, threads, beam, models[kind],
                               tm if kind == "forced" else None, sources, peer,
                               args.repeats or REPEATS[name])
                    rows.append(row)
    header = ["rows", "config", "threads", "beam", "ours tok/s", "ours ms/sentence",
              "torch tok/s", "ours/torch", "same tokens (torch)", "CTranslate2 tok/s",
              "ours/CTranslate2", "same tokens (CTranslate2)"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_write:
        loads = f"{load_start:.1f} / {os.getloadavg()[0]:.1f}"
        cmd = command_line("bench_decode.py", sys.argv[1:])
        update_results("decode", _report(table, cmd, loads))


def _row(kind, name, threads, beam, model, tm, sources, peer, repeats) -> list:
    """One table row: times the systems on `kind`'s workload and compares their tokens."""
    if kind == "latency":
        sources = sources[:N_LATENCY]
    fns = _systems(kind, model, tm, sources, beam, peer=peer)
    t0 = time.perf_counter()
    for warm in _systems(kind, model, tm, sources[:2], beam, length=4, peer=peer).values():
        warm()
    outputs: dict = {}
    med = _alternating_medians(_keeping(fns, outputs), repeats)
    ours_tokens = [r.hypotheses[0] for r in outputs["ours"]]
    toks = sum(len(t) for t in ours_tokens)
    ours = toks / med["ours"]
    row = [kind, name, threads, beam, f"{ours:.0f}", f"{1e3 * med['ours'] / len(sources):.1f}"]
    for other in ("torch", "ct2"):
        if other not in outputs:
            row += ["-", "-", "-"]
            continue
        rate = sum(len(t) for t in outputs[other]) / med[other]
        agree = _agreement(ours_tokens, outputs[other], by_sentence=kind == "free")
        row += [f"{rate:.0f}", f"{ours / rate:.2f}x", f"{agree:.3f}"]
    print(" | ".join(map(str, row)), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return row


def eos_biased(model: Transformer, probe: list[list[int]]) -> Transformer:
    """A copy of `model` that ends its outputs at varied lengths. Random weights alone make
    greedy outputs either end at once or repeat one token to the length limit, so EOS's output
    row becomes a multiple of the direction of the mean positional encoding of positions 16-48
    (its logit then rises with the position, at a rate that depends on the sentence) and its bias
    is set by bisection so greedy outputs of `probe` average LENGTH / 2 tokens."""
    cfg = model.config
    eos = cfg.eos_id
    state = model.state_dict()
    row = "tgt_embed.weight" if cfg.tie_embeddings in ("decoder", "all") else "output.weight"
    direction = model.positions[16:48].mean(axis=0)
    weight = state[row].copy()
    weight[eos] = 3.0 * direction / np.linalg.norm(direction)

    def biased(b: float) -> Transformer:
        m = Transformer(cfg, seed=0).eval()
        bias = state["output.bias"].copy()
        bias[eos] += b
        m.load_state_dict({**state, row: weight, "output.bias": bias})
        return m

    lo, hi = -8.0, 8.0
    for _ in range(10):
        mid = (lo + hi) / 2
        out = biased(mid).translate(probe, beam_size=1, max_decoding_length=LENGTH,
                                    min_decoding_length=1)
        mean = float(np.mean([len(r.hypotheses[0]) for r in out]))
        lo, hi = (mid, hi) if mean > LENGTH / 2 else (lo, mid)
    return biased((lo + hi) / 2)


def _ct2_available() -> bool:
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return False
    return True


def _systems(kind, model, tm, sources, beam, length=LENGTH, peer=None):
    """The calls to time: ours, torch's (forced rows) and CTranslate2's when importable."""
    if kind == "free":
        fns = {"ours": lambda: model.translate(sources, beam_size=beam, length_penalty=1.0,
                                               max_decoding_length=length,
                                               min_decoding_length=1)}
        if peer is not None:
            fns["ct2"] = lambda: _ct2_free(peer, sources, beam, length)
        return fns
    batch = 1 if kind == "latency" else len(sources)
    fns = {"ours": lambda: [r for i in range(0, len(sources), batch) for r in model.translate(
        sources[i : i + batch], beam_size=beam, min_decoding_length=length,
        max_decoding_length=length)]}
    if tm is not None:
        import torch_decode

        if beam == 1:
            fns["torch"] = lambda: torch_decode.greedy(tm, sources, max_len=length, min_len=length)
        else:
            fns["torch"] = lambda: torch_decode.beam_search(
                tm, sources, beam_size=beam, max_len=length, min_len=length)
    if peer is not None:
        fns["ct2"] = lambda: [t for i in range(0, len(sources), batch)
                              for t in peer.translate(sources[i : i + batch], beam, length)]
    return fns


def _ct2_free(peer, sources, beam, length):
    """CTranslate2 with EOS allowed and its defaults: score / L, min_decoding_length 1."""
    import ct2_peer

    batch = [[ct2_peer._name(i) for i in s] for s in sources]
    out = peer.translator.translate_batch(
        batch, beam_size=beam, max_decoding_length=length, length_penalty=1.0,
        max_batch_size=len(batch))
    return [[ct2_peer._id(t) for t in r.hypotheses[0]] for r in out]


def _alternating_medians(fns, repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns so machine noise hits all alike
    (bench/_common.interleaved_medians without its full-size warm-up call)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _keeping(fns, outputs):
    """The same calls, each remembering its last result (to compare the systems' tokens without
    extra runs)."""
    def keep(name, fn):
        def call():
            outputs[name] = fn()
        return call
    return {name: keep(name, fn) for name, fn in fns.items()}


def _agreement(ours, peer, by_sentence: bool = False) -> float:
    """Fraction of output tokens (by_sentence: of sentences) equal between ours and the peer
    (random weights: near-ties in the logits may flip a token and everything after it)."""
    if by_sentence:
        return sum(int(a == b) for a, b in zip(ours, peer, strict=True)) / len(ours)
    same = sum(int(a == b) for x, y in zip(ours, peer, strict=True)
               for a, b in zip(x, y, strict=False))
    return same / sum(len(x) for x in ours)


def _report(table: str, cmd: str, loads: str) -> str:
    return (
        "Generated tokens/s of `Transformer.translate`, encoder included, against a PyTorch "
        "eager KV-cache decoder (bench/torch_decode.py over tests/torch_reference.py) and "
        "CTranslate2 float32 (the same weights converted by bench/ct2_peer.py, intra_threads = "
        f"threads). `forced`: {N_SOURCES} sources of lengths 16-48, output forced to {LENGTH} "
        "tokens (min = max decoding length). `free`: the same sources on a copy of the model "
        "whose EOS output row and bias make greedy outputs end at varied lengths, about half of "
        f"max_decoding_length = {LENGTH} on average (see `eos_biased`), EOS allowed after the "
        "first token, length_penalty 1; `same tokens` there is the fraction of "
        f"sentences identical to ours. `latency`: {N_LATENCY} sources one at a time (batch 1), "
        f"forced length {LENGTH}. Medians of runs alternating the systems (after a short "
        f"warm-up decode), {REPEATS['small']} per system for small, {REPEATS['base']} for base "
        "unless the command says --repeats; `same tokens` elsewhere: fraction of output tokens "
        "identical to ours.\n\n"
        f"Command: `{cmd}` (1-minute load average at start / end: {loads}, on 2 cores)\n\n"
        f"{table}\n"
    )


if __name__ == "__main__":
    main()
