"""Compression recipes: rules that select layers by name and type, and what to do to them.

A recipe is a list of rules. Each rule selects layers with ``match``, a regular
expression that must match the whole layer name (``re.fullmatch``, so
``'transformer/layer_\\d+/ffn/.*'`` selects every FFN projection and nothing else), and
with ``type``, a Keras class name that the layer's class or one of its base classes must
have. When both are given, a layer must satisfy both. Each rule then names one or more
actions with their arguments:

    low_rank:       {rank | energy | budget, method: svd | activation, force}
    prune:          {sparsity | pattern: 'N:M', schedule: constant | polynomial,
                     method: magnitude | activation, begin_step, end_step, frequency,
                     initial_sparsity}
    quantize:       {mode: qat | weight_only | binary | ternary, bits}
    sparse:         {}
    remove_heads:   {fraction | count, importance: weight | gradient}
    remove_neurons: {fraction | count, importance: weight | gradient}
    remove_layers:  {indices: [block indices]}

Every argument is checked when the rule is created, before any model is touched.
Matching against a model, conflicts between rules and the hint for a rule that selects
nothing are checked by ``Recipe.resolve`` before ``compress`` does any work.
"""

import dataclasses
import difflib
import os
import re

import yaml

ACTION_KEYS = {
    "low_rank": ("rank", "energy", "budget", "method", "force"),
    "prune": ("sparsity", "pattern", "schedule", "method", "begin_step", "end_step",
              "frequency", "initial_sparsity"),
    "quantize": ("mode", "bits"),
    "sparse": (),
    "remove_heads": ("fraction", "count", "importance"),
    "remove_neurons": ("fraction", "count", "importance"),
    "remove_layers": ("indices",),
}
STRUCTURED_ACTIONS = ("remove_heads", "remove_neurons", "remove_layers")
# Per-layer actions in the order compress applies them to one layer.
LAYER_ACTIONS = ("low_rank", "prune", "quantize", "sparse")
LAYER_TYPES = ("Dense", "EinsumDense", "Embedding", "MultiHeadAttention", "AttentionCore",
               "LayerNormalization")
# Layer classes each per-layer action can work on. The tfcompress structure layers are
# listed so that a rule can compose on a model that was already compressed.
ACTION_TYPES = {
    "low_rank": ("Dense", "EinsumDense", "Embedding", "CompressedDense",
                 "CompressedEinsumDense"),
    "prune": ("Dense", "EinsumDense", "CompressedDense", "CompressedEinsumDense",
              "LowRankDense", "LowRankEinsumDense"),
    "quantize": ("Dense", "EinsumDense", "Embedding", "AttentionCore", "LayerNormalization",
                 "CompressedDense", "CompressedEinsumDense", "LowRankDense",
                 "LowRankEinsumDense"),
    "sparse": ("Dense", "CompressedDense"),
}
# Bits each quantize mode supports; binary and ternary weights have no bits argument.
QUANTIZE_BITS = {"qat": (8,), "weight_only": (4, 8), "binary": (None,), "ternary": (None,)}
_PATTERN = re.compile(r"^(\d+):(\d+)$")


