"""Kernel layers: the shared base of the compressed Dense-like layers, and kernel transforms.

A *structure layer* (``CompressedDense``, ``LowRankDense``, ``CompressedEinsumDense``,
``LowRankEinsumDense`` here, more in the sibling modules) decides how its kernels are stored
and multiplied. A *kernel transform* changes a kernel before use, so that pruning,
fake quantization and binarization compose on any structure layer without wrapper layers.
For each kernel ``k`` named in ``layer.kernel_names`` the layer multiplies with
``effective = t_n(...t_1(k))``, where ``t_1 ... t_n`` are that kernel's transforms in order.

Transform protocol (subclass ``KernelTransform`` and decorate with ``@register_transform``):

- ``__init__(**config)`` takes only JSON-serializable arguments and validates them;
  ``get_config()`` returns all of them, and ``from_config(config)`` is ``cls(**config)``
  unless overridden.
- ``build(layer, kernel_name, kernel_shape)`` runs once inside ``layer.build()``, after the
  kernel variable exists. It creates the transform's state with
  ``self.add_variable(layer, kernel_name, suffix, shape, ...)``, which calls
  ``layer.add_weight(name=f"{kernel_name}_{suffix}")`` and stores the variable in
  ``self.variables[suffix]``. Variables are float32 (or integer) and never autocast, so
  mixed precision leaves them in float32.
- ``__call__(kernel, training)`` maps the float32 kernel tensor to a float32 tensor of the
  same shape. ``training`` is a Python bool or a boolean tensor.
- ``strip()`` decides what the inference layer keeps: ``None`` (the default) drops the
  transform after ``strip_value`` has folded its effect into the stored kernel. Returning a
  transform (for example a copy without training-only state) keeps that transform, and
  its variables whose suffix matches one of this transform's suffixes get this
  transform's values.
- ``strip_value(kernel_value)`` maps the numpy kernel to the kernel stored once this
  transform is dropped (the default returns it unchanged). A mask returns
  ``kernel * mask``.

Each layer owns its own copy of every transform: the layer rebuilds the transforms it is
given from their configs, per kernel, so one instance can be passed to many layers.

Layers store ``kernel_transforms`` in ``get_config`` as
``{kernel_name: [{"class_name": ..., "config": ...}, ...]}``, and an optional
``input_quantizer`` (a registered Keras layer applied to the inputs before the matmul) as
a serialized Keras layer. Both reload without ``custom_objects`` once tfcompress is
imported.

What this module adds to Keras and tfmot: composable per-kernel transforms with their
own variables, one ``strip()`` that folds training state into standard inference layers,
and the tfmot ``PrunableLayer`` interface on every structure layer.
"""

import copy
import logging
import warnings

import numpy as np
from tensorflow_model_optimization.sparsity.keras import PrunableLayer

from tfcompress._keras import keras, tf

logger = logging.getLogger(__name__)

__all__ = [
    "KernelTransform",
    "register_transform",
    "serialize_transform",
    "deserialize_transform",
    "KernelLayer",
    "CompressedDense",
    "LowRankDense",
    "CompressedEinsumDense",
    "LowRankEinsumDense",
    "strip_layer",
    "parameter_count",
    "compressed_bytes",
]

_TRANSFORMS = {}


