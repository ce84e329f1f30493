"""The ``tfcompress`` command line.

Subcommands:
  run       the main job: fine-tune, compress, recover, export, evaluate, report
  compress  apply a recipe's compress rules to a Keras model and save the result
  export    convert a Keras model to a verified .tflite file
  evaluate  accuracy, macro F1 and batch-1 latency on a labelled .npz file
  report    print or regenerate the report of a job's output folder
  memory    training-memory estimate under float32, mixed precision and recompute
  inspect   per-layer parameters and bytes of a Keras model, SavedModel or TFLite file
  embed     sentence embeddings and cosine similarities with the embedded MiniLM

Exit status: 0 on success, 2 for an invalid command line or argument value (checked
before any model is loaded), 1 when the work itself fails.
"""

import argparse
import logging
import os
import shutil
import sys

from tfcompress.export import MODES as EXPORT_MODES
from tfcompress.memory.estimate import OPTIMIZER_SLOTS

log = logging.getLogger("tfcompress")

INPUT_KEYS = ("input_word_ids", "input_mask", "input_type_ids")
# The vocabulary size of the embedded MiniLM, whose tokenizer --calibration uses.
MINILM_VOCAB_SIZE = 30522


class UsageError(Exception):
    """An invalid command-line value; main() prints it and exits with status 2."""


# --------------------------------------------------------------------------- argument types


def _existing_path(value):
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"path not found: {value!r}")
    return value


def _integer_at_least(minimum, description):
    """Return an argparse type that parses an integer >= ``minimum``."""
    def parse(value):
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected {description}; received {value!r}")
        return number

    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_non_negative_int = _integer_at_least(0, "an integer >= 0")


# --------------------------------------------------------------------------- shared checks


def _check_model_path(path, allow_tflite=False):
    """Raise UsageError unless ``path`` is a model this command can read; return its kind."""
    from tfcompress.inspect import model_kind

    try:
        kind = model_kind(path)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    if kind == "tflite" and not allow_tflite:
        raise UsageError(f"MODEL {path!r} is a TFLite file; pass a .keras file or a "
                         "SavedModel folder.")
    return kind


def _check_output_path(path, overwrite, suffixes=None):
    if suffixes is not None and not path.endswith(suffixes):
        raise UsageError(f"--out must end with {' or '.join(suffixes)}; received {path!r}.")
    if os.path.exists(path) and not overwrite:
        raise UsageError(f"--out {path!r} already exists; pass --overwrite to replace it "
                         "or choose another path.")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"--out {path!r} is inside {folder!r}, which is a file, not a folder.")