class RecipeError(ValueError):
    """A recipe that is invalid, or that does not fit the model it is applied to."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass
class Rule:
    """One recipe rule: which layers, and which actions with which arguments.

    Args:
      match: regular expression that must match a whole layer name (``re.fullmatch``).
      type: Keras class name the layer must be an instance of, one of
        ``LAYER_TYPES``.
      low_rank, prune, quantize, sparse, remove_heads, remove_neurons, remove_layers:
        the arguments of that action as a dict (``{}`` for the defaults), or None when
        the rule does not apply it.

    A rule needs ``match`` or ``type`` unless its only action is ``remove_layers``,
    which acts on the whole encoder.
    """

    match: str = None
    type: str = None
    low_rank: dict = None
    prune: dict = None
    quantize: dict = None
    sparse: dict = None
    remove_heads: dict = None
    remove_neurons: dict = None
    remove_layers: dict = None
    index: int = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        where = self.describe()
        if self.match is not None:
            if not isinstance(self.match, str):
                raise RecipeError(f"{where}: match must be a regular expression string; "
                                  f"received {self.match!r}.")
            try:
                self._regex = re.compile(self.match)
            except re.error as error:
                raise RecipeError(f"{where}: match {self.match!r} is not a valid regular "
                                  f"expression: {error}.") from None
        if self.type is not None and self.type not in LAYER_TYPES:
            raise RecipeError(f"{where}: unknown layer type {self.type!r}; known types: "
                              f"{', '.join(LAYER_TYPES)}.")
        actions = self.actions
        if not actions:
            raise RecipeError(f"{where} names no action; add one of: "
                              f"{', '.join(ACTION_KEYS)}.")
        for action, arguments in actions.items():
            actions[action] = _validate_action(where, action, arguments)
            setattr(self, action, actions[action])
        if self.match is None and self.type is None and set(actions) != {"remove_layers"}:
            raise RecipeError(f"{where} selects no layers; give it a 'match' regular "
                              "expression or a 'type'.")
        if "remove_layers" in actions and len(actions) > 1:
            raise RecipeError(f"{where}: remove_layers acts on the whole encoder; put "
                              f"{sorted(set(actions) - {'remove_layers'})} in another rule.")
        if "sparse" in actions and ({"low_rank", "quantize"} & set(actions)):
            raise RecipeError(f"{where}: sparse storage cannot be combined with low_rank "
                              "or quantize on the same layers; use prune with sparse.")

    @property
    def actions(self):
        """Dict of the actions this rule applies, in application order."""
        names = STRUCTURED_ACTIONS + LAYER_ACTIONS
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def describe(self):
        """Short description naming the rule in error messages."""
        label = "rule" if self.index is None else f"rule {self.index}"
        selectors = []
        if self.match is not None:
            selectors.append(f"match={self.match!r}")
        if self.type is not None:
            selectors.append(f"type={self.type!r}")
        return f"{label} ({', '.join(selectors)})" if selectors else label

    def selects(self, name, class_names):
        """Return whether the rule selects a layer of this name and these class names (MRO)."""
        if self.match is not None and not self._regex.fullmatch(name):
            return False
        if self.type is not None and self.type not in class_names:
            return False
        return True

    @classmethod
    def from_dict(cls, config, index=None):
        where = "rule" if index is None else f"rule {index}"
        if not isinstance(config, dict):
            raise RecipeError(f"{where} must be a mapping of match/type and actions; "
                              f"received {config!r}.")
        known = ("match", "type") + tuple(ACTION_KEYS)
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise RecipeError(f"{where}: unknown keys {unknown}; known keys: "
                              f"{', '.join(known)}.")
        arguments = dict(config)
        # YAML `sparse:` with no value loads as None; it means "sparse with defaults".
        for action in ACTION_KEYS:
            if action in arguments and arguments[action] is None:
                arguments[action] = {}
        return cls(index=index, **arguments)

    def to_dict(self):
        config = {}
        if self.match is not None:
            config["match"] = self.match
        if self.type is not None:
            config["type"] = self.type
        config.update({k: dict(v) for k, v in self.actions.items()})
        return config


def _validate_action(where, action, arguments):
    if not isinstance(arguments, dict):
        raise RecipeError(f"{where}: {action} takes a mapping of arguments; received "
                          f"{arguments!r}.")
    unknown = sorted(set(arguments) - set(ACTION_KEYS[action]))
    if unknown:
        known = ", ".join(ACTION_KEYS[action]) or "none"
        raise RecipeError(f"{where}: unknown {action} arguments {unknown}; known: {known}.")
    args = dict(arguments)
    check = _ArgumentChecker(f"{where}: {action}", args)

    if action == "low_rank":
        chosen = [k for k in ("rank", "energy", "budget") if k in args]
        if len(chosen) != 1:
            raise RecipeError(f"{where}: low_rank needs exactly one of rank, energy or "
                              f"budget; received {chosen or 'none'}.")
        check.integer("rank", low=1)
        check.number("energy", low=0.0, high=1.0, low_open=True)
        if "budget" in args:
            budget = args["budget"]
            fraction_ok = _is_number(budget) and not _is_int(budget) and 0.0 < budget < 1.0
            if not (fraction_ok or (_is_int(budget) and budget >= 1)):
                raise RecipeError(
                    f"{where}: low_rank.budget must be a parameter count >= 1 or a "
                    f"fraction in (0, 1) of the selected layers' kernel parameters; received "
                    f"{budget!r}.")
        check.choice("method", ("svd", "activation"), default="svd")
        check.boolean("force", default=False)

    elif action == "prune":
        if "pattern" in args:
            pattern = args["pattern"]
            found = _PATTERN.match(pattern) if isinstance(pattern, str) else None
            if not found or not 0 < int(found.group(1)) < int(found.group(2)):
                raise RecipeError(
                    f"{where}: prune.pattern must be 'N:M' with 0 < N < M (for example "
                    f"'2:4'); received {pattern!r}.")
            if "sparsity" in args or args.get("schedule") is not None:
                raise RecipeError(f"{where}: prune.pattern fixes the sparsity at N/M; remove "
                                  "sparsity and schedule, or remove pattern.")
        elif "sparsity" not in args:
            raise RecipeError(f"{where}: prune needs sparsity (a fraction in [0, 1)) or a "
                              "pattern such as '2:4'.")
        check.number("sparsity", low=0.0, high=1.0, high_open=True)
        check.choice("schedule", (None, "constant", "polynomial"), default=None)
        check.choice("method", ("magnitude", "activation", "wanda"), default="magnitude")
        # "wanda" is the published name of activation-aware scoring |W| * ||x||.
        if args["method"] == "wanda":
            args["method"] = "activation"
        check.integer("begin_step", low=0, default=0)
        check.integer("end_step", low=1, default=1000)
        check.integer("frequency", low=1, default=100)
        check.number("initial_sparsity", low=0.0, high=1.0, high_open=True, default=0.0)
        if args["end_step"] <= args["begin_step"]:
            raise RecipeError(f"{where}: prune.end_step must be greater than begin_step="
                              f"{args['begin_step']}; received end_step={args['end_step']}.")
        if "sparsity" in args and args["initial_sparsity"] > args["sparsity"]:
            raise RecipeError(f"{where}: prune.initial_sparsity must not exceed sparsity="
                              f"{args['sparsity']}; received {args['initial_sparsity']}.")

    elif action == "quantize":
        check.choice("mode", tuple(QUANTIZE_BITS), default="qat")
        mode = args["mode"]
        allowed = QUANTIZE_BITS[mode]
        bits = args.setdefault("bits", allowed[-1])
        if bits not in allowed or (bits is not None and not _is_int(bits)):
            raise RecipeError(f"{where}: quantize.bits={bits!r} is not supported for "
                              f"mode={mode!r}; allowed: {list(allowed)}.")

    elif action in ("remove_heads", "remove_neurons"):
        chosen = [k for k in ("fraction", "count") if k in args]
        if len(chosen) != 1:
            raise RecipeError(f"{where}: {action} needs exactly one of fraction or count; "
                              f"received {chosen or 'none'}.")
        check.number("fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        check.integer("count", low=1)
        check.choice("importance", ("weight", "gradient"), default="weight")

    elif action == "remove_layers":
        indices = args.get("indices")
        if (not isinstance(indices, (list, tuple)) or not indices
                or not all(_is_int(i) and i >= 0 for i in indices)):
            raise RecipeError(f"{where}: remove_layers.indices must be a non-empty list of "
                              f"block indices >= 0; received {indices!r}.")
        args["indices"] = sorted(set(indices))
    return args


class _ArgumentChecker:
    """Checks one action's arguments in place and fills in defaults."""

    def __init__(self, where, args):
        self.where = where
        self.args = args

    def _fill(self, key, default):
        if key not in self.args:
            if default is not _MISSING:
                self.args[key] = default
            return False
        return True

    def integer(self, key, low, default=None):
        if not self._fill(key, default if default is not None else _MISSING):
            return
        value = self.args[key]
        if not _is_int(value) or value < low:
            raise RecipeError(f"{self.where}.{key} must be an integer >= {low}; received "
                              f"{value!r}.")

    def number(self, key, low, high, low_open=False, high_open=False, default=None):
        if not self._fill(key, default if default is not None else _MISSING):
            return
        value = self.args[key]
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if not _is_number(value):
            raise RecipeError(f"{self.where}.{key} must be a number in {interval}; received "
                              f"{value!r} ({type(value).__name__}); write it without quotes.")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise RecipeError(f"{self.where}.{key} must be in {interval}; received {value!r}.")
        self.args[key] = float(value)

    def choice(self, key, allowed, default):
        self._fill(key, default)
        if self.args[key] not in allowed:
            raise RecipeError(f"{self.where}.{key} must be one of {list(allowed)}; received "
                              f"{self.args[key]!r}.")

    def boolean(self, key, default):
        self._fill(key, default)
        if not isinstance(self.args[key], bool):
            raise RecipeError(f"{self.where}.{key} must be true or false; received "
                              f"{self.args[key]!r}.")