def register_transform(cls):
    """Register a ``KernelTransform`` subclass under its class name (a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, KernelTransform)):
        raise TypeError(
            f"register_transform expects a KernelTransform subclass; received {cls!r}.")
    name = cls.__name__
    if name in _TRANSFORMS and _TRANSFORMS[name] is not cls:
        raise ValueError(
            f"A different kernel transform is already registered as {name!r} "
            f"({_TRANSFORMS[name].__module__}); rename one of the classes.")
    _TRANSFORMS[name] = cls
    return cls


def serialize_transform(transform):
    """Return ``{"class_name": ..., "config": ...}`` for a registered transform."""
    if not isinstance(transform, KernelTransform):
        raise TypeError(
            f"Expected a KernelTransform; received {type(transform).__name__}.")
    return {"class_name": type(transform).__name__, "config": transform.get_config()}


def deserialize_transform(config):
    """Rebuild a transform from ``serialize_transform`` output (an instance is cloned)."""
    if isinstance(config, KernelTransform):
        config = serialize_transform(config)
    if not isinstance(config, dict) or "class_name" not in config:
        raise TypeError(
            "A kernel transform must be a KernelTransform or a dict with 'class_name' and "
            f"'config'; received {config!r}.")
    name = config["class_name"]
    if name not in _TRANSFORMS:
        raise ValueError(
            f"Unknown kernel transform {name!r}; registered transforms are "
            f"{sorted(_TRANSFORMS)}. Import the module that defines it before loading.")
    return _TRANSFORMS[name].from_config(copy.deepcopy(config.get("config", {})))


class KernelTransform:
    """A serializable function of a kernel with its own variables (see the module docstring)."""

    def __init__(self):
        self.variables = {}
        self.kernel_name = None

    def build(self, layer, kernel_name, kernel_shape):
        """Create this transform's variables on ``layer`` for the kernel ``kernel_name``."""
        self.kernel_name = kernel_name

    def add_variable(self, layer, kernel_name, suffix, shape, dtype="float32",
                     initializer="zeros", trainable=False):
        """Create ``f"{kernel_name}_{suffix}"`` on ``layer`` and store it under ``suffix``."""
        variable = layer.add_weight(
            name=f"{kernel_name}_{suffix}", shape=shape, dtype=dtype,
            initializer=initializer, trainable=trainable,
            # Transform state stays in its own dtype under mixed precision.
            experimental_autocast=False)
        self.variables[suffix] = variable
        return variable

    def __call__(self, kernel, training):
        return kernel

    def strip(self):
        """Return the transform the inference layer keeps, or None to fold and drop it."""
        return None

    def strip_value(self, kernel_value):
        """Return the numpy kernel to store once this transform is dropped."""
        return kernel_value

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _check_positive_int(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{argument} must be a positive integer; received {value!r}.")
    return int(value)


class KernelLayer(keras.layers.Layer, PrunableLayer):
    """Base of the structure layers: named kernels, their transforms, strip and sizes.

    Subclasses set ``kernel_names``, create each kernel in ``build()`` with
    ``add_kernel(name, shape, ...)`` (which also builds the kernel's transforms), and use
    ``compute_kernel(name, training)`` in ``call()``.

    Args:
      kernel_transforms: transforms applied to the kernels. A list applies copies of the
        same transforms to every kernel; a dict ``{kernel_name: [transforms]}`` chooses per
        kernel. Entries are ``KernelTransform`` objects or their serialized dicts.
        Defaults to no transforms.
      input_quantizer: a Keras layer applied to the inputs before the matmul (an
        activation fake quantizer), or its serialized dict. Defaults to None.
      **kwargs: base Layer arguments (name, dtype, trainable...).
    """

    kernel_names = ()

    def __init__(self, kernel_transforms=None, input_quantizer=None, **kwargs):
        super().__init__(**kwargs)
        self._transform_configs = self._normalize_transforms(kernel_transforms)
        self.transforms = {}  # filled per kernel in add_kernel()
        if isinstance(input_quantizer, dict):
            input_quantizer = keras.layers.deserialize(input_quantizer)
        if input_quantizer is not None and not isinstance(input_quantizer, keras.layers.Layer):
            raise TypeError(
                "input_quantizer must be a Keras layer or its serialized dict; received "
                f"{type(input_quantizer).__name__}.")
        self.input_quantizer = input_quantizer
        # Plain dict outside Keras tracking, so the weights are not tracked a second time.
        object.__setattr__(self, "_weights_by_name", {})

    def _normalize_transforms(self, kernel_transforms):
        if kernel_transforms is None:
            return {name: [] for name in self.kernel_names}
        if isinstance(kernel_transforms, KernelTransform) or (
                isinstance(kernel_transforms, dict) and "class_name" in kernel_transforms):
            kernel_transforms = [kernel_transforms]
        if isinstance(kernel_transforms, (list, tuple)):
            kernel_transforms = {name: list(kernel_transforms) for name in self.kernel_names}
        if not isinstance(kernel_transforms, dict):
            raise TypeError(
                "kernel_transforms must be a list of transforms or a dict {kernel_name: "
                f"[transforms]}}; received {type(kernel_transforms).__name__}.")
        unknown = sorted(set(kernel_transforms) - set(self.kernel_names))
        if unknown:
            raise ValueError(
                f"kernel_transforms names unknown kernels {unknown}; {type(self).__name__} "
                f"has the kernels {list(self.kernel_names)}.")
        normalized = {}
        for name in self.kernel_names:
            entries = kernel_transforms.get(name) or []
            normalized[name] = [serialize_transform(deserialize_transform(t)) for t in entries]
        return normalized

    # ---- building ---------------------------------------------------------------------

    def add_weight(self, name=None, *args, **kwargs):
        variable = super().add_weight(name, *args, **kwargs)
        self._weights_by_name[name] = variable
        return variable

    def add_kernel(self, name, shape, initializer="glorot_uniform", regularizer=None,
                   constraint=None):
        """Create the float32 kernel ``name`` and build its transforms, in order."""
        if name not in self.kernel_names:
            raise ValueError(f"{name!r} is not one of the kernels {list(self.kernel_names)}.")
        # A fresh initializer per kernel: one unseeded instance would repeat its values.
        initializer = keras.initializers.get(keras.initializers.serialize(
            keras.initializers.get(initializer)))
        kernel = self.add_weight(
            name=name, shape=shape, dtype="float32", initializer=initializer,
            regularizer=regularizer, constraint=constraint, trainable=True,
            # Kernels stay float32 variables under mixed precision and are cast once,
            # after the transforms, so masks and quantization ranges see float32 values.
            experimental_autocast=False)
        setattr(self, name, kernel)
        transforms = [deserialize_transform(t) for t in self._transform_configs[name]]
        for transform in transforms:
            transform.build(self, name, tuple(int(d) for d in shape))
        self.transforms[name] = transforms
        return kernel

    # ---- use in call() ----------------------------------------------------------------

    def effective_kernel(self, name, training=None):
        """Return the float32 kernel ``name`` after its transforms, in order."""
        kernel = tf.convert_to_tensor(getattr(self, name))
        if training is None:
            training = False
        for transform in self.transforms.get(name, []):
            kernel = transform(kernel, training)
        return kernel

    def compute_kernel(self, name, training=None):
        """Return the effective kernel cast to the layer's compute dtype."""
        return tf.cast(self.effective_kernel(name, training), self.compute_dtype)

    def quantize_inputs(self, inputs, training=None):
        if self.input_quantizer is None:
            return inputs
        return self.input_quantizer(inputs, training=training)

    # ---- matrix view used by N:M and activation-aware methods --------------------------

    def kernel_as_matrix(self, name, value):
        """Return kernel ``name`` as a 2-D [inputs, outputs] numpy matrix."""
        value = np.asarray(value)
        if value.ndim != 2:
            raise NotImplementedError(
                f"{type(self).__name__} has no [inputs, outputs] view of the "
                f"{value.ndim}-D kernel {name!r}.")
        return value

    def matrix_as_kernel(self, name, matrix):
        """Inverse of ``kernel_as_matrix``."""
        return np.reshape(matrix, getattr(self, name).shape)

    # ---- tfmot interface and sizes ----------------------------------------------------

    def get_prunable_weights(self):
        return [getattr(self, name) for name in self.kernel_names]

    def _transform_variables(self, only_dropped=False):
        variables = []
        for transforms in self.transforms.values():
            for transform in transforms:
                if only_dropped and transform.strip() is not None:
                    continue
                variables.extend(transform.variables.values())
        return variables

    def parameter_count(self):
        """Number of stored parameters: weights of the layer, without transform state."""
        excluded = {id(v) for v in self._transform_variables()}
        if self.input_quantizer is not None:
            excluded |= {id(v) for v in self.input_quantizer.weights}
        return int(sum(np.prod(v.shape) for v in self.weights if id(v) not in excluded))

    def compressed_bytes(self):
        """Bytes of the weights the inference layer stores (training-only state excluded)."""
        excluded = {id(v) for v in self._transform_variables(only_dropped=True)}
        return int(sum(np.prod(v.shape) * v.dtype.size
                       for v in self.weights if id(v) not in excluded))

    # ---- strip ------------------------------------------------------------------------

    def strip(self, fold_quantization=False):
        """Return a new built inference layer: dropped transforms folded into the kernels.

        A transform whose ``strip()`` returns None is folded by its ``strip_value``; the
        others are kept (as returned by their ``strip()``) with their variables copied.
        ``standard_layer()`` then may turn the result into a plain Keras layer.

        Args:
          fold_quantization: fold every transform, fake quantization included, so the
            stored kernels are the effective (quantized) values and the layer has no
            input quantizer: a float graph for converters that quantize weights
            themselves (TFLite dynamic range, ai-edge-quantizer).
        """
        if not self.built:
            raise ValueError(f"Layer {self.name!r} must be built before strip().")
        values = {}
        kept = {}
        kept_values = {}
        for name in self.kernel_names:
            value = getattr(self, name).numpy()
            kept[name] = []
            if fold_quantization:
                values[name] = self.effective_kernel(name, training=False).numpy()
                continue
            for transform in self.transforms[name]:
                stripped = transform.strip()
                if stripped is None:
                    if kept[name]:
                        warnings.warn(
                            f"Layer {self.name!r}: {type(transform).__name__} on {name!r} "
                            f"comes after {type(kept[name][-1]).__name__}, which the "
                            "inference layer keeps; folding it into the stored kernel "
                            "changes the order. Put kept transforms (quantization) last.",
                            stacklevel=2)
                    value = transform.strip_value(value)
                    continue
                for suffix, variable in transform.variables.items():
                    kept_values[f"{name}_{suffix}"] = variable.numpy()
                kept[name].append(stripped)
            values[name] = value

        config = self.get_config()
        config["kernel_transforms"] = {
            name: [serialize_transform(t) for t in kept[name]] for name in self.kernel_names}
        quantizer = self.input_quantizer
        if fold_quantization:
            config["input_quantizer"] = None
            quantizer = None
        elif quantizer is not None and hasattr(quantizer, "strip"):
            stripped_quantizer = quantizer.strip()
            config["input_quantizer"] = (
                None if stripped_quantizer is None
                else keras.layers.serialize(stripped_quantizer))
        new = type(self).from_config(config)
        new.build(self._build_input_shape)

        old_values = {name: v.numpy() for name, v in self._weights_by_name.items()}
        old_values.update(kept_values)
        old_values.update(values)
        for name, variable in new._weights_by_name.items():
            if name in old_values:
                variable.assign(old_values[name])
            else:
                logger.debug("Layer %s: %s has no counterpart; kept its initial value.",
                             new.name, name)
        if new.input_quantizer is not None and quantizer is not None:
            source = quantizer.weights
            target = new.input_quantizer.weights
            if [tuple(v.shape) for v in source] == [tuple(v.shape) for v in target]:
                new.input_quantizer.set_weights([v.numpy() for v in source])
        return new.standard_layer()

    def standard_layer(self):
        """Return the plain Keras equivalent when no transform is left, else ``self``."""
        return self

    def get_config(self):
        config = super().get_config()
        config["kernel_transforms"] = copy.deepcopy(self._transform_configs)
        config["input_quantizer"] = (
            None if self.input_quantizer is None
            else keras.layers.serialize(self.input_quantizer))
        return config

    def _has_no_extras(self):
        return self.input_quantizer is None and not any(self._transform_configs.values())


def _dense_config_items(layer):
    return dict(
        activation=keras.activations.serialize(layer.activation),
        use_bias=getattr(layer, "use_bias", getattr(layer, "bias", None) is not None),
        kernel_initializer=keras.initializers.serialize(layer.kernel_initializer),
        bias_initializer=keras.initializers.serialize(layer.bias_initializer),
        kernel_regularizer=keras.regularizers.serialize(layer.kernel_regularizer),
        bias_regularizer=keras.regularizers.serialize(layer.bias_regularizer),
        kernel_constraint=keras.constraints.serialize(layer.kernel_constraint),
        bias_constraint=keras.constraints.serialize(layer.bias_constraint),
    )


class _DenseMixin:
    """Arguments shared by the Dense-like layers, read and checked the same way."""

    def _init_dense(self, units, activation, use_bias, kernel_initializer, bias_initializer,
                    kernel_regularizer, bias_regularizer, kernel_constraint, bias_constraint):
        self.units = _check_positive_int(units, "units") if units is not None else None
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.bias_regularizer = keras.regularizers.get(bias_regularizer)
        self.kernel_constraint = keras.constraints.get(kernel_constraint)
        self.bias_constraint = keras.constraints.get(bias_constraint)

    def _add_bias(self, shape):
        if not self.use_bias:
            self.bias = None
            return
        self.bias = self.add_weight(
            name="bias", shape=shape, initializer=self.bias_initializer,
            regularizer=self.bias_regularizer, constraint=self.bias_constraint,
            trainable=True)

    def _finish(self, outputs):
        if self.bias is not None:
            outputs = outputs + tf.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


def _input_last_dim(input_shape, layer_name):
    last = tf.TensorShape(input_shape)[-1]
    if last is None:
        raise ValueError(
            f"The last dimension of the inputs of {layer_name!r} must be known; received "
            f"input shape {tf.TensorShape(input_shape)}.")
    return int(last)


def _matmul_last_axis(inputs, kernel):
    """x @ K over the last axis; a 2-D matmul when the rank allows (TFLite FULLY_CONNECTED)."""
    if inputs.shape.rank == 2:
        return tf.matmul(inputs, kernel)
    outputs = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
    if not tf.executing_eagerly():
        outputs.set_shape(inputs.shape[:-1].concatenate([kernel.shape[-1]]))
    return outputs


@keras.utils.register_keras_serializable(package="tfcompress")
class CompressedDense(_DenseMixin, KernelLayer):
    """A Dense layer whose kernel passes through kernel transforms before the matmul.

    ``outputs = activation(q(inputs) @ t_n(...t_1(kernel)) + bias)`` with ``kernel``
    [in, units] float32, ``q`` the optional input quantizer.

    Args:
      units: output width.
      activation, use_bias, *_initializer, *_regularizer, *_constraint: as keras Dense.
      kernel_transforms, input_quantizer: see ``KernelLayer``.

    Input shape: [..., in]. Output shape: [..., units].

    >>> layer = CompressedDense(4)
    >>> layer(tf.zeros([2, 3])).shape
    TensorShape([2, 4])
    """

    kernel_names = ("kernel",)

    def __init__(self, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, kernel_transforms=None, input_quantizer=None,
                 **kwargs):
        super().__init__(kernel_transforms=kernel_transforms,
                         input_quantizer=input_quantizer, **kwargs)
        self._init_dense(units, activation, use_bias, kernel_initializer, bias_initializer,
                         kernel_regularizer, bias_regularizer, kernel_constraint,
                         bias_constraint)

    def build(self, input_shape):
        last = _input_last_dim(input_shape, self.name)
        self.add_kernel("kernel", [last, self.units], self.kernel_initializer,
                        self.kernel_regularizer, self.kernel_constraint)
        self._add_bias([self.units])
        super().build(input_shape)

    def call(self, inputs, training=None):
        inputs = self.quantize_inputs(inputs, training)
        return self._finish(_matmul_last_axis(inputs, self.compute_kernel("kernel", training)))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def standard_layer(self):
        if not self._has_no_extras():
            return self
        dense = keras.layers.Dense(self.units, name=self.name, dtype=self.dtype_policy,
                                   **_dense_config_items(self))
        dense.build(self._build_input_shape)
        dense.set_weights(self.get_weights())
        return dense

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, **_dense_config_items(self))
        return config


