"""Command line of the benchmarks: ``python -m bench.run [--smoke] [--only ITEM...]``.

Each item module has ``TITLE`` and ``run(settings)``, which returns a dict with
``columns``, ``rows`` and optionally ``setup``, ``targets`` and ``notes``. An item that
cannot run here raises ``bench.common.NotRun``; an item that fails is recorded with its
error, and the run continues with the next item. The results go to
``OUT/results.json`` (merged with the items of an earlier run in the same folder, so
``--only`` can redo one item) and are rendered to Markdown.

NOTE: the full run is sized to take about 25 minutes on 2 CPU cores. That is an
estimate from a measured 0.75 s MiniLM training step (batch 32, sequence 48), because
only the smoke run has been timed end to end. An int8 export that fails verification also runs the converter's
per-layer debugger, which adds minutes to the size and accuracy item.
"""

import argparse
import importlib
import json
import logging
import os
import sys
import time
import traceback

from bench import common, markdown

logger = logging.getLogger("bench")

ITEMS = ("size_accuracy", "latency", "train_memory", "compress_time", "sparse_matmul")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark tfcompress against TFLite, TF Model Optimization and Keras 3.")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes and few repetitions, to check the harness (minutes)")
    parser.add_argument("--only", nargs="+", choices=ITEMS, metavar="ITEM",
                        help=f"run only these items, of: {', '.join(ITEMS)}")
    parser.add_argument("--out", default=os.path.join("bench", "out"),
                        help="folder for results.json, models and BENCHMARKS.md "
                             "(default: bench/out)")
    parser.add_argument("--job-dir", default=None,
                        help="output folder of `tfcompress run data/recipes/minilm_tweets.yaml"
                             " --out DIR` (default: runs/minilm_tweets; with --smoke, a tiny "
                             "job generated under OUT)")
    parser.add_argument("--markdown", default=None,
                        help="also write the Markdown here (default: BENCHMARKS.md at the "
                             "repository root for a full run, nothing extra for --smoke)")
    parser.add_argument("--render-only", action="store_true",
                        help="only render OUT/results.json to Markdown, running nothing")
    return parser


def run_item(name, settings):
    """Run one item; return its result dict with ``status`` and ``seconds`` set."""
    module = importlib.import_module(f"bench.{name}")
    logger.info("item %s: started", name)
    start = time.perf_counter()
    try:
        result = module.run(settings)
        result["status"] = "ok"
    except common.NotRun as reason:
        result = {"title": module.TITLE, "status": f"not run: {reason}"}
    except Exception as error:  # noqa: BLE001  (one failing item must not lose the others)
        logger.error("item %s failed:\n%s", name, traceback.format_exc())
        result = {"title": module.TITLE, "status": f"failed: {common.short_error(error)}"}
    result["seconds"] = time.perf_counter() - start
    logger.info("item %s: %s after %.0f s", name, result["status"], result["seconds"])
    return result


def _load_previous(path, smoke):
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    if bool(previous.get("smoke")) != smoke:
        return {}
    return previous.get("items", {})


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "results.json")
    markdown_paths = [os.path.join(args.out, "BENCHMARKS.md")]
    if args.markdown:
        markdown_paths.append(args.markdown)
    elif not args.smoke:
        markdown_paths.append(os.path.join(ROOT, "BENCHMARKS.md"))

    if args.render_only:
        if not os.path.isfile(results_path):
            raise SystemExit(f"{results_path} not found; run the benchmarks first.")
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    else:
        from bench import machine

        settings = common.Settings(smoke=args.smoke, out=args.out, job_dir=args.job_dir)
        items = _load_previous(results_path, args.smoke)
        start = time.perf_counter()
        for name in args.only or ITEMS:
            items[name] = run_item(name, settings)
        results = {
            "command": "python -m bench.run " + " ".join(argv if argv is not None
                                                         else sys.argv[1:]),
            "smoke": args.smoke,
            "machine": machine.describe(),
            "seconds": time.perf_counter() - start,
            "items": {name: items[name] for name in ITEMS if name in items},
        }
        temporary = results_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        os.replace(temporary, results_path)
        logger.info("wrote %s after %.0f s", results_path, results["seconds"])

    for path in markdown_paths:
        markdown.write(results, path)
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
