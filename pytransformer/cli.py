"""The ``pytransformer`` command (also ``python -m pytransformer``).

Subcommands: train, translate, evaluate, quantize, demo, plot. Errors a user can cause end with
one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

from ._native import set_num_threads
from .io import CheckpointError, split_lines
from .text.metrics import score_translations


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


def cmd_train(args: argparse.Namespace) -> int:
    from .translator import TrainOptions, train_translator

    config = _load_config(args.config)
    for key in ("tokenizer", "vocab_size", "steps", "max_tokens", "seed"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.shared_vocab:
        config["shared_vocab"] = True
    options = TrainOptions.from_dict(config)
    src, tgt = _read_lines(args.src, "--src"), _read_lines(args.tgt, "--tgt")
    if len(src) != len(tgt):
        raise UserError(f"{args.src} has {len(src)} lines but {args.tgt} has {len(tgt)}")
    valid = {}
    if args.valid_src or args.valid_tgt:
        if not (args.valid_src and args.valid_tgt):
            raise UserError("--valid-src and --valid-tgt go together")
        valid = dict(valid_src=_read_lines(args.valid_src, "--valid-src"),
                     valid_tgt=_read_lines(args.valid_tgt, "--valid-tgt"))
    _check_output_dir(args.out, "--out")
    _set_threads(args.threads)
    try:
        train_translator(src, tgt, args.out, options=options, resume=args.resume, **valid)
    except KeyboardInterrupt:
        print(f"interrupted: checkpoint saved under {args.out}/checkpoints", file=sys.stderr)
        return 130
    print(f"model saved in {args.out}", file=sys.stderr)
    return 0


def _load_translator(directory: str, arg: str, compute_type: str | None = None):
    from .translator import Translator

    _check_input_dir(directory, arg)
    try:
        return Translator.load(directory, compute_type=compute_type)
    except (OSError, CheckpointError) as exc:
        raise UserError(f"{arg}: {exc}") from None


def _decode_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        beam_size=args.beam_size, length_penalty=args.length_penalty,
        max_decoding_length=args.max_decoding_length, max_batch_size=args.batch_size,
    )


# Lines translated per block: each block's translations are written (stdout: at once) before
# the next starts, with a progress line on stderr for inputs of more than one block.
_TRANSLATE_BLOCK = 1000


def cmd_translate(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    with _output(args.output, "--output") as out:  # a bad path fails before the model loads
        translator = _load_translator(args.model, "--model", args.compute_type)
        sentences = _read_lines(args.input, "--input")
        for start in range(0, len(sentences), _TRANSLATE_BLOCK):
            t0 = time.perf_counter()
            block = sentences[start : start + _TRANSLATE_BLOCK]
            hyps = translator.translate(block, n_best=args.n_best, **_decode_options(args))
            lines = hyps if args.n_best == 1 else [
                f"{start + i}\t{h}" for i, nbest in enumerate(hyps) for h in nbest
            ]
            out.write("".join(f"{line}\n" for line in lines))
            out.flush()
            done = start + len(block)
            if len(sentences) > _TRANSLATE_BLOCK:
                rate = len(block) / max(time.perf_counter() - t0, 1e-9)
                print(f"translated {done}/{len(sentences)} lines ({rate:.1f} lines/s)",
                      file=sys.stderr, flush=True)
    return 0


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
        translator = _load_translator(args.model, "--model", args.compute_type)
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
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--length-penalty", type=float, default=0.6)
    p.add_argument("--max-decoding-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="sentences decoded together")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--compute-type", choices=["float32", "int8"], default=None,
        help="int8: Linear layers and embeddings in int8 (quantized per row when loading); "
        "default: as the model is stored",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytransformer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a translation model on parallel text files")
    p.add_argument("--src", required=True, help="source sentences, one per line")
    p.add_argument("--tgt", required=True, help="target sentences, one per line")
    p.add_argument("--valid-src")
    p.add_argument("--valid-tgt")
    p.add_argument("--out", required=True, help="output directory (model, tokenizers, checkpoints)")
    p.add_argument("--config", help="JSON/YAML file of TrainOptions (model: {...})")
    p.add_argument("--tokenizer", choices=["sentencepiece", "char"])
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--shared-vocab", action="store_true")
    p.add_argument("--steps", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("translate", help="translate sentences with a trained model")
    p.add_argument("--model", required=True, help="a directory written by `train`")
    p.add_argument("--input", default="-", help="file of sentences (default: stdin)")
    p.add_argument("--output", default="-", help="file for translations (default: stdout)")
    p.add_argument("--n-best", type=int, default=1)
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
        return args.func(args)
    except (UserError, OSError, CheckpointError, ImportError) as exc:
        if os.environ.get("PYTRANSFORMER_DEBUG"):
            raise
        print(f"pytransformer: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, IndexError) as exc:
        if os.environ.get("PYTRANSFORMER_DEBUG"):
            raise
        print(f"pytransformer: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pytransformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