@keras.utils.register_keras_serializable(package="tfcompress")
class LowRankDense(_DenseMixin, KernelLayer):
    """A Dense layer with a rank-r kernel stored as two factors.

    ``outputs = activation((inputs @ A) @ B + bias)`` with ``kernel_a`` = A [in, rank] and
    ``kernel_b`` = B [rank, units]; it stores rank * (in + units) weights instead of
    in * units. Kernel transforms apply to each factor.

    Args:
      units: output width.
      rank: inner width r of the factorization.
      activation, use_bias, *_initializer, *_regularizer, *_constraint: as keras Dense
        (the kernel arguments apply to both factors).
      kernel_transforms, input_quantizer: see ``KernelLayer``.

    Input shape: [..., in]. Output shape: [..., units].
    """

    kernel_names = ("kernel_a", "kernel_b")

    def __init__(self, units, rank, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, kernel_transforms=None, input_quantizer=None,
                 **kwargs):
        super().__init__(kernel_transforms=kernel_transforms,
                         input_quantizer=input_quantizer, **kwargs)
        self._init_dense(units, activation, use_bias, kernel_initializer, bias_initializer,
                         kernel_regularizer, bias_regularizer, kernel_constraint,
                         bias_constraint)
        self.rank = _check_positive_int(rank, "rank")

    def build(self, input_shape):
        last = _input_last_dim(input_shape, self.name)
        self.add_kernel("kernel_a", [last, self.rank], self.kernel_initializer,
                        self.kernel_regularizer, self.kernel_constraint)
        self.add_kernel("kernel_b", [self.rank, self.units], self.kernel_initializer,
                        self.kernel_regularizer, self.kernel_constraint)
        self._add_bias([self.units])
        super().build(input_shape)

    def call(self, inputs, training=None):
        inputs = self.quantize_inputs(inputs, training)
        hidden = _matmul_last_axis(inputs, self.compute_kernel("kernel_a", training))
        return self._finish(_matmul_last_axis(hidden, self.compute_kernel("kernel_b", training)))

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.units])

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, rank=self.rank, **_dense_config_items(self))
        return config


