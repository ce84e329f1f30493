"""Tests of tfcompress.compress.recipe: parsing, argument checks, matching, conflicts."""

import re

import pytest

from tfcompress.compress.recipe import Recipe, RecipeError, Rule

DENSE = ("Dense", "Layer")
# A layer table like graph.layer_table returns for a two-block encoder.
ENTRIES = [
    ("embeddings/word_embeddings", ("Embedding", "Layer"), None, None),
    ("transformer/layer_0/attention/query", DENSE, None, None),
    ("transformer/layer_0/attention/core", ("AttentionCore", "Layer"), None, None),
    ("transformer/layer_0/attention/layer_norm", ("LayerNormalization", "Layer"), None, None),
    ("transformer/layer_0/ffn/intermediate", DENSE, None, None),
    ("transformer/layer_0/ffn/output", DENSE, None, None),
    ("transformer/layer_1/ffn/intermediate", DENSE, None, None),
    ("transformer/layer_1/ffn/output", DENSE, None, None),
    ("mha/query", ("Dense", "EinsumDense"), None, ("mha", ("MultiHeadAttention", "Layer"))),
    ("mha/core", ("AttentionCore",), None, ("mha", ("MultiHeadAttention", "Layer"))),
    ("custom/inner", DENSE, "it is inside the subclassed layer 'custom'", None),
]


def _error(config):
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"compress": [config]})
    return str(info.value)


def test_from_dict_keeps_other_sections():
    config = {"model": {"name": "minilm"}, "train": {"epochs": 2},
              "compress": [{"match": "a", "prune": {"sparsity": 0.5}}]}
    recipe = Recipe.from_dict(config)
    assert recipe.extra == {"model": {"name": "minilm"}, "train": {"epochs": 2}}
    assert recipe.rules[0].prune["sparsity"] == 0.5
    assert recipe.rules[0].prune["schedule"] is None
    assert recipe.rules[0].prune["method"] == "magnitude"


def test_from_yaml(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "export: {mode: int8}\n"
        "compress:\n"
        "  - match: 'transformer/layer_\\d+/ffn/.*'\n"
        "    low_rank: {rank: 96}\n"
        "  - match: 'transformer/layer_\\d+/attention/.*'\n"
        "    prune: {sparsity: 0.5, schedule: polynomial}\n"
        "    quantize: {mode: qat, bits: 8}\n"
        "  - type: Dense\n"
        "    sparse:\n")
    recipe = Recipe.from_yaml(str(path))
    assert recipe.extra == {"export": {"mode": "int8"}}
    assert recipe.rules[0].low_rank == {"rank": 96, "method": "svd", "force": False}
    assert recipe.rules[1].prune["schedule"] == "polynomial"
    assert recipe.rules[1].quantize == {"mode": "qat", "bits": 8}
    assert recipe.rules[2].sparse == {}


def test_from_yaml_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file not found"):
        Recipe.from_yaml(str(tmp_path / "absent.yaml"))


def test_missing_compress_section():
    with pytest.raises(RecipeError, match=r"'compress' list.*\['model'\]"):
        Recipe.from_dict({"model": {}})


