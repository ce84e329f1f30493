"""Item: sparse against dense matmul of a pruned 384x1536 kernel (a MiniLM FFN layer).

For each sparsity, the kernel keeps its largest-magnitude entries. A [rows, 384] input
is multiplied by it with ``tf.matmul`` on the dense kernel and with
``tf.sparse.sparse_dense_matmul`` on the kernel as a SparseTensor. The keras ``Dense``
layer is also timed against the ``tfcompress.layers.SparseDense`` that ``to_sparse``
builds from it. Every call runs inside a ``tf.function``.
"""

import logging
import warnings

import numpy as np

from bench import stats
from bench.common import NotRun
from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

TITLE = "Sparse against dense matmul on this CPU"
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
COLUMNS = [
    ["rows", "rows (batch x seq)"], ["sparsity", "sparsity"],
    ["matmul_ms", "tf.matmul ms"], ["sparse_ms", "sparse_dense_matmul ms"],
    ["sparse_speedup", "x faster (sparse op)"], ["dense_layer_ms", "Dense layer ms"],
    ["sparse_layer_ms", "SparseDense layer ms"], ["layer_speedup", "x faster (layers)"],
]
SIZES = {"shape": {"full": (384, 1536), "smoke": (32, 64)},
         "rows": {"full": (48, 1536), "smoke": (4, 16)},
         "runs": {"full": 30, "smoke": 3},
         "warmup": {"full": 5, "smoke": 1}}


def pruned_kernel(shape, sparsity, seed=0):
    """Return a random float32 kernel with its smallest ``sparsity`` fraction set to zero."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape).astype(np.float32)
    zeros = int(round(sparsity * kernel.size))
    if zeros:
        order = np.argsort(np.abs(kernel), axis=None)
        kernel.flat[order[:zeros]] = 0.0
    return kernel


def _layers(kernel):
    try:
        from tfcompress.layers import to_sparse
    except ImportError as error:
        raise NotRun(f"tfcompress.layers.to_sparse is not importable: {error}") from None
    dense = keras.layers.Dense(kernel.shape[1])
    dense.build((None, kernel.shape[0]))
    dense.set_weights([kernel, np.zeros(kernel.shape[1], np.float32)])
    with warnings.catch_warnings():
        # At 50% sparsity to_sparse warns that values plus indices save no bytes; the
        # timing is still wanted there.
        warnings.simplefilter("ignore", UserWarning)
        return dense, to_sparse(dense)


def run(settings):
    size = {key: settings.pick(value["full"], value["smoke"]) for key, value in SIZES.items()}
    runs, warmup = size["runs"], size["warmup"]
    rows = []
    for row_count in size["rows"]:
        x = tf.constant(np.random.default_rng(1).standard_normal(
            (row_count, size["shape"][0])).astype(np.float32))
        for sparsity in SPARSITIES:
            kernel = pruned_kernel(size["shape"], sparsity)
            dense_kernel = tf.constant(kernel)
            sparse_kernel = tf.sparse.from_dense(dense_kernel)
            matmul = tf.function(lambda: tf.matmul(x, dense_kernel))
            sparse = tf.function(lambda: tf.sparse.sparse_dense_matmul(x, sparse_kernel))
            difference = float(np.max(np.abs(matmul().numpy() - sparse().numpy())))
            if difference > 1e-3:
                raise RuntimeError(f"sparse and dense products differ by {difference} at "
                                   f"sparsity {sparsity}; the comparison would be invalid.")
            row = {"rows": row_count, "sparsity": sparsity,
                   "matmul_ms": stats.time_calls(lambda: matmul().numpy(), runs, warmup),
                   "sparse_ms": stats.time_calls(lambda: sparse().numpy(), runs, warmup)}
            row["sparse_speedup"] = stats.ratio(row["matmul_ms"], row["sparse_ms"])

            dense_layer, sparse_layer = _layers(kernel)
            dense_call = tf.function(lambda: dense_layer(x))
            sparse_call = tf.function(lambda: sparse_layer(x))
            row["dense_layer_ms"] = stats.time_calls(lambda: dense_call().numpy(), runs, warmup)
            row["sparse_layer_ms"] = stats.time_calls(lambda: sparse_call().numpy(), runs,
                                                      warmup)
            row["layer_speedup"] = stats.ratio(row["dense_layer_ms"], row["sparse_layer_ms"])
            logger.info("sparse matmul: rows %d, sparsity %.2f: dense %.3f ms, sparse %.3f ms",
                        row_count, sparsity, row["matmul_ms"]["median"],
                        row["sparse_ms"]["median"])
            rows.append(row)

    notes = []
    for row_count in size["rows"]:
        paying = [r["sparsity"] for r in rows
                  if r["rows"] == row_count and (r["sparse_speedup"] or 0) > 1.0]
        notes.append(
            f"{row_count} rows: the sparse op beats tf.matmul at sparsities "
            f"{', '.join(f'{s:.0%}' for s in paying)}." if paying else
            f"{row_count} rows: the sparse op is slower than tf.matmul at every sparsity "
            "measured.")
    return {
        "title": TITLE,
        "setup": (f"Kernel {size['shape'][0]}x{size['shape'][1]}, float32, {runs} timed "
                  f"calls after {warmup} warm-up calls per cell, times in ms as "
                  "median [min, max]; 'x faster' is the dense median over the sparse one."),
        "columns": COLUMNS,
        "rows": rows,
        "notes": notes,
    }
