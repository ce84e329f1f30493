"""Item: wall time of ``tfcompress.compress`` with calibration data.

Two models: the embedded MiniLM classifier (6 layers, hidden 384) and a randomly
initialised BERT-base-sized classifier (12 layers, hidden 768, intermediate 3072). The
recipe ``bench/recipes/compress_time.yaml`` applies activation-aware low-rank, pruning and
int8 QAT, so the time includes capturing the calibration inputs of every selected layer.
"""

import logging
import time

import numpy as np

from bench import common, stats

logger = logging.getLogger(__name__)

TITLE = "Compression time"
COLUMNS = [["model", "model"], ["parameters", "parameters"],
           ["calibration", "calibration examples x seq"], ["seconds", "compress() s"],
           ["layers", "layers compressed"]]
SIZES = {"runs": {"full": 3, "smoke": 2}, "calibration_examples": {"full": 32, "smoke": 8},
         "seq_length": {"full": 128, "smoke": 16}}


def _models(settings):
    from tfcompress import bert

    if settings.smoke:
        tiny = bert.BertConfig(vocab_size=1000, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, max_position_embeddings=64)
        return [("tiny random encoder (2 x 32)", lambda: bert.build_encoder(tiny))]
    base = bert.BertConfig(vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12,
                           intermediate_size=3072, max_position_embeddings=512)
    return [("MiniLM-L6 (6 x 384)", bert.load_minilm),
            ("random BERT-base (12 x 768)", lambda: bert.build_encoder(base))]


def run(settings):
    from tfcompress import bert
    from tfcompress.compress import compress

    runs = settings.pick(SIZES["runs"]["full"], SIZES["runs"]["smoke"])
    examples = settings.pick(SIZES["calibration_examples"]["full"],
                             SIZES["calibration_examples"]["smoke"])
    seq = settings.pick(SIZES["seq_length"]["full"], SIZES["seq_length"]["smoke"])
    recipe = common.load_recipe("compress_time", settings.smoke)
    rows = []
    for label, build in _models(settings):
        model = bert.classifier(build(), num_classes=3, pooling="mean")
        vocab = int(model.get_layer("embeddings/word_embeddings").input_dim)
        rng = np.random.default_rng(0)
        calibration = {
            "input_word_ids": rng.integers(1, vocab, (examples, seq)).astype(np.int32),
            "input_mask": np.ones((examples, seq), np.int32),
            "input_type_ids": np.zeros((examples, seq), np.int32),
        }
        seconds, report = [], None
        for _ in range(runs):
            start = time.perf_counter()
            _, report = compress(model, recipe, calibration_data=calibration)
            seconds.append(time.perf_counter() - start)
            logger.info("compress time: %s %.1f s", label, seconds[-1])
        rows.append({"model": label, "parameters": int(model.count_params()),
                     "calibration": f"{examples} x {seq}", "seconds": stats.summarize(seconds),
                     "layers": len(report.layers)})
    return {
        "title": TITLE,
        "setup": (f"Recipe bench/recipes/compress_time.yaml; {runs} runs per model, "
                  "seconds as median [min, max]. Calibration inputs are random token ids "
                  "(the time does not depend on their values)."),
        "columns": COLUMNS,
        "rows": rows,
    }