INVALID_RULES = [
    ({"match": "a", "shrink": {}}, r"unknown keys \['shrink'\]; known keys: match, type"),
    ({"match": "a", "low_rank": {"rank": 4, "size": 2}},
     r"unknown low_rank arguments \['size'\]; known: rank, energy"),
    ({"match": "a", "low_rank": {"rank": 0}}, r"low_rank.rank must be an integer >= 1; received 0"),
    ({"match": "a", "low_rank": {"rank": -3}}, r"received -3"),
    ({"match": "a", "low_rank": {"energy": 0.0}}, r"energy must be in \(0, 1\]; received 0.0"),
    ({"match": "a", "low_rank": {"energy": 1.5}}, r"energy must be in \(0, 1\]; received 1.5"),
    ({"match": "a", "low_rank": {"rank": 4, "energy": 0.9}}, r"exactly one of rank, energy"),
    ({"match": "a", "low_rank": {"budget": -1}}, r"budget must be a parameter count"),
    ({"match": "a", "low_rank": {"rank": 4, "method": "qr"}},
     r"method must be one of \['svd', 'activation'\]; received 'qr'"),
    ({"match": "a", "prune": {"sparsity": 1.0}}, r"sparsity must be in \[0, 1\); received 1.0"),
    ({"match": "a", "prune": {"sparsity": -0.1}}, r"received -0.1"),
    ({"match": "a", "prune": {"sparsity": "0.5"}},
     r"sparsity must be a number in \[0, 1\); received '0.5' \(str\)"),
    ({"match": "a", "prune": {"pattern": "4:2"}}, r"0 < N < M .*received '4:2'"),
    ({"match": "a", "prune": {"pattern": "2:2"}}, r"received '2:2'"),
    ({"match": "a", "prune": {"pattern": "2-4"}}, r"received '2-4'"),
    ({"match": "a", "prune": {"pattern": "2:4", "sparsity": 0.5}}, r"fixes the sparsity"),
    ({"match": "a", "prune": {}}, r"prune needs sparsity"),
    ({"match": "a", "prune": {"sparsity": 0.5, "schedule": "cubic"}},
     r"schedule must be one of \[None, 'constant', 'polynomial'\]"),
    ({"match": "a", "prune": {"sparsity": 0.5, "begin_step": 10, "end_step": 5}},
     r"end_step must be greater than begin_step=10; received end_step=5"),
    ({"match": "a", "quantize": {"mode": "qat", "bits": 4}},
     r"bits=4 is not supported for mode='qat'; allowed: \[8\]"),
    ({"match": "a", "quantize": {"mode": "weight_only", "bits": 2}}, r"allowed: \[4, 8\]"),
    ({"match": "a", "quantize": {"mode": "fp8"}}, r"mode must be one of"),
    ({"match": "a", "sparse": {"format": "csr"}}, r"unknown sparse arguments \['format'\]"),
    ({"match": "a", "remove_heads": {"fraction": 1.0}}, r"fraction must be in \(0, 1\)"),
    ({"match": "a", "remove_heads": {"importance": "random", "count": 1}},
     r"importance must be one of \['weight', 'gradient'\]"),
    ({"remove_layers": {"indices": [-1]}}, r"indices must be a non-empty list"),
    ({"match": "a"}, r"names no action"),
    ({"low_rank": {"rank": 2}}, r"selects no layers"),
    ({"match": "(", "low_rank": {"rank": 2}}, r"not a valid regular expression"),
    ({"type": "Conv2D", "low_rank": {"rank": 2}}, r"unknown layer type 'Conv2D'"),
    ({"match": "a", "sparse": {}, "quantize": {}}, r"sparse storage cannot be combined"),
]


@pytest.mark.parametrize("config, message", INVALID_RULES)
def test_invalid_rule_message(config, message):
    text = _error(config)
    assert re.search(message, text), text
    assert text.startswith("rule 0")


def test_wanda_is_activation():
    rule = Rule(match="a", prune={"sparsity": 0.5, "method": "wanda"})
    assert rule.prune["method"] == "activation"


def test_fullmatch_not_search():
    rule = Rule(match="transformer/layer_0/ffn/.*", low_rank={"rank": 2})
    assert rule.selects("transformer/layer_0/ffn/output", DENSE)
    assert not rule.selects("x/transformer/layer_0/ffn/output", DENSE)
    assert not Rule(match="ffn", low_rank={"rank": 2}).selects("layer_0/ffn", DENSE)


def test_type_and_match_both_required():
    rule = Rule(match="transformer/.*", type="Dense", quantize={})
    assert rule.selects("transformer/layer_0/ffn/output", DENSE)
    assert not rule.selects("transformer/layer_0/attention/core", ("AttentionCore",))


def test_resolve_selects_supported_layers():
    recipe = Recipe([{"match": "transformer/layer_0/.*", "low_rank": {"rank": 2}},
                     {"match": "transformer/layer_0/.*", "quantize": {"mode": "qat"}}])
    plan = recipe.resolve(ENTRIES)
    assert list(plan.layers) == [
        "transformer/layer_0/attention/query",
        "transformer/layer_0/attention/core",
        "transformer/layer_0/attention/layer_norm",
        "transformer/layer_0/ffn/intermediate",
        "transformer/layer_0/ffn/output",
    ]
    assert set(plan.layers["transformer/layer_0/ffn/output"]) == {"low_rank", "quantize"}
    # AttentionCore and LayerNormalization have no kernel to factor.
    assert set(plan.layers["transformer/layer_0/attention/core"]) == {"quantize"}
    assert set(plan.layers["transformer/layer_0/attention/layer_norm"]) == {"quantize"}


