"""The ``pytransformer`` command (also ``python -m pytransformer``).

Subcommands: preprocess, train, average, translate, evaluate, quantize, convert, export, demo,
plot. Errors a user can cause end with one line on stderr and a non-zero exit status, never a
traceback. translate reads its input in blocks and writes each block's translations as they
come (stdout) or into a file replaced once all are in (--output), in bounded memory. Under
``mpiexec -n N`` train is data-parallel and translate is sharded over the ranks
(docs/SCALING.md); an error on one rank ends every rank, with a message naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from ._native import set_num_threads
from .checks import check_float
from .io import CheckpointError, split_lines
from .text.metrics import score_translations
from .train import distributed


class UserError(Exception):
    """A problem with the command line or the files it names."""


def _path_error(arg: str, path: str, exc: OSError) -> UserError:
    """One line naming the argument, the path and what is wrong with it."""
    if isinstance(exc, FileNotFoundError):
        why = "does not exist"
    elif isinstance(exc, IsADirectoryError):
        why = "is a directory"
    elif isinstance(exc, NotADirectoryError):
        why = "a part of it is not a directory"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return UserError(f"{arg}: {path}: {why}")


def _read_text(path: str, arg: str) -> str:
    """The UTF-8 text of a file, or of stdin for "-"; read as bytes, so no newline is translated
    (split_lines decides what a line is)."""
    try:
        if path == "-":
            stream = getattr(sys.stdin, "buffer", None)
            return sys.stdin.read() if stream is None else stream.read().decode("utf-8")
        return pathlib.Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise _path_error(arg, path, exc) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{arg}: {path}: not UTF-8 text ({exc})") from None


def _read_lines(path: str, arg: str) -> list[str]:
    return split_lines(_read_text(path, arg))


def _probe_directory(directory: str, arg: str, path: str) -> None:
    """Creates and removes a file in ``directory``: the one test of writability that holds for
    every user (root included) and every file system."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise _path_error(arg, path, exc) from None


