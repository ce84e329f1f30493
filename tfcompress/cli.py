"""The ``tfcompress`` command line.

Subcommands:
  run       the main job: fine-tune, compress, recover, export, evaluate, report
  inspect   per-layer parameters and bytes of a Keras model, SavedModel or TFLite file
  embed     sentence embeddings and cosine similarities with the embedded MiniLM
  compress, export, evaluate, report, memory: the main job's steps one at a time
"""

import argparse
import logging
import os
import sys

log = logging.getLogger("tfcompress")


class UsageError(Exception):
    """An invalid command-line value; main() prints it and exits with status 2."""


def _existing_path(value):
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"path not found: {value!r}")
    return value


def _positive_int(value):
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; received {value!r}")
    return number


def cmd_embed(args):
    import numpy as np

    from tfcompress.bert import MaskedMeanPooling, load_minilm, minilm_vocab
    from tfcompress.text import BertPreprocessor

    texts = args.text
    if not texts:
        from tfcompress.data import load_tweets

        splits = load_tweets()
        texts = splits.test.texts[: args.count]
    encoder = load_minilm()
    preprocessor = BertPreprocessor(minilm_vocab(), seq_length=args.seq_length)
    inputs = preprocessor(texts)
    outputs = encoder(inputs, training=False)
    pooled = MaskedMeanPooling()([outputs["sequence_output"], inputs["input_mask"]]).numpy()
    embeddings = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    print(f"input_word_ids: {tuple(inputs['input_word_ids'].shape)}")
    print(f"sequence_output: {tuple(outputs['sequence_output'].shape)}")
    print(f"pooled_output: {tuple(outputs['pooled_output'].shape)}")
    print(f"sentence embeddings (masked mean, L2-normalised): {embeddings.shape}")
    for i, text in enumerate(texts):
        print(f"[{i}] {text[:90]}")
    similarity = embeddings @ embeddings.T
    header = "     " + "".join(f"{j:>7}" for j in range(len(texts)))
    print("cosine similarity:")
    print(header)
    for i, row in enumerate(similarity):
        print(f"{i:>4} " + "".join(f"{v:7.3f}" for v in row))
    return 0


def cmd_inspect(args):
    from tfcompress.inspect import inspect_path

    print(inspect_path(args.path, batch_size=args.batch_size, seq_length=args.seq_length))
    return 0


def cmd_run(args):
    from tfcompress.job import run_job

    run_job(args.recipe, args.out, quick=args.quick, force=args.force)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tfcompress", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the main job described by a recipe file")
    run.add_argument("recipe", type=_existing_path, help="recipe YAML file (see data/recipes/)")
    run.add_argument("--out", required=True, help="output folder; finished steps in it are reused")
    run.add_argument("--quick", action="store_true",
                     help="few examples and short sequences, for a first try or tests")
    run.add_argument("--force", action="store_true",
                     help="rerun every step even when its outputs exist")
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="per-layer parameters, bytes and memory estimate")
    inspect.add_argument("path", type=_existing_path,
                         help="a .keras file, a SavedModel folder or a .tflite file")
    inspect.add_argument("--batch-size", type=_positive_int, default=32,
                         help="batch size for the training memory estimate (default 32)")
    inspect.add_argument("--seq-length", type=_positive_int, default=128,
                         help="sequence length for the memory estimate, in tokens (default 128)")
    inspect.set_defaults(func=cmd_inspect)

    embed = sub.add_parser("embed", help="embed sentences with the embedded MiniLM")
    embed.add_argument("text", nargs="*", help="sentences; default: a few from the tweets corpus")
    embed.add_argument("--count", type=_positive_int, default=5,
                       help="number of corpus sentences when no text is given (default 5)")
    embed.add_argument("--seq-length", type=_positive_int, default=64,
                       help="tokens per sentence after padding or truncation (default 64)")
    embed.set_defaults(func=cmd_embed)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as error:
        print(f"tfcompress {args.command}: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        print(f"tfcompress {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