# ---- EinsumDense ------------------------------------------------------------------------

def _analyze_einsum(equation, bias_axes, input_shape, output_shape):
    """Kernel shape, bias shape and full output shape, exactly as keras EinsumDense builds."""
    # The private Keras helper keeps our shapes identical to keras.layers.EinsumDense.
    analyze = keras.src.layers.core.einsum_dense._analyze_einsum_string
    return analyze(equation, bias_axes, tf.TensorShape(input_shape), output_shape)


def split_einsum(equation):
    """Split ``"in,kernel->out"`` into its three specs, checking the form EinsumDense takes."""
    if not isinstance(equation, str) or equation.count(",") != 1 or "->" not in equation:
        raise ValueError(
            "equation must have the form 'input,kernel->output' (for example "
            f"'abc,cd->abd'); received {equation!r}.")
    left, output_spec = equation.replace(" ", "").split("->")
    input_spec, kernel_spec = left.split(",")
    if "." in kernel_spec:
        raise ValueError(f"The kernel spec of {equation!r} must not contain an ellipsis.")
    return input_spec, kernel_spec, output_spec


def einsum_kernel_axes(equation):
    """Return (contracted, output) kernel letters of an EinsumDense equation.

    Contracted letters appear in the input and the kernel but not in the output; output
    letters appear in the kernel and the output only. A kernel letter that is also kept in
    the output from the input (a per-head weight, say) has no single matrix view, so it
    raises NotImplementedError.
    """
    input_spec, kernel_spec, output_spec = split_einsum(equation)
    shared = [c for c in kernel_spec if c in input_spec and c in output_spec]
    if shared:
        raise NotImplementedError(
            f"The kernel axes {shared} of {equation!r} appear in the input and the output, "
            "so the kernel is a batch of matrices rather than one [inputs, outputs] "
            "matrix. Factor or N:M-prune each matrix with a Dense layer instead.")
    contracted = "".join(c for c in kernel_spec if c in input_spec)
    outputs = "".join(c for c in kernel_spec if c in output_spec)
    return contracted, outputs