def _load_npz(path, option, need_labels=False):
    """Return (inputs dict, labels or None) from an .npz of tokenized examples."""
    import numpy as np

    try:
        arrays = np.load(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{option} {path!r} is not a readable .npz file: {error}") from None
    with arrays:
        required = INPUT_KEYS + (("labels",) if need_labels else ())
        missing = [key for key in required if key not in arrays.files]
        if missing:
            raise UsageError(
                f"{option} {path!r} lacks the arrays {missing}; it has {sorted(arrays.files)}. "
                "Write it with numpy.savez(path, input_word_ids=..., input_mask=..., "
                "input_type_ids=..." + (", labels=...)" if need_labels else ")")
                + "; the main job writes such files to OUT/data/.")
        inputs = {key: arrays[key] for key in INPUT_KEYS}
        labels = arrays["labels"] if "labels" in arrays.files else None
    counts = {key: len(value) for key, value in inputs.items()}
    if labels is not None:
        counts["labels"] = len(labels)
    if len(set(counts.values())) != 1:
        raise UsageError(f"{option} {path!r} has arrays of different lengths: {counts}.")
    if not next(iter(counts.values())):
        raise UsageError(f"{option} {path!r} contains no examples.")
    return inputs, labels


def _subset(inputs, count):
    return {key: value[:count] for key, value in inputs.items()}


def _save_keras_model(model, path, overwrite):
    """Save through a temporary name beside ``path``, so a failed save leaves no half file."""
    temporary = path + ".tmp" + (".keras" if path.endswith(".keras") else "")
    if os.path.isdir(temporary):
        shutil.rmtree(temporary)
    elif os.path.exists(temporary):
        os.remove(temporary)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.endswith(".keras"):
        # The .keras format rejects include_optimizer; the model is saved uncompiled anyway.
        model.save(temporary)
    else:
        model.save(temporary, include_optimizer=False)
    if overwrite and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- run, report


def _print_summary(out, summary):
    if "size_reduction" in summary:
        print(f"compressed: {summary['compressed_variant']}, "
              f"{summary['size_reduction']:.1f}x smaller than the float32 SavedModel, "
              f"accuracy {summary['compressed_accuracy']:.4f} vs baseline "
              f"{summary['baseline_accuracy']:.4f} "
              f"({-summary['accuracy_drop_points']:+.2f} points)")
    else:
        print("compressed: no compressed TFLite model passed verification (see the "
              "failed exports above)")
    print(f"outputs in {out} (report.md, report.json, report.png, models/, tflite/)")


def cmd_run(args):
    from tfcompress.job import run_job

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder; choose another path.")
    summary = run_job(args.recipe, args.out, quick=args.quick, force=args.force)
    with open(os.path.join(args.out, "report.md"), encoding="utf-8") as f:
        print(f.read())
    _print_summary(args.out, summary)
    return 0


def cmd_report(args):
    import json

    out = args.out
    if not os.path.isdir(out):
        raise UsageError(f"OUT {out!r} is not a folder; pass the --out folder of "
                         "`tfcompress run`.")
    report_path = os.path.join(out, "report.md")
    evaluation_path = os.path.join(out, "evaluation.json")
    regenerate = args.regenerate or not os.path.isfile(report_path)
    if regenerate and not os.path.isfile(evaluation_path):
        raise UsageError(
            f"{out!r} has no evaluation.json, so there is no report to build; run "
            f"`tfcompress run RECIPE --out {out}` until its evaluate step has finished.")
    if regenerate:
        _regenerate_report(out)
    with open(report_path, encoding="utf-8") as f:
        print(f.read())
    summary_path = os.path.join(out, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            _print_summary(out, json.load(f))
    return 0


def _regenerate_report(out):
    from tfcompress.job import regenerate_report

    log.info("regenerating the report of %s from evaluation.json", out)
    try:
        regenerate_report(out)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None


# --------------------------------------------------------------------------- compress


def _check_compress_args(args):
    from tfcompress.compress import Recipe

    _check_model_path(args.model)
    _check_output_path(args.out, args.overwrite)
    if args.out.endswith(".h5"):
        raise UsageError(f"--out {args.out!r}: the HDF5 format cannot store the compressed "
                         "layers' state; use a .keras path or a SavedModel folder path.")
    if os.path.abspath(args.out) == os.path.abspath(args.model):
        raise UsageError(f"--out {args.out!r} is the input model; write to another path.")
    try:
        recipe = Recipe.from_yaml(args.recipe)
    except ValueError as error:
        raise UsageError(f"invalid --recipe: {error}") from None
    calibration = None
    if args.calibration_data:
        inputs, _ = _load_npz(args.calibration_data, "--calibration-data")
        calibration = _subset(inputs, args.calibration or 256)
    return recipe, calibration


def _tweet_calibration(model, count, seq_length):
    """Tokenize ``count`` tweets of the embedded corpus with the MiniLM vocabulary."""
    from tfcompress.bert import minilm_vocab
    from tfcompress.data import load_tweets
    from tfcompress.text import BertPreprocessor, encode_numpy

    vocab_sizes = [layer.input_dim for layer in model.layers
                   if layer.name.endswith("word_embeddings") and hasattr(layer, "input_dim")]
    if vocab_sizes != [MINILM_VOCAB_SIZE]:
        raise UsageError(
            f"--calibration without --calibration-data tokenizes tweets with the MiniLM "
            f"vocabulary of {MINILM_VOCAB_SIZE} tokens, but the model's word embedding "
            f"sizes are {vocab_sizes}; pass --calibration-data with examples tokenized "
            "for this model.")
    texts = load_tweets().train.subsample(count).texts
    log.info("calibration: %d tweets of the embedded corpus, %d tokens each",
             len(texts), seq_length)
    return encode_numpy(BertPreprocessor(minilm_vocab(), seq_length=seq_length), texts)


def cmd_compress(args):
    from tfcompress.compress import compress
    from tfcompress.inspect import load_keras_model

    recipe, calibration = _check_compress_args(args)
    model = load_keras_model(args.model)
    if calibration is None and args.calibration:
        calibration = _tweet_calibration(model, args.calibration, args.seq_length)

    compressed, report = compress(model, recipe, calibration_data=calibration)
    _save_keras_model(compressed, args.out, args.overwrite)
    print(report.to_markdown())
    print(f"\nsaved the compressed model to {args.out}")
    return 0


# --------------------------------------------------------------------------- export


def _inference_copy(model):
    """Return ``strip(model)`` when it has compressed layers, else ``model``."""
    from tfcompress.compress import strip
    from tfcompress.compress.graph import is_graph_model

    if not is_graph_model(model):
        return model
    if any(callable(getattr(layer, "strip", None)) for layer in model.layers):
        log.info("stripping training-only state before conversion")
        return strip(model)
    return model


def cmd_export(args):
    from tfcompress.export import to_tflite
    from tfcompress.inspect import load_keras_model

    _check_model_path(args.model)
    _check_output_path(args.out, args.overwrite, suffixes=(".tflite",))
    representative = verify = None
    if args.calibration_data:
        inputs, _ = _load_npz(args.calibration_data, "--calibration-data")
        representative = _subset(inputs, args.examples)
        verify = _subset(inputs, args.verify_examples)
    elif args.mode in ("int8", "int16x8"):
        log.info("mode %s without --calibration-data: only a model trained with "
                 "fake quantization (QAT) converts", args.mode)

    model = _inference_copy(load_keras_model(args.model))
    result = to_tflite(model, args.out, mode=args.mode, representative_data=representative,
                       verify_data=verify, sparse=args.sparse, seq_length=args.seq_length,
                       overwrite=args.overwrite)
    print(f"wrote {result.path}")
    print(f"mode: {result.mode}")
    print(f"bytes: {result.bytes:,} ({result.gzip_bytes:,} gzip-compressed)")
    print(f"zero fraction of weights: {result.sparsity:.4f} "
          f"({result.sparse_tensors} tensors stored sparse)")
    inputs = ", ".join(f"{name} {dtype}{list(shape)}" for name, dtype, shape in result.inputs)
    print(f"inputs: {inputs}")
    print(f"operators: {', '.join(result.operators)}")
    verification = result.verification
    if verification is None:
        print("verification: none (pass --calibration-data to compare with the Keras model)")
    else:
        agreement = ("" if verification.label_agreement is None
                     else f", label agreement {verification.label_agreement:.4f}")
        print(f"verification on {verification.examples} examples: max abs diff "
              f"{verification.max_abs_diff:.3g}, cosine {verification.cosine:.6f}{agreement}")
    return 0


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(args):
    from tfcompress.evaluate import evaluate_keras, evaluate_tflite, latency
    from tfcompress.inspect import load_keras_model

    kind = _check_model_path(args.model, allow_tflite=True)
    inputs, labels = _load_npz(args.data, "--data", need_labels=True)
    if kind == "tflite":
        model = args.model
        evaluation = evaluate_tflite(args.model, inputs, labels=labels, num_threads=args.threads)
    else:
        if args.threads is not None:
            log.warning("--threads sets the TFLite interpreter's threads; it is ignored "
                        "for the Keras model %s", args.model)
        model = load_keras_model(args.model)
        evaluation = evaluate_keras(model, inputs, labels=labels)

    print(f"model: {args.model}")
    print(f"examples: {evaluation.examples}")
    print(f"accuracy: {evaluation.accuracy:.4f}")
    print(f"macro F1: {evaluation.macro_f1:.4f}")
    if args.latency_runs:
        timed = latency(model, _subset(inputs, 1), runs=args.latency_runs,
                        warmup=args.warmup_runs,
                        num_threads=args.threads if kind == "tflite" else None)
        print(f"latency at batch 1: median {timed.median_ms:.3f} ms, p90 {timed.p90_ms:.3f} ms "
              f"({timed.runs} runs after {timed.warmup} warmup runs)")
    return 0


# --------------------------------------------------------------------------- memory, inspect


def cmd_memory(args):
    from tfcompress.memory import compare

    if (args.model is None) == (not args.minilm):
        raise UsageError("pass either MODEL (a .keras file or SavedModel folder) or "
                         "--minilm, not both and not neither.")
    if args.model is not None:
        _check_model_path(args.model)
        from tfcompress.inspect import load_keras_model

        model = load_keras_model(args.model)
    else:
        from tfcompress import bert

        model = bert.classifier(bert.load_minilm(), num_classes=args.num_classes)

    comparison = compare(model, batch_size=args.batch_size, seq_length=args.seq_length,
                         optimizer=args.optimizer)
    print(f"{model.name}: {model.count_params():,} parameters, batch {args.batch_size}, "
          f"sequence {args.seq_length}, {args.optimizer} (estimate)")
    print()
    print(comparison.to_markdown())
    return 0


def cmd_inspect(args):
    from tfcompress.inspect import inspect_path

    _check_model_path(args.path, allow_tflite=True)
    print(inspect_path(args.path, batch_size=args.batch_size, seq_length=args.seq_length))
    return 0


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


# --------------------------------------------------------------------------- parser


def _add_run(sub, common):
    run = sub.add_parser("run", parents=[common], help="run the main job described by a recipe file")
    run.add_argument("recipe", type=_existing_path, help="recipe YAML file (see data/recipes/)")
    run.add_argument("--out", required=True, help="output folder; finished steps in it are reused")
    run.add_argument("--quick", action="store_true",
                     help="few examples and short sequences, for a first try or tests")
    run.add_argument("--force", action="store_true",
                     help="rerun every step even when its outputs exist")
    run.set_defaults(func=cmd_run)


def _add_compress(sub, common):
    compress = sub.add_parser(
        "compress", parents=[common],
        help="apply a recipe's compress rules to a Keras model and save the result",
        description="Load a Keras model, apply the 'compress' rules of a recipe with "
                    "tfcompress.compress, save the compressed (trainable) model and print "
                    "the per-layer report as Markdown.")
    compress.add_argument("model", help="the model to compress: a .keras file or a SavedModel folder")
    compress.add_argument("--recipe", required=True, type=_existing_path,
                          help="YAML file with a 'compress' list of rules (a job recipe works too)")
    compress.add_argument("--out", required=True,
                          help="where to save the compressed model: a .keras file, or a "
                               "SavedModel folder for any other path")
    compress.add_argument("--calibration", type=_positive_int, default=None, metavar="N",
                          help="number of calibration examples, needed by 'method: activation' "
                               "and 'importance: gradient' rules. Taken from "
                               "--calibration-data (default 256 there), or else tweets of the "
                               "embedded corpus tokenized with the MiniLM vocabulary")
    compress.add_argument("--calibration-data", type=_existing_path, metavar="NPZ",
                          help=".npz with input_word_ids, input_mask, input_type_ids arrays "
                               "(the job writes them to OUT/data/train.npz)")
    compress.add_argument("--seq-length", type=_positive_int, default=48,
                          help="tokens per tweet when --calibration tokenizes the embedded "
                               "corpus (default 48)")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    compress.set_defaults(func=cmd_compress)


def _add_export(sub, common):
    export = sub.add_parser(
        "export", parents=[common], help="convert a Keras model to a verified .tflite file",
        description="Convert a Keras model with tfcompress.export.to_tflite. A model with "
                    "compressed layers is stripped first. With --calibration-data the "
                    "TFLite outputs are compared with the Keras outputs and the file is "
                    "written only when they are within the mode's tolerance.")
    export.add_argument("model", help="a .keras file or a SavedModel folder")
    export.add_argument("--mode", required=True, choices=EXPORT_MODES,
                        help="float32: no optimization; float16: float16 weights; dynamic: "
                             "int8 weights, activations quantized per call; int8: int8 "
                             "weights and activations, calibrated (needs --calibration-data "
                             "unless the model was trained with QAT); int16x8: int16 "
                             "activations, int8 weights, calibrated; int4: int4 weights in "
                             "blocks of 32")
    export.add_argument("--out", required=True, help="the .tflite file to write")
    export.add_argument("--seq-length", type=_positive_int, default=None,
                        help="fixed sequence length of the token inputs, in tokens "
                             "(default: the length of the --calibration-data arrays)")
    export.add_argument("--calibration-data", type=_existing_path, metavar="NPZ",
                        help=".npz with input_word_ids, input_mask, input_type_ids arrays, "
                             "used to calibrate int8/int16x8 and to verify every mode")
    export.add_argument("--examples", type=_positive_int, default=128, metavar="N",
                        help="calibration examples read from --calibration-data (default 128)")
    export.add_argument("--verify-examples", type=_positive_int, default=64, metavar="N",
                        help="verification examples read from --calibration-data (default 64)")
    export.add_argument("--sparse", action="store_true",
                        help="store pruned weights sparse-encoded")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.set_defaults(func=cmd_export)


def _add_evaluate(sub, common):
    evaluate = sub.add_parser(
        "evaluate", parents=[common],
        help="accuracy, macro F1 and batch-1 latency on a labelled .npz file")
    evaluate.add_argument("model", help="a .tflite file, a .keras file or a SavedModel folder "
                                        "of a classifier that returns [batch, classes] logits")
    evaluate.add_argument("--data", required=True, type=_existing_path, metavar="NPZ",
                          help=".npz with input_word_ids, input_mask, input_type_ids and "
                               "labels arrays (the job writes OUT/data/test.npz)")
    evaluate.add_argument("--latency-runs", type=_non_negative_int, default=50, metavar="N",
                          help="timed batch-1 calls; 0 skips the latency (default 50)")
    evaluate.add_argument("--warmup-runs", type=_non_negative_int, default=5, metavar="N",
                          help="untimed calls before timing (default 5)")
    evaluate.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                          help="TFLite interpreter threads (default: the runtime's choice); "
                               "ignored for Keras models")
    evaluate.set_defaults(func=cmd_evaluate)


def _add_report(sub, common):
    report = sub.add_parser("report", parents=[common],
                            help="print or regenerate the report of a job's output folder")
    report.add_argument("out", metavar="OUT", help="the --out folder of `tfcompress run`")
    report.add_argument("--regenerate", action="store_true",
                        help="rebuild report.md, report.json, report.png and summary.json "
                             "from evaluation.json before printing (done anyway when "
                             "report.md is missing)")
    report.set_defaults(func=cmd_report)


def _add_memory(sub, common):
    memory = sub.add_parser(
        "memory", parents=[common],
        help="training-memory estimate: float32, mixed_float16, mixed_float16 + recompute",
        description="Estimate the memory of one training step (weights, gradients, "
                    "optimizer slots, activations) with tfcompress.memory.compare.")
    memory.add_argument("model", nargs="?", default=None,
                        help="a .keras file or a SavedModel folder of a functional model")
    memory.add_argument("--minilm", action="store_true",
                        help="use the embedded MiniLM encoder with a classifier head instead "
                             "of MODEL")
    memory.add_argument("--num-classes", type=_positive_int, default=3,
                        help="classes of the --minilm classifier head (default 3)")
    memory.add_argument("--batch-size", type=_positive_int, required=True,
                        help="examples per training step")
    memory.add_argument("--seq-length", type=_positive_int, required=True,
                        help="tokens per example")
    memory.add_argument("--optimizer", choices=sorted(OPTIMIZER_SLOTS), default="adamw",
                        help="optimizer whose slots are counted: adam and adamw keep 2 per "
                             "weight, momentum 1, sgd 0 (default adamw)")
    memory.set_defaults(func=cmd_memory)


def _add_inspect(sub, common):
    inspect = sub.add_parser("inspect", parents=[common],
                             help="per-layer parameters, bytes and memory estimate")
    inspect.add_argument("path", help="a .keras file, a SavedModel folder or a .tflite file")
    inspect.add_argument("--batch-size", type=_positive_int, default=32,
                         help="batch size for the training memory estimate (default 32)")
    inspect.add_argument("--seq-length", type=_positive_int, default=128,
                         help="sequence length for the memory estimate, in tokens (default 128)")
    inspect.set_defaults(func=cmd_inspect)


def _add_embed(sub, common):
    embed = sub.add_parser("embed", parents=[common],
                           help="embed sentences with the embedded MiniLM")
    embed.add_argument("text", nargs="*", help="sentences; default: a few from the tweets corpus")
    embed.add_argument("--count", type=_positive_int, default=5,
                       help="number of corpus sentences when no text is given (default 5)")
    embed.add_argument("--seq-length", type=_positive_int, default=64,
                       help="tokens per sentence after padding or truncation (default 64)")
    embed.set_defaults(func=cmd_embed)


def build_parser():
    # The logging options are accepted before and after the subcommand. SUPPRESS keeps
    # a subcommand's unset default from replacing a value given before it. The parsers
    # share these action objects, so set_defaults() must not give them a default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log debug messages, TensorFlow's info messages and tracebacks")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="log only warnings and errors")

    parser = argparse.ArgumentParser(
        prog="tfcompress", parents=[common],
        description="Compress BERT-class tf_keras models and export them to TFLite.",
        epilog="Exit status: 0 on success, 1 when the work fails, 2 for an invalid command "
               "line or argument value. `tfcompress COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_compress, _add_export, _add_evaluate, _add_report,
                _add_memory, _add_inspect, _add_embed):
        add(sub, common)
    return parser


def _configure_logging(verbose, quiet):
    if verbose:
        level, other_level = logging.DEBUG, logging.INFO
    elif quiet:
        level, other_level = logging.WARNING, logging.WARNING
    else:
        level, other_level = logging.INFO, logging.WARNING
    logging.basicConfig(level=other_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(level)


def main(argv=None):
    """Run the command line; return the exit status (0, 1 on failure, 2 on usage errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits with 2 after printing a usage error and with 0 after --help.
        return exit_request.code if isinstance(exit_request.code, int) else 2
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if args.verbose and args.quiet:
        print("tfcompress: --verbose and --quiet exclude each other; pass one.", file=sys.stderr)
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except UsageError as error:
        print(f"tfcompress {args.command}: {error}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        # RuntimeError covers VerificationError and NotImplementedError; OSError covers
        # FileNotFoundError and FileExistsError.
        if args.verbose:
            log.exception("tfcompress %s failed", args.command)
        print(f"tfcompress {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