def test_resolve_parent_selects_parts():
    plan = Recipe([{"match": "mha", "prune": {"sparsity": 0.5}}]).resolve(ENTRIES)
    assert list(plan.layers) == ["mha/query"]
    plan = Recipe([{"type": "MultiHeadAttention", "quantize": {}}]).resolve(ENTRIES)
    assert list(plan.layers) == ["mha/query", "mha/core"]


def test_resolve_no_match_lists_closest_names():
    recipe = Recipe([{"match": "transformer/layer_0/ffn/intermediat", "prune": {"sparsity": 0.5}}])
    with pytest.raises(RecipeError) as info:
        recipe.resolve(ENTRIES)
    message = str(info.value)
    assert "rule 0 (match='transformer/layer_0/ffn/intermediat') selects no layer" in message
    assert "Closest layer names: 'transformer/layer_0/ffn/intermediate'" in message


def test_resolve_only_unsupported_layers():
    recipe = Recipe([{"match": ".*/core", "low_rank": {"rank": 2}}])
    with pytest.raises(RecipeError, match=r"selects only layers that low_rank cannot work on "
                                          r"\('transformer/layer_0/attention/core'"):
        recipe.resolve(ENTRIES)


def test_resolve_conflict_names_both_rules_and_layer():
    recipe = Recipe([{"match": "transformer/layer_0/ffn/.*", "low_rank": {"rank": 2}},
                     {"type": "Dense", "low_rank": {"energy": 0.9}}])
    with pytest.raises(RecipeError) as info:
        recipe.resolve(ENTRIES)
    message = str(info.value)
    assert "rule 0 (match='transformer/layer_0/ffn/.*')" in message
    assert "rule 1 (type='Dense')" in message
    assert "both apply low_rank to layer 'transformer/layer_0/ffn/intermediate'" in message


def test_resolve_conflict_two_quantize():
    recipe = Recipe([{"match": "transformer/layer_1/ffn/output", "quantize": {"mode": "qat"}},
                     {"match": "transformer/layer_1/.*",
                      "quantize": {"mode": "weight_only", "bits": 4}}])
    with pytest.raises(RecipeError, match="both apply quantize to layer "
                                          "'transformer/layer_1/ffn/output'"):
        recipe.resolve(ENTRIES)


def test_resolve_sparse_after_low_rank_rejected():
    recipe = Recipe([{"match": "transformer/layer_1/ffn/output", "low_rank": {"rank": 2}},
                     {"match": "transformer/layer_1/ffn/output", "sparse": {}}])
    with pytest.raises(RecipeError, match="sparse storage together with"):
        recipe.resolve(ENTRIES)


def test_resolve_unreachable_recorded():
    plan = Recipe([{"match": "custom/.*", "prune": {"sparsity": 0.5}}]).resolve(ENTRIES)
    assert plan.layers == {}
    assert plan.unreachable["custom/inner"]["reason"].startswith("it is inside")
    assert plan.unreachable["custom/inner"]["rules"] == ["rule 0 (match='custom/.*')"]


def test_structured_actions_in_plan():
    recipe = Recipe([{"match": "transformer/layer_0/attention/.*",
                      "remove_heads": {"fraction": 0.5}},
                     {"remove_layers": {"indices": [1, 1]}}])
    plan = recipe.resolve(ENTRIES)
    (rule, action, arguments, names), (_, action2, arguments2, _) = plan.structured
    assert action == "remove_heads"
    assert arguments == {"fraction": 0.5, "importance": "weight"}
    assert names[0] == "transformer/layer_0/attention/query"
    assert action2 == "remove_layers"
    assert arguments2 == {"indices": [1]}


def test_to_dict_round_trip():
    config = {"data": {"csv": "x.csv"},
              "compress": [{"match": "a.*", "type": "Dense", "prune": {"pattern": "2:4"}}]}
    recipe = Recipe.from_dict(config)
    again = Recipe.from_dict(recipe.to_dict())
    assert again.rules == recipe.rules
    assert again.extra == {"data": {"csv": "x.csv"}}