def _einsum_matrix_permutation(equation):
    _, kernel_spec, _ = split_einsum(equation)
    contracted, outputs = einsum_kernel_axes(equation)
    return [kernel_spec.index(c) for c in contracted + outputs], len(contracted)


def einsum_kernel_as_matrix(equation, value):
    """Return an EinsumDense kernel as [prod(contracted dims), prod(output dims)]."""
    value = np.asarray(value)
    permutation, num_contracted = _einsum_matrix_permutation(equation)
    value = np.transpose(value, permutation)
    rows = int(np.prod(value.shape[:num_contracted]))
    return value.reshape(rows, -1)


def einsum_inputs_as_matrix(equation, inputs):
    """Return EinsumDense inputs as [rows, prod(contracted dims)], in kernel-row order."""
    input_spec, _, _ = split_einsum(equation)
    contracted, _ = einsum_kernel_axes(equation)
    inputs = np.asarray(inputs)
    letters = input_spec.replace("...", "")
    if input_spec.startswith("..."):
        axes = [letters.index(c) - len(letters) for c in contracted]
    else:
        if inputs.ndim != len(letters):
            raise ValueError(
                f"Inputs of rank {inputs.ndim} do not match the input spec {input_spec!r} "
                f"of {equation!r}.")
        axes = [letters.index(c) for c in contracted]
    moved = np.moveaxis(inputs, axes, list(range(-len(axes), 0)))
    columns = int(np.prod(moved.shape[-len(axes):]))
    return moved.reshape(-1, columns)


