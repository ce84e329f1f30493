"""strip(): the inference copy of a compressed model."""

import logging

from tfcompress._keras import check_model
from tfcompress.compress import graph

logger = logging.getLogger(__name__)

# Variable names that only training needs; none may survive strip().
TRAINING_ONLY_NAMES = ("mask", "threshold", "pruning_step")


def strip(model, fold_quantization=False):
    """Return an inference copy of ``model`` without training-only state.

    Every layer with a ``strip()`` method (the tfcompress compressed layers) is replaced
    by its result, ``tfcompress.layers.strip_layer``. Pruning masks are folded into the
    kernels, so pruned kernels keep their zeros, and mask, threshold and step variables
    are dropped. A compressed Dense with nothing left to apply becomes a plain keras
    Dense. Fake-quant ranges stay because the TFLite converter needs them. Other layers
    are copied with their weights. The copy is not compiled, so it has no optimizer
    state, and ``model`` is not modified.

    With ``fold_quantization=True`` the fake quantization is folded as well: kernels
    hold their quantized values and no fake-quant op is left, which is the float graph
    that TFLite's dynamic-range and ai-edge-quantizer's int4 modes quantize themselves.
    """
    from tfcompress.layers import strip_layer

    check_model(model)

    def replace_layer(layer):
        if not callable(getattr(layer, "strip", None)):
            return None
        return strip_layer(layer, fold_quantization=fold_quantization)

    stripped, _ = graph.rebuild(model, replace_layer)
    left = [v.name for v in stripped.weights
            if any(word in v.name for word in TRAINING_ONLY_NAMES)]
    if left:
        raise RuntimeError(f"strip left training-only variables {left} in {model.name!r}; "
                           "the layers holding them have no strip() that removes them.")
    logger.info("stripped %r: %d -> %d weights", model.name, len(model.weights),
                len(stripped.weights))
    return stripped