_MISSING = object()


@dataclasses.dataclass
class Plan:
    """What a recipe does to one model, resolved by ``Recipe.resolve``.

    Attributes:
      structured: list of ``(rule, action, arguments, layer names)`` for remove_heads,
        remove_neurons and remove_layers, in recipe order.
      layers: dict from layer name to a dict ``{action: (rule, arguments)}`` of the
        per-layer actions, in model order.
      unreachable: dict from the name of a layer inside a subclassed layer or nested
        model to the rules that selected it and the reason it cannot be replaced.
    """

    structured: list
    layers: dict
    unreachable: dict


class Recipe:
    """An ordered list of ``Rule`` objects plus the other sections of a job recipe.

    Args:
      rules: list of ``Rule`` objects or of rule dicts.
      extra: the other top-level sections of a recipe file (model, data, train, export,
        evaluate, ...), kept unchanged for the job that reads them.
    """

    def __init__(self, rules, extra=None):
        if isinstance(rules, (Rule, dict)) or not isinstance(rules, (list, tuple)):
            raise RecipeError(f"rules must be a list of Rule objects or rule dicts; "
                              f"received {type(rules).__name__}.")
        if not rules:
            raise RecipeError("the recipe has no rules; add at least one entry under "
                              "'compress'.")
        self.rules = []
        for index, rule in enumerate(rules):
            if isinstance(rule, Rule):
                rule = dataclasses.replace(rule, index=index)
            else:
                rule = Rule.from_dict(rule, index=index)
            self.rules.append(rule)
        self.extra = dict(extra or {})

    @classmethod
    def from_dict(cls, config):
        """Build a recipe from a dict with a ``compress`` list of rules."""
        if not isinstance(config, dict) or "compress" not in config:
            keys = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise RecipeError(f"a recipe must be a mapping with a 'compress' list of rules; "
                              f"received {keys}.")
        extra = {k: v for k, v in config.items() if k != "compress"}
        return cls(config["compress"], extra=extra)

    @classmethod
    def from_yaml(cls, path):
        """Read a recipe from a YAML file (``yaml.safe_load``)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"recipe file not found: {path!r}.")
        with open(path, encoding="utf-8") as f:
            try:
                config = yaml.safe_load(f)
            except yaml.YAMLError as error:
                raise RecipeError(f"{path!r} is not valid YAML: {error}") from None
        try:
            return cls.from_dict(config)
        except RecipeError as error:
            raise RecipeError(f"{path}: {error}") from None

    def without_structured(self):
        """Return a recipe of the per-layer actions only, rules keeping their indices.

        ``compress`` matches these against the model that structured pruning produced.
        """
        rules = []
        for rule in self.rules:
            kept = {action: None for action in STRUCTURED_ACTIONS}
            if set(rule.actions) - set(STRUCTURED_ACTIONS):
                rules.append(dataclasses.replace(rule, **kept))
        recipe = Recipe.__new__(Recipe)
        recipe.rules = rules
        recipe.extra = dict(self.extra)
        return recipe

    def to_dict(self):
        config = dict(self.extra)
        config["compress"] = [rule.to_dict() for rule in self.rules]
        return config

    def __repr__(self):
        return f"Recipe({[rule.to_dict() for rule in self.rules]!r})"

    def resolve(self, entries):
        """Match the rules against a model's layers and check them against each other.

        Args:
          entries: list of ``(name, class_names, reason, parent)`` for every layer a
            rule can address, in model order. ``reason`` is None for a layer that can
            be replaced and otherwise says why it cannot. ``parent`` is None or the
            ``(name, class_names)`` of the layer this one is a part of (a split
            MultiHeadAttention), and a rule that selects the parent selects the part.

        Returns:
          A ``Plan``.

        Raises:
          RecipeError: a rule selects no layer (with the closest layer names), selects
            only layers its actions cannot work on, or two rules apply the same action
            to one layer.
        """
        names = []
        for name, _, _, parent in entries:
            if parent is not None and parent[0] not in names:
                names.append(parent[0])
            names.append(name)
        structured, layers, unreachable = [], {}, {}
        for rule in self.rules:
            selected = [(n, c, r) for n, c, r, parent in entries
                        if rule.selects(n, c) or (parent is not None and rule.selects(*parent))]
            if not selected and rule.actions.keys() != {"remove_layers"}:
                raise RecipeError(self._no_match_message(rule, names))

            for action, arguments in rule.actions.items():
                if action in STRUCTURED_ACTIONS:
                    structured.append((rule, action, arguments, [n for n, _, _ in selected]))
                    continue
                supported = [(n, r) for n, c, r in selected
                             if set(ACTION_TYPES[action]) & set(c)]
                if not supported:
                    found = ", ".join(repr(n) for n, _, _ in selected[:5])
                    raise RecipeError(
                        f"{rule.describe()} selects only layers that {action} cannot work on "
                        f"({found}); {action} works on {', '.join(ACTION_TYPES[action])}.")
                for name, reason in supported:
                    if reason is not None:
                        unreachable.setdefault(name, {"reason": reason, "rules": []})
                        unreachable[name]["rules"].append(rule.describe())
                        continue
                    per_layer = layers.setdefault(name, {})
                    if action in per_layer and per_layer[action][0] is not rule:
                        other = per_layer[action][0]
                        raise RecipeError(
                            f"{other.describe()} and {rule.describe()} both apply {action} "
                            f"to layer {name!r}; make the rules select disjoint layers.")
                    per_layer[action] = (rule, arguments)

        for name, actions in layers.items():
            if "sparse" in actions and ({"low_rank", "quantize"} & set(actions)):
                rules = sorted({r.describe() for r, _ in actions.values()})
                raise RecipeError(f"layer {name!r} gets sparse storage together with "
                                  f"{sorted({'low_rank', 'quantize'} & set(actions))} from "
                                  f"{rules}; sparse storage works only on pruned Dense layers.")
        order = {name: i for i, (name, _, _, _) in enumerate(entries)}
        layers = dict(sorted(layers.items(), key=lambda item: order[item[0]]))
        return Plan(structured=structured, layers=layers, unreachable=unreachable)

    @staticmethod
    def _no_match_message(rule, names):
        message = f"{rule.describe()} selects no layer of the model."
        if rule.match is not None:
            close = difflib.get_close_matches(rule.match, names, n=5, cutoff=0.4)
            if close:
                message += f" Closest layer names: {', '.join(repr(n) for n in close)}."
            else:
                message += f" The model has {len(names)} layers, for example: " \
                           f"{', '.join(repr(n) for n in names[:5])}."
        if rule.type is not None:
            message += f" Check that the model has layers of type {rule.type!r}."
        return message