class _EinsumMixin:
    def _init_einsum(self, equation, output_shape, bias_axes):
        split_einsum(equation)
        self.equation = equation
        if isinstance(output_shape, (int, np.integer)):
            output_shape = [int(output_shape)]
        if not isinstance(output_shape, (list, tuple)):
            raise ValueError(
                "output_shape must be an int or a list of ints (None for unknown); received "
                f"{output_shape!r}.")
        self.partial_output_shape = list(output_shape)
        self.bias_axes = bias_axes

    def _einsum_config(self):
        return dict(equation=self.equation, output_shape=self.partial_output_shape,
                    bias_axes=self.bias_axes)


@keras.utils.register_keras_serializable(package="tfcompress")
class CompressedEinsumDense(_EinsumMixin, _DenseMixin, KernelLayer):
    """keras EinsumDense with kernel transforms: ``einsum(equation, q(x), t(kernel)) + bias``.

    Args:
      equation, output_shape, bias_axes: as keras EinsumDense.
      activation, *_initializer, *_regularizer, *_constraint: as keras EinsumDense.
      kernel_transforms, input_quantizer: see ``KernelLayer``.

    >>> layer = CompressedEinsumDense("abc,cde->abde", output_shape=(None, 2, 3))
    >>> layer(tf.zeros([1, 4, 5])).shape
    TensorShape([1, 4, 2, 3])
    """

    kernel_names = ("kernel",)

    def __init__(self, equation, output_shape, bias_axes=None, activation=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, kernel_transforms=None, input_quantizer=None,
                 **kwargs):
        super().__init__(kernel_transforms=kernel_transforms,
                         input_quantizer=input_quantizer, **kwargs)
        self._init_dense(None, activation, bias_axes is not None, kernel_initializer,
                         bias_initializer, kernel_regularizer, bias_regularizer,
                         kernel_constraint, bias_constraint)
        self._init_einsum(equation, output_shape, bias_axes)

    def build(self, input_shape):
        kernel_shape, bias_shape, self.full_output_shape = _analyze_einsum(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape)
        self.add_kernel("kernel", kernel_shape, self.kernel_initializer,
                        self.kernel_regularizer, self.kernel_constraint)
        self._add_bias(bias_shape)
        super().build(input_shape)

    def call(self, inputs, training=None):
        inputs = self.quantize_inputs(inputs, training)
        return self._finish(tf.einsum(self.equation, inputs,
                                      self.compute_kernel("kernel", training)))

    def compute_output_shape(self, _):
        return tf.TensorShape(self.full_output_shape)

    def kernel_as_matrix(self, name, value):
        """Return the kernel as [prod(contracted dims), prod(output dims)]."""
        return einsum_kernel_as_matrix(self.equation, value)

    def matrix_as_kernel(self, name, matrix):
        permutation, _ = _einsum_matrix_permutation(self.equation)
        shape = tuple(getattr(self, name).shape)
        permuted = np.reshape(matrix, [shape[p] for p in permutation])
        return np.transpose(permuted, np.argsort(permutation))

    def standard_layer(self):
        if not self._has_no_extras():
            return self
        config = _dense_config_items(self)
        config.pop("use_bias")
        layer = keras.layers.EinsumDense(name=self.name, dtype=self.dtype_policy,
                                         **self._einsum_config(), **config)
        layer.build(self._build_input_shape)
        layer.set_weights(self.get_weights())
        return layer

    def get_config(self):
        config = super().get_config()
        config.update(**self._einsum_config(), **_dense_config_items(self))
        config.pop("use_bias")
        return config