def _check_output_file(path: str, arg: str) -> None:
    """A file we may create or replace: checked before any work is done."""
    if os.path.isdir(path):
        raise UserError(f"{arg}: {path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserError(f"{arg}: cannot write {path}: its directory does not exist")
    _probe_directory(directory, arg, path)


def _check_output_dir(path: str, arg: str) -> None:
    """A directory we write into (created with its parents when missing)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{arg}: {path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _path_error(arg, path, exc) from None
    _probe_directory(path, arg, path)


def _check_input_dir(path: str, arg: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{arg}: {path}: does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{arg}: {path}: is not a directory")


def _load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = _read_text(path, "--config")
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise UserError("YAML configs need PyYAML: pip install pyyaml (or use JSON)") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    return data


def _set_threads(n: int | None) -> None:
    if n is not None:
        set_num_threads(n)


_DURATION = re.compile(r"^(?:(\d+(?:\.\d*)?)h)?(?:(\d+(?:\.\d*)?)m)?(?:(\d+(?:\.\d*)?)s)?$")


def parse_duration(text: str, arg: str = "--max-time") -> float:
    """Seconds in "90", "90s", "45m", "1h30m", "1.5h" (a positive duration)."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        m = _DURATION.match(text)
        if not text or m is None:
            raise UserError(f"{arg}: {text!r} is not a duration (e.g. 90s, 45m, 1h30m)") from None
        h, mins, sec = (float(g) if g else 0.0 for g in m.groups())
        seconds = 3600 * h + 60 * mins + sec
    if not seconds > 0 or seconds == float("inf"):
        raise UserError(f"{arg}: must be a positive duration, got {text!r}")
    return seconds


# flag -> TrainOptions key, for the flags that override a --config file as they are
_TRAIN_FLAGS = {
    "tokenizer": "tokenizer", "vocab_size": "vocab_size", "max_tokens": "max_tokens",
    "seed": "seed", "preset": "preset", "max_epochs": "max_epochs", "accum": "accumulate",
    "valid_every": "valid_every", "checkpoint_every": "checkpoint_every",
    "keep_checkpoints": "keep_checkpoints", "patience": "patience",
    "average_last": "average_last", "lr": "lr", "warmup": "warmup", "final": "final",
}


def _train_options(args: argparse.Namespace):
    from .translator import TrainOptions

    config = _load_config(args.config)
    for flag, key in _TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            config[key] = value
    if args.dropout is not None:
        try:
            dropout = check_float("--dropout", args.dropout, 0.0, 1.0)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        config["model"] = {**(config.get("model") or {}), "dropout": dropout}
    if args.shared_vocab:
        config["shared_vocab"] = True
    if args.no_valid_bleu:
        config["valid_bleu"] = False
    if args.max_time is not None:
        config["max_time"] = parse_duration(args.max_time)
    if args.steps is not None:
        config["steps"] = args.steps
    elif "steps" not in config and ("max_time" in config or "max_epochs" in config):
        config["steps"] = None  # a time or epoch budget alone: no default step limit
    if config.get("average_last") and "final" not in config:
        config["final"] = "average"
    try:
        options = TrainOptions.from_dict(config)
        options.check()
    except TypeError as exc:
        raise UserError(f"--config: {exc}") from None
    return options


def cmd_train(args: argparse.Namespace) -> int:
    from .translator import train_translator, train_translator_on_data

    options = _train_options(args)
    if args.data is not None:
        given = [f for f in ("src", "tgt", "valid_src", "valid_tgt") if getattr(args, f)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UserError(f"--data: the corpus comes from DATA; drop {flag}")
        _check_input_dir(args.data, "--data")
        from .train.shards import DataError, open_data

        try:
            open_data(args.data)  # checked before any work
        except DataError as exc:
            raise UserError(f"--data: {exc}") from None
        run = lambda: train_translator_on_data(  # noqa: E731
            args.data, args.out, options=options, resume=args.resume
        )
    else:
        if not (args.src and args.tgt):
            raise UserError("train needs --data DATA, or --src and --tgt")
        src, tgt = _read_lines(args.src, "--src"), _read_lines(args.tgt, "--tgt")
        if len(src) != len(tgt):
            raise UserError(f"{args.src} has {len(src)} lines but {args.tgt} has {len(tgt)}")
        valid = {}
        if args.valid_src or args.valid_tgt:
            if not (args.valid_src and args.valid_tgt):
                raise UserError("--valid-src and --valid-tgt go together")
            valid = dict(valid_src=_read_lines(args.valid_src, "--valid-src"),
                         valid_tgt=_read_lines(args.valid_tgt, "--valid-tgt"))
        run = lambda: train_translator(  # noqa: E731
            src, tgt, args.out, options=options, resume=args.resume, **valid
        )
    _check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    try:
        run()
    except KeyboardInterrupt:
        print(f"interrupted: checkpoint saved under {args.out}/checkpoints", file=sys.stderr)
        return 130
    if distributed.world().is_root:
        print(f"model saved in {args.out}", file=sys.stderr)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from .preprocess import PreprocessOptions, preprocess
    from .train.shards import DataError

    for arg, path in (("--src", args.src), ("--tgt", args.tgt), ("--valid-src", args.valid_src),
                      ("--valid-tgt", args.valid_tgt)):
        if path is not None:
            _check_input_file(path, arg)
    if bool(args.valid_src) != bool(args.valid_tgt):
        raise UserError("--valid-src and --valid-tgt go together")
    _check_output_dir(args.out, "--out")
    options = PreprocessOptions(
        tokenizer=args.tokenizer, vocab_size=args.vocab_size, joint=args.joint,
        vocab_sample=args.vocab_sample, max_len=args.max_len, max_ratio=args.max_ratio,
        shard_size=args.shard_size,
    )
    try:
        report = preprocess(
            args.src, args.tgt, args.out, valid_src=args.valid_src, valid_tgt=args.valid_tgt,
            options=options, log=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    except DataError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        if str(exc).startswith("out_dir:"):
            raise UserError(f"--out: {str(exc)[len('out_dir: '):]}") from None
        raise
    print(f"{args.out}: {report.summary()}", file=sys.stderr)
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .train.average import average_checkpoints

    for path in args.checkpoints:
        _check_input_dir(path, "checkpoints")
    try:
        out = average_checkpoints(args.checkpoints, args.out)
    except ValueError as exc:
        raise UserError(f"--out: {exc}" if str(exc).startswith("out_dir") else str(exc)) from None
    print(f"averaged {len(args.checkpoints)} checkpoints into {out}", file=sys.stderr)
    return 0


def _check_input_file(path: str, arg: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{arg}: {path}: does not exist")
    if os.path.isdir(path):
        raise UserError(f"{arg}: {path}: is a directory")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise _path_error(arg, path, exc) from None


def _load_translator(directory: str, arg: str, compute_type: str | None = None,
                     inter_threads: int | None = None, vmap: str | None = None):
    from .translator import Translator

    _check_input_dir(directory, arg)
    try:
        translator = Translator.load(directory, compute_type=compute_type,
                                     inter_threads=1 if inter_threads is None else inter_threads)
    except (OSError, CheckpointError) as exc:
        raise UserError(f"{arg}: {exc}") from None
    if vmap is not None:
        _check_input_file(vmap, "--vmap")
        try:
            translator.load_vmap(vmap)
        except (OSError, ValueError) as exc:
            raise UserError(f"--vmap: {exc}") from None
    return translator


# argparse dest -> translate() option, for the decoding flags (named as CTranslate2's
# translate_batch options and CLI flags where the meanings match).
_DECODE_FLAGS = {
    "beam_size": "beam_size", "length_penalty": "length_penalty",
    "max_decoding_length": "max_decoding_length", "min_decoding_length": "min_decoding_length",
    "batch_size": "max_batch_size", "batch_type": "batch_type",
    "sampling_topk": "sampling_topk", "sampling_topp": "sampling_topp",
    "sampling_temperature": "sampling_temperature", "seed": "seed",
    "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
    "max_input_length": "max_input_length", "disable_unk": "disable_unk",
    "use_vmap": "use_vmap",
}


def _decode_options(args: argparse.Namespace) -> dict[str, Any]:
    """The decoding options given on the command line; unset ones are left out, so they come
    from the model's options.json, then from translate()'s defaults."""
    given = {key: getattr(args, flag, None) for flag, key in _DECODE_FLAGS.items()}
    if getattr(args, "vmap", None) is not None:
        given["use_vmap"] = True
    return {k: v for k, v in given.items() if v is not None}


# Lines read (and translated) per block, unless --read-batch-size says otherwise: each block's
# translations are written as they come (stdout: flushed after each block), with a progress
# line on stderr for inputs of more than one block. The sharded run cuts the same blocks.
_TRANSLATE_BLOCK = 1000
# Progress lines with --batch-type tokens, where a block is counted in tokens, not lines.
_PROGRESS_LINES = 1000


def _count_lines(path: str) -> int:
    """The lines of a file as split_lines counts them, read in chunks (bounded memory)."""
    count, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


@contextlib.contextmanager
def _input_lines(path: str, arg: str) -> Iterator[Iterator[str]]:
    """The lines of a file, or of stdin for "-", read lazily (see io.iter_lines); a line that
    is not UTF-8 is a UserError naming it."""
    from .io import iter_lines

    def lines(stream: IO[bytes]) -> Iterator[str]:
        try:
            yield from iter_lines(stream, f"{arg}: {path}")
        except ValueError as exc:
            raise UserError(str(exc)) from None

    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream put in place of stdin (tests, embedding)
            yield (line.rstrip("\n").removesuffix("\r") for line in sys.stdin)
        else:
            yield lines(stream)
        return
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise _path_error(arg, path, exc) from None
    with f:
        yield lines(f)


def _is_tty(path: str) -> bool:
    return path == "-" and hasattr(sys.stdin, "isatty") and sys.stdin.isatty()


def cmd_translate(args: argparse.Namespace) -> int:
    if distributed.world().size > 1:
        return _translate_sharded(args, distributed.world())
    from .decode import stream
    from .translator import write_translation

    _set_threads(args.threads)
    if args.input != "-":
        _check_input_file(args.input, "--input")
    with _output(args.output, "--output") as out:  # a bad path fails before the model loads
        translator = _load_translator(args.model, "--model", args.compute_type,
                                      args.inter_threads, args.vmap)
        options = _decode_options(args)
        block = args.read_batch_size
        if block is None:
            # typed input gets its translation at once; a tokens batch type reads by tokens
            by_tokens = {**translator.options, **options}.get("batch_type") == "tokens"
            block = 1 if _is_tty(args.input) else None if by_tokens else _TRANSLATE_BLOCK
        size, by_tokens = stream.read_block_size(block, {**translator.options, **options})
        every = _PROGRESS_LINES if by_tokens else size
        total = None if args.input == "-" else _count_lines(args.input)
        quiet = _is_tty(args.input)
        with _input_lines(args.input, "--input") as lines:
            results = translator.translate_iterable(
                lines, n_best=args.n_best, read_batch_size=block, **options
            )
            done, t0 = 0, time.perf_counter()
            for done, result in enumerate(results, 1):
                write_translation(out, done - 1, result, args.n_best)
                if done % every == 0:
                    out.flush()
                    if not quiet and (total is None or total > every):
                        _progress(done, total, every / max(time.perf_counter() - t0, 1e-9))
                    t0 = time.perf_counter()
            out.flush()
            if done % every and done > every and not quiet:
                _progress(done, total, (done % every) / max(time.perf_counter() - t0, 1e-9))
    return 0


def _progress(done: int, total: int | None, rate: float) -> None:
    of = "" if total is None else f"/{total}"
    print(f"translated {done}{of} lines ({rate:.1f} lines/s)", file=sys.stderr, flush=True)


def _translate_sharded(args: argparse.Namespace, w: distributed.World) -> int:
    """translate under MPI: rank k translates blocks k, k+N, ... (the blocks of a one-process
    run, so the same translations); rank 0 writes them in input order, the file only once all
    are in (a failed rank leaves no output file behind)."""
    _set_threads(args.threads)
    if args.input == "-":  # Open MPI's launcher did not pass EOF on to rank 0's stdin here
        raise UserError("--input: under mpiexec give a file that every rank can read, not stdin")
    if w.is_root and args.output != "-":
        _check_output_file(args.output, "--output")
    translator = _load_translator(args.model, "--model", args.compute_type, args.inter_threads,
                                  args.vmap)
    lines = _read_lines(args.input, "--input")
    block = args.read_batch_size or _TRANSLATE_BLOCK
    done = [0]

    def translate(block: Sequence[str]) -> list[Any]:
        return translator.translate(block, n_best=args.n_best, **_decode_options(args))

    def written(start: int, hyps: list[Any]) -> None:
        text = "".join(f"{line}\n" for line in _nbest_lines(start, hyps, args.n_best))
        if args.output == "-":
            sys.stdout.write(text)
            sys.stdout.flush()
        done[0] = start + len(hyps)
        if len(lines) > block:
            print(f"translated {done[0]}/{len(lines)} lines ({w.size} ranks)", file=sys.stderr,
                  flush=True)

    hyps = distributed.map_blocks(w, lines, translate, block, on_block=written)
    if w.is_root and args.output != "-":
        with _output(args.output, "--output") as out:
            out.write("".join(f"{line}\n" for line in _nbest_lines(0, hyps, args.n_best)))
    return 0


def _nbest_lines(start: int, hyps: list[Any], n_best: int) -> list[str]:
    if n_best == 1:
        return hyps
    return [f"{start + i}\t{h}" for i, nbest in enumerate(hyps) for h in nbest]


@contextlib.contextmanager
def _output(path: str, arg: str) -> Iterator[IO[str]]:
    """stdout for "-"; else the file, replaced atomically once everything is written (an
    interrupted run leaves an existing file as it was)."""
    if path == "-":
        yield sys.stdout
        return
    from .io import atomic_open

    _check_output_file(path, arg)
    with atomic_open(path, "w") as f:
        yield f


def cmd_evaluate(args: argparse.Namespace) -> int:
    refs = _read_lines(args.ref, "--ref")
    if args.hyp:
        hyps = _read_lines(args.hyp, "--hyp")
    elif args.model and args.src:
        _set_threads(args.threads)
        translator = _load_translator(args.model, "--model", args.compute_type,
                                      args.inter_threads, args.vmap)
        hyps = translator.translate(_read_lines(args.src, "--src"), **_decode_options(args))
    else:
        raise UserError("give --hyp, or --model with --src")
    try:
        scores = score_translations(hyps, refs)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps(scores, indent=2))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Writes an int8 copy of a model directory (a `train` output, or a bare model directory
    with config.json and model.safetensors) to --out."""
    src, out = args.model_dir, args.out
    _check_input_dir(src, "MODEL_DIR")
    if os.path.realpath(src) == os.path.realpath(out):
        raise UserError("--out: must differ from MODEL_DIR (the float32 model is kept)")
    bare = os.path.isfile(os.path.join(src, "config.json"))
    if bare:
        from .models.transformer import Transformer

        try:
            model = Transformer.load(src, compute_type="int8")
        except (OSError, CheckpointError) as exc:
            raise UserError(f"MODEL_DIR: {exc}") from None
        _check_output_dir(out, "--out")
        model.save(out)
        before, after = (os.path.join(d, "model.safetensors") for d in (src, out))
    else:
        translator = _load_translator(src, "MODEL_DIR", "int8")
        _check_output_dir(out, "--out")
        translator.save(out)
        before = str(_translator_weights(src))
        after = os.path.join(out, "model", "model.safetensors")
    old, new = os.path.getsize(before), os.path.getsize(after)
    print(f"int8 model saved in {out}: {new:,} bytes of weights ({new / old:.2f}x of {old:,})",
          file=sys.stderr)
    return 0


def _translator_weights(directory: str) -> pathlib.Path:
    """The weights file Translator.load reads under a `train` output directory."""
    from .train.trainer import latest_checkpoint

    model = pathlib.Path(directory, "model")
    if (model / "config.json").exists():
        return model / "model.safetensors"
    latest = latest_checkpoint(pathlib.Path(directory, "checkpoints"))
    return pathlib.Path(latest, "model.safetensors")


def cmd_demo(args: argparse.Namespace) -> int:
    _check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    if args.vision:
        from .vision_demo import run_vision_demo

        run_vision_demo(args.out, quick=args.quick, steps=args.steps)
        return 0
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, steps=args.steps)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plot

    if args.what == "curve":
        log = pathlib.Path(args.path)
        if log.is_dir():
            log = log / "checkpoints" / "log.jsonl"
        _read_text(str(log), "path")  # a missing or unreadable log is the user's to fix
        output = args.output or "training_curve.png"
        _check_output_file(output, "--output")
        out = plot.plot_training_curve(log, output)
    else:
        if not args.sentence:
            raise UserError("plot attention needs --sentence")
        output = args.output or "attention.png"
        _check_output_file(output, "--output")
        translator = _load_translator(args.path, "path")
        out = plot.plot_attention(
            translator, args.sentence, output, layer=args.layer, head=args.head
        )
    print(out)
    return 0


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    # Unset options fall back to the model's options.json (an imported model's generation
    # settings), then to translate()'s defaults: beam 4, length penalty 1, 256 tokens. Names
    # follow CTranslate2's CLI; the older spellings stay as aliases.
    p.add_argument("--beam-size", type=int, default=None, help="default 4 (1: greedy/sampling)")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="score = log-probability / length ** this (default 1)")
    p.add_argument("--max-decoding-length", type=int, default=None, help="default 256")
    p.add_argument("--min-decoding-length", type=int, default=None,
                   help="tokens before an end token is allowed (default 0)")
    p.add_argument("--max-batch-size", "--batch-size", dest="batch_size", type=int,
                   default=None, help="sentences (or tokens) decoded together")
    p.add_argument("--batch-type", choices=["examples", "tokens"], default=None,
                   help="what --max-batch-size counts (default examples)")
    p.add_argument("--max-input-length", type=int, default=None,
                   help="source tokens kept per sentence")
    p.add_argument("--sampling-topk", type=int, default=None,
                   help="sample from the K most likely tokens (1: greedy, 0: all)")
    p.add_argument("--sampling-topp", type=float, default=None,
                   help="sample from the nucleus of this probability mass")
    p.add_argument("--sampling-temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="random seed of sampling")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 penalises tokens already generated")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="never repeat an n-gram of this size")
    p.add_argument("--disable-unk", action="store_true", default=None,
                   help="never generate the unknown token")
    p.add_argument("--use-vmap", action="store_true", default=None,
                   help="score only the targets the model's vmap.txt lists for the sources")
    p.add_argument("--vmap", metavar="FILE", default=None,
                   help="a vocabulary map (CTranslate2's format) to use instead; implies "
                   "--use-vmap")
    p.add_argument("--inter-threads", type=int, default=None,
                   help="batches translated at once, on that many worker threads (default 1)")
    p.add_argument("--intra-threads", "--threads", dest="threads", type=int, default=None,
                   help="kernel threads per batch (default: the usable cores)")
    p.add_argument(
        "--compute-type", choices=["float32", "int8"], default=None,
        help="int8: Linear layers and embeddings in int8 (quantized per row when loading); "
        "default: as the model is stored",
    )


def cmd_convert(args: argparse.Namespace) -> int:
    """An imported model written as a translator directory (`translate --model OUT`)."""
    from .interop import from_ctranslate2, from_marian
    from .interop._files import write_directory

    _check_input_dir(args.dir, "DIR")
    if args.sentencepiece is not None and args.source != "ctranslate2":
        raise UserError("--sentencepiece: only for --from ctranslate2 (Marian brings its own)")
    if args.source == "marian":
        translator = from_marian(args.dir)
    else:
        if args.sentencepiece is not None and not os.path.isfile(args.sentencepiece):
            raise UserError(f"--sentencepiece: {args.sentencepiece}: does not exist")
        translator = from_ctranslate2(args.dir, sentencepiece=args.sentencepiece)
    try:
        out = write_directory(args.out, translator.save)
    except FileExistsError as exc:
        raise UserError(f"--out: {exc}") from None
    print(f"converted {args.source} model saved in {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A translator directory written as a CTranslate2 model directory."""
    from .interop import export_ctranslate2

    _check_input_dir(args.model_dir, "MODEL_DIR")
    try:
        out = export_ctranslate2(args.model_dir, args.out)
    except FileExistsError as exc:
        raise UserError(f"OUT: {exc}") from None
    print(f"CTranslate2 model saved in {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytransformer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "preprocess", help="binarize a parallel corpus: tokenizers, filters, memory-mapped shards"
    )
    p.add_argument("--src", required=True, help="source sentences, one per line")
    p.add_argument("--tgt", required=True, help="target sentences, one per line")
    p.add_argument("--valid-src", help="validation sources (kept unfiltered)")
    p.add_argument("--valid-tgt", help="validation references")
    p.add_argument("--out", required=True, help="the data directory to write (DATA)")
    p.add_argument("--tokenizer", choices=["sentencepiece", "char"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=8000, help="pieces per SentencePiece model")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--joint", dest="joint", action="store_true", default=True,
                       help="one vocabulary for both languages (default; tied embeddings)")
    vocab.add_argument("--separate", dest="joint", action="store_false",
                       help="a vocabulary per language")
    p.add_argument("--vocab-sample", type=int, default=1_000_000,
                   help="sentences (sampled evenly) a SentencePiece model trains on")
    p.add_argument("--max-len", type=int, default=250,
                   help="drop pairs with more tokens on a side (default 250)")
    p.add_argument("--max-ratio", type=float, default=9.0,
                   help="drop pairs whose token-length ratio exceeds this (default 9)")
    p.add_argument("--shard-size", type=int, default=1_000_000, help="sentence pairs per shard")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train a translation model on parallel text files")
    p.add_argument("--data", help="a data directory from `preprocess` (instead of --src/--tgt)")
    p.add_argument("--src", help="source sentences, one per line")
    p.add_argument("--tgt", help="target sentences, one per line")
    p.add_argument("--valid-src")
    p.add_argument("--valid-tgt")
    p.add_argument("--out", required=True, help="output directory (model, tokenizers, checkpoints)")
    p.add_argument("--config", help="JSON/YAML file of TrainOptions (model: {...})")
    p.add_argument("--preset", choices=["tiny", "small", "base", "big"],
                   help="model and batch recipe (default: small)")
    p.add_argument("--tokenizer", choices=["sentencepiece", "char"])
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--shared-vocab", action="store_true")
    p.add_argument("--steps", "--max-steps", dest="steps", type=int,
                   help="stop after this many updates (default 2000 unless a time or epoch "
                        "budget is given)")
    p.add_argument("--max-time", help="stop after this much training time: 90s, 45m, 1h30m")
    p.add_argument("--max-epochs", type=int, help="stop after this many passes over the data")
    p.add_argument("--max-tokens", type=int, help="padded tokens per batch")
    p.add_argument("--accum", "--accumulate", dest="accum", type=int,
                   help="batches per update (gradient accumulation; on each rank under mpiexec)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="warm-up updates")
    p.add_argument("--dropout", type=float,
                   help="dropout probability instead of the preset's (0.3 for Multi30k-sized "
                        "corpora, which overfit the preset's 0.1)")
    p.add_argument("--valid-every", type=int, help="updates between validations")
    p.add_argument("--no-valid-bleu", action="store_true",
                   help="validate by loss only (no greedy-decoding BLEU)")
    p.add_argument("--patience", type=int,
                   help="stop after this many validations without a better BLEU (or loss)")
    p.add_argument("--checkpoint-every", type=int, help="updates between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, help="newest checkpoints kept (default 3)")
    p.add_argument("--average-last", type=int,
                   help="the final model is the mean of the newest N checkpoints")
    p.add_argument("--final", choices=["best", "last", "average"],
                   help="weights of DIR/model: best validation (default), last, or average")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("average", help="average the parameters of checkpoints into one model")
    p.add_argument("checkpoints", nargs="+", help="checkpoint (step-*) or model directories")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("translate", help="translate sentences with a trained model")
    p.add_argument("--model", required=True, help="a directory written by `train`")
    p.add_argument("--input", default="-", help="file of sentences (default: stdin)")
    p.add_argument("--output", default="-",
                   help="file for translations (default: stdout); replaced once all are in")
    p.add_argument("--n-best", "--num-hypotheses", dest="n_best", type=int, default=1,
                   help="translations per sentence, written as INDEX<TAB>TEXT lines when > 1")
    p.add_argument("--read-batch-size", type=int, default=None,
                   help=f"sentences read and translated per block (default {_TRANSLATE_BLOCK}; "
                   "1 when stdin is a terminal)")
    _add_decode_args(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("evaluate", help="BLEU, chrF and exact match against references")
    p.add_argument("--ref", required=True)
    p.add_argument("--hyp", help="translations to score")
    p.add_argument("--model", help="translate --src with this model instead of --hyp")
    p.add_argument("--src")
    _add_decode_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "quantize", help="write an int8 copy of a model (about 4x smaller Linear weights)"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by `train`")
    p.add_argument("--out", required=True, help="directory for the int8 model")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "demo", help="train English -> German number words (or, --vision, digit images) and report"
    )
    p.add_argument("--out", default="pytransformer-demo", help="output directory")
    p.add_argument(
        "--vision", action="store_true",
        help="the Vision Transformer on scikit-learn's 8x8 digits instead (the vision extra)",
    )
    p.add_argument("--quick", action="store_true", help="a small, fast variant")
    p.add_argument("--steps", type=int, help="override the number of training steps")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="import a Hugging Face Marian or CTranslate2 model")
    p.add_argument("--from", dest="source", required=True, choices=["marian", "ctranslate2"])
    p.add_argument("dir", metavar="DIR", help="the model directory to import")
    p.add_argument("--out", required=True, help="new translator directory (must not exist)")
    p.add_argument("--sentencepiece", help="ctranslate2: a SentencePiece model for both sides "
                   "(default: whitespace-separated tokens in and out)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a translator directory in another format")
    p.add_argument("--to", dest="target", required=True, choices=["ctranslate2"])
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a translator directory")
    p.add_argument("out", metavar="OUT", help="new CTranslate2 model directory (must not exist)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="training curve or attention heatmap as PNG")
    p.add_argument("what", choices=["curve", "attention"])
    p.add_argument("path", help="training dir or log.jsonl (curve); model dir (attention)")
    p.add_argument("--sentence", help="source sentence for the attention heatmap")
    p.add_argument("--layer", type=int, default=-1,
                   help="decoder layer of the attention heatmap (default: the last)")
    p.add_argument("--head", type=int, help="one attention head (default: the mean of heads)")
    p.add_argument("--output", "-o", help="PNG file to write")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        w = distributed.world()
    except ImportError as exc:
        print(f"pytransformer: error: {exc}", file=sys.stderr)
        return 2
    if w.size == 1:
        return _run(args)
    if args.command not in ("train", "translate"):
        if w.is_root:
            print(f"pytransformer: error: {args.command} runs in one process; under mpiexec "
                  "only train and translate use several ranks", file=sys.stderr, flush=True)
        w.barrier()
        return 2
    with distributed.guard(w):  # an exception on one rank ends every rank
        code = _run(args, f"pytransformer: rank {w.rank} of {w.size}")
        if code:  # the others would wait for this rank in their next collective
            w.comm.Abort(code)
    return code


def _run(args: argparse.Namespace, prog: str = "pytransformer") -> int:
    try:
        return args.func(args)
    except (UserError, OSError, CheckpointError, ImportError) as exc:
        if os.environ.get("PYTRANSFORMER_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, IndexError) as exc:
        if os.environ.get("PYTRANSFORMER_DEBUG"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
