"""Recipes, model surgery, strip and structured pruning for tf_keras models."""

from tfcompress.compress.recipe import Recipe, RecipeError, Rule
from tfcompress.compress.report import CompressionReport, LayerReport
from tfcompress.compress.strip import strip
from tfcompress.compress.structured import (head_importance, neuron_importance, remove_heads,
                                            remove_layers, remove_neurons)
from tfcompress.compress.surgery import compress

__all__ = [
    "CompressionReport", "LayerReport", "Recipe", "RecipeError", "Rule", "compress",
    "head_importance", "neuron_importance", "remove_heads", "remove_layers",
    "remove_neurons", "strip",
]
