"""The real MiniLM classifier through compress() and strip(), checked against its weights."""

import numpy as np
import pytest

from tfcompress import bert
from tfcompress.compress import Recipe, compress, strip
from tfcompress.text import BertPreprocessor

pytestmark = pytest.mark.slow

RULES = {"compress": [
    {"match": r"transformer/layer_\d+/ffn/(intermediate|output)",
     "low_rank": {"rank": 64}, "quantize": {"mode": "qat", "bits": 8}},
    {"match": r"transformer/layer_\d+/attention/(query|key|value|output)",
     "prune": {"sparsity": 0.5}, "quantize": {"mode": "qat", "bits": 8}},
]}


@pytest.fixture(scope="module")
def compressed(minilm, reference):
    model = bert.classifier(minilm, num_classes=3, pooling="mean")
    pre = BertPreprocessor(bert.minilm_vocab(), seq_length=16)
    calibration = pre(list(reference["sentences"]) * 4)
    small, report = compress(model, Recipe.from_dict(RULES), calibration_data=calibration)
    return model, small, report, calibration


def _stored_params(layer):
    # Parameters the layer stores, without quantization ranges and counters.
    return sum(int(np.prod(w.shape)) for w in layer.weights
               if not any(tag in w.name for tag in ("_mask", "quantizer", "range")))


def test_report_matches_weights(compressed):
    _, small, report, _ = compressed
    layers = {layer.name: layer for layer in small.layers}
    assert len(report.layers) == 6 * 6
    for entry in report.layers:
        layer = layers[entry.name]
        if entry.rank is not None:
            assert entry.rank == 64
            assert entry.params_after == 64 * (384 + 1536) + layer.units
        else:
            kernel = layer.effective_kernel("kernel").numpy()
            assert entry.sparsity["kernel"] == pytest.approx(np.mean(kernel == 0), abs=1e-9)
            assert np.mean(kernel == 0) == pytest.approx(0.5, abs=1 / kernel.size)
        assert entry.params_after == _stored_params(layer)


def test_strip_keeps_zeros_and_outputs(compressed):
    _, small, _, calibration = compressed
    inference = strip(small)
    names = [w.name for w in inference.weights]
    assert not [n for n in names if "mask" in n or "pruning_step" in n or "threshold" in n]
    query = {layer.name: layer for layer in inference.layers}["transformer/layer_0/attention/query"]
    kernel = query.get_weights()[0]
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=1 / kernel.size)
    np.testing.assert_allclose(inference(calibration).numpy(), small(calibration).numpy(),
                               atol=1e-5)


def test_source_model_untouched(compressed, minilm):
    model, _, _, _ = compressed
    assert minilm.count_params() == 22713216
    kernel = {layer.name: layer for layer in model.layers}[
        "transformer/layer_0/attention/query"].kernel.numpy()
    assert np.mean(kernel == 0) < 0.01