def _unused_letter(equation):
    for letter in "rstuvwxyzRSTUVWXYZ" + "abcdefghijklmnopqABCDEFGHIJKLMNOPQ":
        if letter not in equation:
            return letter
    raise ValueError(f"No free einsum letter is left for the rank axis of {equation!r}.")


def low_rank_equations(equation):
    """Return the two einsum equations of a rank-factored EinsumDense kernel.

    With contracted kernel letters C, output kernel letters O and a free letter r:
    ``t = einsum("{input},{C}r->{input without C}r", x, A)`` then
    ``y = einsum("{input without C}r,r{O}->{output}", t, B)``, so ``A`` is [C dims, rank]
    and ``B`` is [rank, O dims], and ``A @ B`` reshaped equals the transposed kernel.
    """
    input_spec, _, output_spec = split_einsum(equation)
    contracted, outputs = einsum_kernel_axes(equation)
    rank_letter = _unused_letter(equation)
    kept = "".join(c for c in input_spec if c not in contracted)
    dropped = [c for c in kept if c.isalpha() and c not in output_spec]
    if dropped:
        raise NotImplementedError(
            f"The input axes {dropped} of {equation!r} are summed without a kernel axis; "
            "a low-rank EinsumDense supports equations where every input axis is either "
            "contracted with the kernel or kept in the output.")
    first = f"{input_spec},{contracted}{rank_letter}->{kept}{rank_letter}"
    second = f"{kept}{rank_letter},{rank_letter}{outputs}->{output_spec}"
    return first, second


@keras.utils.register_keras_serializable(package="tfcompress")
class LowRankEinsumDense(_EinsumMixin, _DenseMixin, KernelLayer):
    """keras EinsumDense with its kernel stored as two rank-r factors.

    The kernel, viewed as a [contracted dims, output dims] matrix W (see
    ``einsum_kernel_axes``), is replaced by ``A @ B`` with ``kernel_a`` [contracted dims...,
    rank] and ``kernel_b`` [rank, output dims...]; ``low_rank_equations`` gives the two
    einsums, which keep the equation's input and output layout.

    Args:
      equation, output_shape, bias_axes: as keras EinsumDense.
      rank: inner width r.
      activation, *_initializer, *_regularizer, *_constraint: as keras EinsumDense.
      kernel_transforms, input_quantizer: see ``KernelLayer``.
    """

    kernel_names = ("kernel_a", "kernel_b")

    def __init__(self, equation, output_shape, rank, bias_axes=None, activation=None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, kernel_constraint=None,
                 bias_constraint=None, kernel_transforms=None, input_quantizer=None,
                 **kwargs):
        super().__init__(kernel_transforms=kernel_transforms,
                         input_quantizer=input_quantizer, **kwargs)
        self._init_dense(None, activation, bias_axes is not None, kernel_initializer,
                         bias_initializer, kernel_regularizer, bias_regularizer,
                         kernel_constraint, bias_constraint)
        self._init_einsum(equation, output_shape, bias_axes)
        self.rank = _check_positive_int(rank, "rank")
        self._equations = low_rank_equations(equation)

    def build(self, input_shape):
        kernel_shape, bias_shape, self.full_output_shape = _analyze_einsum(
            self.equation, self.bias_axes, input_shape, self.partial_output_shape)
        _, kernel_spec, _ = split_einsum(self.equation)
        contracted, outputs = einsum_kernel_axes(self.equation)
        dims = dict(zip(kernel_spec, kernel_shape))
        self.add_kernel("kernel_a", [dims[c] for c in contracted] + [self.rank],
                        self.kernel_initializer, self.kernel_regularizer,
                        self.kernel_constraint)
        self.add_kernel("kernel_b", [self.rank] + [dims[c] for c in outputs],
                        self.kernel_initializer, self.kernel_regularizer,
                        self.kernel_constraint)
        self._add_bias(bias_shape)
        super().build(input_shape)

    def call(self, inputs, training=None):
        inputs = self.quantize_inputs(inputs, training)
        first, second = self._equations
        hidden = tf.einsum(first, inputs, self.compute_kernel("kernel_a", training))
        return self._finish(tf.einsum(second, hidden, self.compute_kernel("kernel_b", training)))

    def compute_output_shape(self, _):
        return tf.TensorShape(self.full_output_shape)

    def kernel_as_matrix(self, name, value):
        value = np.asarray(value)
        if name == "kernel_a":
            return value.reshape(-1, self.rank)
        return value.reshape(self.rank, -1)

    def get_config(self):
        config = super().get_config()
        config.update(rank=self.rank, **self._einsum_config(), **_dense_config_items(self))
        config.pop("use_bias")
        return config


# ---- functions over any layer ------------------------------------------------------------

def strip_layer(layer, fold_quantization=False):
    """Return the inference form of ``layer``: training-only state folded and removed.

    A layer with a ``strip()`` method (every ``KernelLayer``) returns its result: masks
    folded into the kernels, no mask or step variables, and a plain keras Dense or
    EinsumDense when no transform or input quantizer is left. With
    ``fold_quantization`` the fake quantization is folded into the kernels too, and a
    quantized attention core becomes a plain one. Other layers come back as they are.
    """
    strip = getattr(layer, "strip", None)
    if not callable(strip):
        return layer
    if fold_quantization and isinstance(layer, KernelLayer):
        return strip(fold_quantization=True)
    if fold_quantization and callable(getattr(layer, "fold_quantization", None)):
        return layer.fold_quantization()
    return strip()


def parameter_count(layer):
    """Return the number of stored parameters of ``layer`` (transform state excluded)."""
    if hasattr(layer, "parameter_count"):
        return int(layer.parameter_count())
    return int(sum(np.prod(v.shape) for v in layer.weights))


def compressed_bytes(layer):
    """Return the bytes of the weights ``layer`` stores for inference."""
    if hasattr(layer, "compressed_bytes"):
        return int(layer.compressed_bytes())
    return int(sum(np.prod(v.shape) * v.dtype.size for v in layer.weights))


# ---- views shared by the low-rank and pruning factories -----------------------------------

def is_dense_like(layer):
    return isinstance(layer, (keras.layers.Dense, CompressedDense, LowRankDense))


def is_einsum_like(layer):
    return isinstance(layer, (keras.layers.EinsumDense, CompressedEinsumDense,
                              LowRankEinsumDense))


def einsum_input_shape(layer):
    """Return an input shape that builds an EinsumDense-like layer with ``layer``'s kernel."""
    input_spec, kernel_spec, _ = split_einsum(layer.equation)
    if isinstance(layer, LowRankEinsumDense):
        contracted, _ = einsum_kernel_axes(layer.equation)
        dims = dict(zip(contracted, layer.kernel_a.shape[:-1]))
    else:
        dims = dict(zip(kernel_spec, layer.kernel.shape))
    letters = input_spec.replace("...", "")
    shape = [dims.get(c) for c in letters]
    if input_spec.startswith("..."):
        shape = [None] + shape
    return [None if d is None else int(d) for d in shape]


def inputs_as_matrix(layer, inputs):
    """Return a batch of ``layer``'s inputs as [rows, kernel rows] float64 numpy."""
    inputs = np.asarray(inputs, dtype=np.float64)
    if is_einsum_like(layer):
        return einsum_inputs_as_matrix(layer.equation, inputs)
    return inputs.reshape(-1, inputs.shape[-1])


def _calibration_batches(calibration_inputs):
    if isinstance(calibration_inputs, tf.data.Dataset):
        for element in calibration_inputs:
            if isinstance(element, (tuple, list)):
                element = element[0]
            yield np.asarray(element)
    elif isinstance(calibration_inputs, (list, tuple)):
        for element in calibration_inputs:
            yield np.asarray(element)
    else:
        yield np.asarray(calibration_inputs)


def input_gram(layer, calibration_inputs):
    """Return ``(X^T X, rows)`` of ``layer``'s calibration inputs X [rows, kernel rows].

    ``calibration_inputs`` is the input of the layer itself (not of the model): an array,
    a list of arrays, or a tf.data.Dataset of arrays (or of tuples, whose first item is
    used). The sum is accumulated in float64 so long calibration sets do not lose digits.
    """
    if calibration_inputs is None:
        raise ValueError(
            f"Layer {layer.name!r}: calibration_inputs are required for the activation-aware "
            "method; pass the layer's inputs on a few hundred tokens.")
    gram = None
    rows = 0
    for batch in _calibration_batches(calibration_inputs):
        matrix = inputs_as_matrix(layer, batch)
        gram = matrix.T @ matrix if gram is None else gram + matrix.T @ matrix
        rows += matrix.shape[0]
    if rows == 0:
        raise ValueError(f"Layer {layer.name!r}: calibration_inputs contain no rows.")
    return gram, rows
