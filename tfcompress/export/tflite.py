"""Export a Keras model to TFLite, verify it against the model, measure what was written.

The TFLite converter and ai-edge-quantizer do the conversion. Around them this module
adds a fixed batch-1 signature, a float32 rebuild of mixed-precision models and a check
that only builtin operators were emitted. It writes atomically, so a failed model is
never left at ``path``. It compares the TFLite outputs with the Keras outputs against
per-mode tolerances, with a per-layer breakdown when they fail, and measures sizes and
sparsity from the written bytes.

Modes:
  float32: no optimization.
  float16: float16 weights, float32 compute (the runtime dequantizes them).
  dynamic: int8 weights, activations quantized per invoke (dynamic range).
  int8: int8 weights and activations calibrated on ``representative_data``. Token-id
    inputs stay int32 and the outputs stay float32 (the converter adds a quantize and
    a dequantize step at the edges). LayerNormalization's statistics stay float32, and
    where the int8 model misses the tolerance, more of the residual stream is kept in
    float32, stage by stage (see ``INT8_FLOAT_STAGES``). Models trained with fake
    quantization (QAT) convert without calibration data.
  int16x8: int16 activations and int8 per-channel weights, calibrated on
    ``representative_data`` by ai-edge-quantizer (static, int16 activations, int8
    weights) applied to the float32 model. The operators that produce the model's
    outputs stay float32, so outputs come out as float32 like in the other modes;
    embedding tables are stored as int16 (a gather takes its table's scale). Inputs
    must be integers (token ids): the quantizer would turn float inputs into int16.
  int4: int4 weights in blocks of 32 with float32 activations (ai-edge-quantizer
    recipe ``dynamic_wi4b32_afp32``) applied to the float32 model, with embedding
    lookups on constant tables rewritten so that the recipe covers the tables too
    (``flatbuffer.gather_to_embedding_lookup``); weights whose input size is not a
    multiple of 32 stay float32.
"""

import dataclasses
import logging
import os
import re
import tempfile
import warnings

import numpy as np

from tfcompress._keras import check_model, tf
from tfcompress.export import flatbuffer, signature

logger = logging.getLogger(__name__)

MODES = ("float32", "float16", "dynamic", "int8", "int16x8", "int4")
_CALIBRATED = ("int8", "int16x8")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Limits a verified export must meet; a None field is not checked.

    Attributes:
      max_abs_diff: largest allowed |tflite - keras| over all outputs and examples.
      min_cosine: smallest allowed cosine similarity of each output (all examples
        flattened into one vector).
      min_label_agreement: smallest allowed fraction of examples whose argmax agrees;
        checked only for a model with one output of shape [batch, classes].
    """

    max_abs_diff: float = None
    min_cosine: float = None
    min_label_agreement: float = None


# float32 and float16 differ from Keras only by rounding, so an absolute bound fits
# logits and hidden states of order 1. The quantized modes change every weight, so
# they are judged by direction (cosine) and by the decisions (argmax) they keep.
TOLERANCES = {
    "float32": Tolerance(max_abs_diff=1e-4),
    "float16": Tolerance(max_abs_diff=1e-2),
    "dynamic": Tolerance(min_cosine=0.99, min_label_agreement=0.9),
    "int8": Tolerance(min_cosine=0.98, min_label_agreement=0.9),
    "int16x8": Tolerance(min_cosine=0.99, min_label_agreement=0.9),
    "int4": Tolerance(min_cosine=0.95, min_label_agreement=0.8),
}


@dataclasses.dataclass(frozen=True)
class Verification:
    """TFLite outputs compared with the Keras model's on the verification examples.

    Attributes:
      examples: number of examples run, one invoke each.
      max_abs_diff: largest |tflite - keras| over all outputs.
      cosine: smallest per-output cosine similarity.
      label_agreement: fraction of examples with the same argmax, or None when the
        model has no single [batch, classes] output.
      per_output: ``{output name: {"max_abs_diff": ..., "cosine": ...}}``.
      tolerance: the limits applied.
    """

    examples: int
    max_abs_diff: float
    cosine: float
    label_agreement: float
    per_output: dict
    tolerance: Tolerance

    def failures(self):
        """Return a sentence per violated limit; empty when the export passes."""
        failed = []
        limit = self.tolerance
        if limit.max_abs_diff is not None and not self.max_abs_diff <= limit.max_abs_diff:
            failed.append(f"max abs diff {self.max_abs_diff:.3g} > {limit.max_abs_diff:g}")
        if limit.min_cosine is not None and not self.cosine >= limit.min_cosine:
            failed.append(f"cosine {self.cosine:.6f} < {limit.min_cosine:g}")
        if (limit.min_label_agreement is not None and self.label_agreement is not None
                and not self.label_agreement >= limit.min_label_agreement):
            failed.append(f"label agreement {self.label_agreement:.3f} < "
                          f"{limit.min_label_agreement:g}")
        return failed


class VerificationError(RuntimeError):
    """The exported model's outputs are beyond the tolerance of its mode."""

    def __init__(self, message, verification, layer_errors):
        super().__init__(message)
        self.verification = verification
        self.layer_errors = layer_errors


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """A written and verified .tflite file and what was measured on it.

    Attributes:
      path: the written file.
      mode: one of ``MODES``.
      bytes: file size on disk.
      gzip_bytes: size of the file's bytes gzip-compressed at level 6 (the gzip command's default).
      sparsity: fraction of exact zeros in the stored constant tensors of rank >= 2.
      sparse_tensors: how many of those tensors are stored sparse-encoded.
      verification: a ``Verification``, or None when no data was given.
      batch_size: the fixed batch size of the signature, always 1.
      seq_length: the fixed sequence length of the token inputs, or None when every
        input had a fixed shape already. Longer inputs must be truncated.
      inputs: ``(name, dtype, shape)`` of each signature input.
      outputs: the signature's output names.
      operators: the operator names the model uses.
      float_tensors: in mode "int8", the patterns of the operator outputs that were
        kept in float32 (besides ``float_ops``); empty otherwise.
      float_nodes: how many operators those patterns matched.
    """

    path: str
    mode: str
    bytes: int
    gzip_bytes: int
    sparsity: float
    sparse_tensors: int
    verification: Verification
    batch_size: int
    seq_length: int
    inputs: tuple
    outputs: tuple
    operators: tuple
    float_tensors: tuple = ()
    float_nodes: int = 0

    @property
    def fixed_sequence_length(self):
        return self.seq_length is not None


# LayerNormalization's statistics stay float32 in int8 exports: BERT's epsilon is 1e-12,
# so a small variance that rounds to the int8 zero point becomes rsqrt(1e-12) = 1e6 and
# wrecks the layer's output.
INT8_FLOAT_OPS = ("MEAN", "SQUARED_DIFFERENCE", "RSQRT")

# Stages of float_tensors="auto": operators kept in float32, tried in order until the
# int8 model meets its tolerance. Each entry is a tuple of regular expressions searched
# in the output tensor names of the operators, which carry the Keras layer names.
#   1. nothing more: every matmul, add and activation is int8.
#   2. the residual stream: LayerNormalization's elementwise steps (Keras names them
#      ".../batchnorm/...") and the encoder's residual adds. In MiniLM's FFN outputs a
#      few channels reach about 200 while the rest stay below 5. One int8 scale for the
#      residual sum then rounds the typical values away. The matmuls all stay int8.
#   3. also the FFN output projections, whose int8 output has the same outlier range.
#      They run with float32 activations and int8 weights, as in mode "dynamic".
INT8_FLOAT_STAGES = (
    (),
    (r"/batchnorm/", r"/residual/"),
    (r"/batchnorm/", r"/residual/", r"/ffn/output/"),
)


def to_tflite(model, path, mode="float32", representative_data=None, verify_data=None,
              sparse=False, seq_length=None, overwrite=False, tolerance=None,
              num_threads=None, float_ops=INT8_FLOAT_OPS, float_tensors="auto"):
    """Convert ``model`` to a TFLite file at ``path``, verify it, and measure it.

    Args:
      model: a tf_keras model (functional or Sequential). One built under a mixed
        precision policy is rebuilt in float32 first.
      path: the .tflite file to write. Its folder is created when missing.
      mode: one of "float32", "float16", "dynamic", "int8", "int16x8", "int4" (see
        the module docstring).
      representative_data: calibration examples, required for "int8" (unless the
        model has fake-quant ops) and "int16x8": a dict of arrays keyed by input
        name, a single array for one-input models, or a ``tf.data.Dataset`` of
        those (labels are ignored). Token ids must be integers.
      verify_data: examples, in the same forms, on which the TFLite outputs are
        compared with the Keras outputs. Defaults to ``representative_data``;
        when both are None the file is written unverified, with a warning.
      sparse: store pruned weights sparse-encoded
        (``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``).
      seq_length: the fixed sequence length of the token inputs. Defaults to the
        length of ``verify_data`` (or ``representative_data``); examples are padded
        with zeros or truncated to it.
      overwrite: replace an existing file at ``path``.
      tolerance: a ``Tolerance`` (or a dict of its fields) replacing the mode's
        default in ``TOLERANCES``.
      num_threads: interpreter threads used for verification.
      float_ops: TFLite operators kept in float32 in mode "int8" with
        representative data, with quantize / dequantize around them. The default
        keeps LayerNormalization's mean, variance and rsqrt in float (see
        ``INT8_FLOAT_OPS``); pass ``()`` together with ``float_tensors=()`` for a
        fully integer model.
      float_tensors: in mode "int8" with representative data, regular expressions
        searched in the operators' output tensor names; matching operators stay
        float32. "auto" (the default) tries the stages of ``INT8_FLOAT_STAGES`` in
        order and keeps the first that meets the tolerance (the first stage only,
        when there is nothing to verify on).

    Returns:
      An ``ExportResult``.

    Raises:
      ValueError: an unknown mode, missing calibration data or malformed data.
      TypeError: float arrays given for integer token-id inputs.
      FileExistsError: ``path`` exists and ``overwrite`` is False.
      flatbuffer.UnsupportedOpError: the model needs a Flex or custom operator.
      VerificationError: outputs beyond tolerance; the message lists the layers with
        the largest error. Nothing is written at ``path`` when conversion or
        verification fails.
    """
    # Cheap argument checks, before any tracing or conversion.
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path {path!r} is a folder; pass a file path such as "
                                f"{os.path.join(path, 'model.tflite')!r}.")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} already exists; pass overwrite=True to replace "
                              "it or choose another path.")
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be True or False; received {sparse!r}.")
    stages = _float_stages(float_tensors)
    if mode != "int8" and not (isinstance(float_tensors, str) and float_tensors == "auto"):
        raise ValueError(f"float_tensors applies to mode 'int8' only; received "
                         f"{float_tensors!r} with mode {mode!r}. Remove it.")
    _check_float_ops(float_ops)
    if mode == "int16x8" and representative_data is None:
        raise ValueError(_CALIBRATION_MISSING.format(mode=mode))
    if seq_length is not None and (not isinstance(seq_length, int) or seq_length < 1):
        raise ValueError(f"seq_length must be a positive integer; received {seq_length!r}.")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer; received {num_threads!r}.")
    if isinstance(tolerance, dict):
        fields = [field.name for field in dataclasses.fields(Tolerance)]
        unknown = sorted(set(tolerance) - set(fields))
        if unknown:
            raise ValueError(f"tolerance has unknown field(s) {unknown}; use "
                             f"{', '.join(fields)}.")
        tolerance = Tolerance(**tolerance)
    if tolerance is not None and not isinstance(tolerance, Tolerance):
        raise TypeError(f"tolerance must be a Tolerance or a dict of its fields; "
                        f"received {type(tolerance).__name__}.")
    tolerance = tolerance or TOLERANCES[mode]
    check_model(model)

    # Signature and data: dtype and shape errors surface here, before conversion.
    model = signature.float32_rebuild(model)
    if seq_length is None:
        seq_length = (signature.sequence_length_of(verify_data, model)
                      or signature.sequence_length_of(representative_data, model))
    specs = signature.input_specs(model, seq_length)
    if mode == "int16x8" and not all(spec.is_integer for spec in specs):
        floats = [spec.name for spec in specs if not spec.is_integer]
        raise ValueError(
            f"mode 'int16x8' supports models whose inputs are integers (token ids); "
            f"input(s) {floats} are float and would become int16 inputs. Use mode "
            "'int8' or 'dynamic' for this model.")
    has_dynamic_length = any(None in t.shape[1:] for t in model.inputs)
    calibration = None
    if representative_data is not None:
        calibration = list(signature.iterate_examples(representative_data, specs,
                                                      "representative_data"))
        if not calibration:
            raise ValueError("representative_data is empty; pass at least one example.")
        if mode not in _CALIBRATED:
            logger.info("mode %r needs no calibration; representative_data is used "
                        "for verification only", mode)
    if verify_data is not None:
        examples = list(signature.iterate_examples(verify_data, specs, "verify_data"))
        if not examples:
            raise ValueError("verify_data is empty; pass at least one example.")
    else:
        examples = calibration

    # Conversion.
    serve, concrete = _serving_function(model, specs)
    quantization_aware = _has_fake_quant(concrete)
    if mode in _CALIBRATED and calibration is None and not (
            mode == "int8" and quantization_aware):
        raise ValueError(_CALIBRATION_MISSING.format(mode=mode))
    # ``quantizer`` is the object that quantized the model: TFLite's QuantizationDebugger
    # for int8 or ai-edge-quantizer's Quantizer for int16x8. A failure breakdown reuses it.
    verification, patterns, nodes, quantizer = None, (), [], None
    if mode == "int8" and calibration is not None and (float_ops or any(stages)):
        quantizer = _calibrate(
            _converter(model, serve, concrete, mode, calibration, sparse, quantization_aware),
            calibration, float_ops)
        for stage, stage_patterns in enumerate(stages):
            stage_nodes = _matching_outputs(quantizer.calibrated_model, stage_patterns)
            if stage and stage_nodes == nodes:
                continue  # The same denylist gives the same model, judged already.
            patterns, nodes = stage_patterns, stage_nodes
            content = _quantize_selective(quantizer, float_ops, nodes)
            if examples is None:
                break
            verification = verify(model, content, examples, tolerance, num_threads)
            failed = verification.failures()
            if not failed:
                break
            if stage < len(stages) - 1:
                logger.info("int8 with %d operators in float32 (%s) failed: %s. Keeping "
                            "more in float32", len(nodes), ", ".join(patterns) or "none",
                            "; ".join(failed))
        if len(stages) == 1 and patterns and not nodes:
            warnings.warn(f"float_tensors {list(patterns)} matched no operator output, so "
                          "nothing more was kept in float32. Operator outputs are named "
                          "after the Keras layers, such as 'model/dense/MatMul'.",
                          stacklevel=2)
    else:
        content = _convert(
            _converter(model, serve, concrete, mode, calibration, sparse, quantization_aware))
        if mode == "int8" and calibration is None:
            _check_quantization_aware_int8(content)
    if mode == "int4":
        content = _quantize_int4(content)
    if mode == "int16x8":
        content, quantizer = _quantize_int16x8(content, calibration)
    flatbuffer.check_builtin_ops(content)

    # Atomic write: a temporary file beside path, verified, then renamed onto path.
    folder = os.path.dirname(os.path.abspath(path))
    created = _missing_folders(folder)
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tfcompress-", suffix=".tflite")
    written = False
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(content)
        if examples is None:
            warnings.warn(
                f"{path!r} is written unverified because neither verify_data nor "
                "representative_data was given; pass verify_data to compare it with "
                "the Keras model.", stacklevel=2)
        else:
            if verification is None:
                verification = verify(model, content, examples, tolerance, num_threads)
            failed = verification.failures()
            if failed:
                layers = _layer_errors(model, serve, concrete, mode, content, examples,
                                       quantizer)
                raise VerificationError(_failure_message(mode, failed, verification, layers),
                                        verification, layers)
        os.replace(temporary, path)
        written = True
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
        if not written:
            # The folders this call created are empty again; remove them, deepest first.
            for created_folder in created:
                os.rmdir(created_folder)

    stats = flatbuffer.weight_stats(content)
    result = ExportResult(
        path=path,
        mode=mode,
        bytes=os.path.getsize(path),
        gzip_bytes=flatbuffer.gzip_size(content),
        sparsity=stats.sparsity,
        sparse_tensors=stats.sparse_tensors,
        verification=verification,
        batch_size=1,
        seq_length=seq_length if has_dynamic_length else None,
        inputs=tuple((s.name, s.dtype, s.shape) for s in specs),
        outputs=tuple(_output_names(content)),
        operators=tuple(sorted(set(flatbuffer.used_operator_names(content)))),
        float_tensors=tuple(patterns),
        float_nodes=len(nodes),
    )
    logger.info("wrote %s (%s, %d bytes, %d gzip bytes, sparsity %.3f)", path, mode,
                result.bytes, result.gzip_bytes, result.sparsity)
    return result


def _missing_folders(folder):
    """Return the folders that ``os.makedirs(folder)`` would create, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _serving_function(model, specs):
    def serve(inputs):
        outputs = signature.call_model(model, inputs)
        return signature.flatten_outputs(model, outputs)

    function = tf.function(serve)
    concrete = function.get_concrete_function({s.name: s.tensor_spec() for s in specs})
    return function, concrete


def _has_fake_quant(concrete):
    graph_def = concrete.graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    return any(node.op.startswith("FakeQuantWithMinMax") for node in nodes)


def _converter(model, serve, concrete, mode, calibration, sparse, quantization_aware):
    # A bare module with the variables and the function: handing the Keras model to
    # the converter makes it save every layer's traced call, which is several times
    # slower and changes nothing in the result.
    module = tf.Module()
    module.model_variables = list(model.variables)
    module.serve = serve
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
    optimizations = []
    if mode in ("float16", "dynamic", "int8") or quantization_aware:
        optimizations.append(tf.lite.Optimize.DEFAULT)
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode == "int8" and calibration is not None:
        converter.representative_dataset = lambda: iter(calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


_SELECT_OPS = re.compile(r"(?:TF Select ops|Flex ops|Custom ops): ([^\n]+)")
_OP_NOT_SUPPORTED = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


def _convert(converter):
    try:
        return converter.convert()
    except Exception as error:  # ConverterError is not exported under a stable name.
        text = str(error)
        ops = []
        for match in _SELECT_OPS.finditer(text):
            ops.extend(op.strip() for op in match.group(1).split(","))
        ops.extend(_OP_NOT_SUPPORTED.findall(text))
        if ops:
            raise flatbuffer.UnsupportedOpError(
                ops, "The TFLite converter found no builtin for them.") from None
        raise


def _quantize_int4(content):
    from ai_edge_quantizer import quantizer, recipe

    # The recipe covers EMBEDDING_LOOKUP but not GATHER, and the converter emits GATHER
    # for a Keras Embedding. Without the rewrite the word table would stay float32.
    content = flatbuffer.gather_to_embedding_lookup(content)
    float_tables = flatbuffer.operator_outputs(content, "GATHER", "FLOAT32")
    if float_tables:
        warnings.warn(f"{len(float_tables)} embedding lookup(s), such as "
                      f"{float_tables[0]!r}, keep a float32 table in int4 because their ids "
                      "are not static int32 tensors.", stacklevel=3)
    int4 = quantizer.Quantizer(bytearray(content), recipe.dynamic_wi4b32_afp32())
    # Blocks of 32 run along a weight's last axis, and the quantizer raises for a weight
    # whose last axis is not a multiple of 32. Those operators stay float32.
    _leave_unquantized(int4, flatbuffer.operators_with_unblocked_weights(content, 32))
    result = int4.quantize(enable_progress_report=False, enable_progress_bar=False)
    return bytes(result.quantized_model)


def _operator_scope(name):
    """Return a regex for the ai-edge-quantizer scope of the operator that outputs ``name``.

    A scope is the operator's output tensor names, each followed by ";".
    """
    return f"(^|;){re.escape(name)};"


def _leave_unquantized(quantizer, names):
    """Keep the operators that output ``names`` in float32 in an ai-edge-quantizer recipe."""
    from ai_edge_quantizer import qtyping

    for name in names:
        quantizer.update_quantization_recipe(
            regex=_operator_scope(name),
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            algorithm_key="no_quantize")


def _check_quantization_aware_int8(content):
    """Raise when an int8 model converted from fake-quant ranges alone still has float
    matmuls, which happens when the ranges cover only part of the graph."""
    float_matmuls = (flatbuffer.operator_outputs(content, "FULLY_CONNECTED", "FLOAT32")
                     + flatbuffer.operator_outputs(content, "BATCH_MATMUL", "FLOAT32"))
    if float_matmuls:
        raise ValueError(
            f"the model's fake-quant ranges leave {len(float_matmuls)} matmul(s) without "
            f"int8 inputs, such as {float_matmuls[0]!r}, so they would run in float32. "
            "Pass representative_data so that the converter calibrates the other ranges, "
            "or use mode='dynamic'.")


def _int16x8_quantizer(content):
    """Return an ai-edge-quantizer ``Quantizer`` set up for the int16x8 mode."""
    from ai_edge_quantizer import qtyping, quantizer

    # The TFLite converter's own 16x8 mode emits int16 SQUARED_DIFFERENCE and RSQRT for
    # LayerNormalization. LiteRT 2.3.0 rejects the first and aborts the process on the
    # second, while ai-edge-quantizer's int16 LayerNormalization runs.
    int16 = quantizer.Quantizer(bytearray(content))
    int16.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED,
                            activation_num_bits=16, weight_num_bits=8,
                            weight_granularity=qtyping.QuantGranularity.CHANNELWISE)
    # The operators that produce the outputs or read float inputs stay float32, so the
    # model's float inputs and outputs keep their type.
    _leave_unquantized(int16, flatbuffer.float_edge_operator_outputs(content))
    return int16


def _quantize_int16x8(content, calibration):
    """Return the int16x8 model and the ai-edge-quantizer ``Quantizer`` that made it."""
    int16 = _int16x8_quantizer(content)
    calibrated = int16.calibrate({_signature_key(content): calibration}, num_threads=1)
    result = int16.quantize(calibrated, enable_progress_report=False,
                            enable_progress_bar=False)
    return bytes(result.quantized_model), int16


def _signature_key(content):
    from ai_edge_litert.interpreter import Interpreter

    return next(iter(Interpreter(model_content=content).get_signature_list()))


def _output_names(content):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=content).get_signature_list()
    return list(next(iter(runner.values()))["outputs"])


def run_tflite(content, examples, num_threads=None):
    """Run a single-signature .tflite model on each example; return stacked outputs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=num_threads)
    runner = interpreter.get_signature_runner()
    collected = {}
    for example in examples:
        for name, value in runner(**example).items():
            collected.setdefault(name, []).append(np.array(value))
    return {name: np.concatenate(values) for name, values in collected.items()}


def _keras_outputs(model, examples):
    batch = {name: np.concatenate([e[name] for e in examples]) for name in examples[0]}
    outputs = signature.call_model(model, batch)
    return {name: np.asarray(value, np.float32)
            for name, value in signature.flatten_outputs(model, outputs).items()}


def _cosine(a, b):
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    if norms == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norms)


def verify(model, content, examples, tolerance, num_threads=None):
    """Compare a .tflite model's outputs with the Keras model's; return a ``Verification``."""
    expected = _keras_outputs(model, examples)
    actual = run_tflite(content, examples, num_threads)
    per_output = {}
    for name, reference in expected.items():
        if name not in actual:
            raise RuntimeError(f"the TFLite model has no output {name!r}; it has "
                               f"{sorted(actual)}.")
        result = actual[name].astype(np.float32).reshape(reference.shape)
        diff = np.abs(result - reference)
        per_output[name] = {
            "max_abs_diff": float(np.max(diff)) if diff.size else 0.0,
            "cosine": _cosine(result, reference),
        }
        if not np.all(np.isfinite(result)):
            per_output[name]["max_abs_diff"] = float("inf")
    agreement = None
    if len(expected) == 1:
        (name, reference), = expected.items()
        if reference.ndim == 2 and reference.shape[1] >= 2:
            predicted = actual[name].reshape(reference.shape).argmax(axis=1)
            agreement = float(np.mean(predicted == reference.argmax(axis=1)))
    return Verification(
        examples=len(examples),
        max_abs_diff=max(o["max_abs_diff"] for o in per_output.values()),
        cosine=min(o["cosine"] for o in per_output.values()),
        label_agreement=agreement,
        per_output=per_output,
        tolerance=tolerance,
    )


def _layer_errors(model, serve, concrete, mode, content, examples, quantizer=None,
                  top=10):
    """Return ``[(tensor name, error, what the error is)]``, largest first.

    ``quantizer`` is the object that produced ``content``: the QuantizationDebugger of
    an int8 model, set to its denylist, or the ai-edge-quantizer Quantizer of an int16x8
    model.
    """
    try:
        if mode == "int16x8" and quantizer is not None:
            return _int16x8_errors(quantizer, content, examples, top)
        if mode == "int8" and quantizer is not None:
            return _debugger_errors(quantizer, top)
        if mode == "float32":
            return []
        reference = _convert(_converter(model, serve, concrete, "float32", None, False, False))
        return _tensor_errors(reference, content, examples[0], top)
    except Exception as error:  # The breakdown is a diagnosis; never hide the failure.
        logger.warning("per-layer error breakdown failed: %s", error)
        return []


def _debug_dataset(calibration):
    def dataset():
        # The debugger feeds a list in the interpreter's input order, which follows
        # the sorted signature input names.
        for example in calibration:
            yield [example[name] for name in sorted(example)]

    return dataset


_CALIBRATION_MISSING = (
    "mode {mode!r} calibrates activation ranges and needs representative_data (a few "
    "hundred typical examples); pass it, or use mode='dynamic', which needs none.")


def _check_float_ops(float_ops):
    from ai_edge_litert import schema_py_generated as schema

    if isinstance(float_ops, str) or not isinstance(float_ops, (list, tuple)):
        raise TypeError(f"float_ops must be a list of TFLite operator names such as "
                        f"{list(INT8_FLOAT_OPS)}; received {float_ops!r}.")
    unknown = [op for op in float_ops if not (isinstance(op, str) and op.isupper()
                                             and hasattr(schema.BuiltinOperator, op))]
    if unknown:
        raise ValueError(f"float_ops contains {unknown}, which are not TFLite builtin operator "
                         f"names; use names such as {list(INT8_FLOAT_OPS)}.")


def _float_stages(float_tensors):
    """Return the tuple of pattern tuples that ``to_tflite`` tries in mode int8."""
    if isinstance(float_tensors, str) and float_tensors == "auto":
        return INT8_FLOAT_STAGES
    if isinstance(float_tensors, str) or not isinstance(float_tensors, (list, tuple)):
        raise TypeError(f"float_tensors must be 'auto' or a list of regular expressions; "
                        f"received {float_tensors!r}.")
    for pattern in float_tensors:
        if not isinstance(pattern, str):
            raise TypeError(f"float_tensors must contain regular expressions as str; "
                            f"received {pattern!r}.")
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"float_tensors contains {pattern!r}, which is not a regular "
                             f"expression ({error}); fix or remove it.") from None
    return (tuple(float_tensors),)


def _calibrate(converter, calibration, float_ops):
    """Return TFLite's QuantizationDebugger with the model calibrated on ``calibration``.

    Its ``options`` setter quantizes the calibrated model again with another denylist
    of operator types and operator output names, without calibrating again.
    """
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
                                           tf.lite.OpsSet.TFLITE_BUILTINS]
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=_debug_dataset(calibration),
        debug_options=tf.lite.experimental.QuantizationDebugOptions(
            denylisted_ops=list(float_ops)))


def _matching_outputs(content, patterns):
    """Return the operator output names that match one of the regular expressions."""
    return [name for name in flatbuffer.operator_outputs(content)
            if any(re.search(pattern, name) for pattern in patterns)]


def _quantize_selective(debugger, float_ops, nodes):
    """Quantize to int8, keeping the ``float_ops`` operator types and the operators that
    output ``nodes`` in float32."""
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_ops=list(float_ops), denylisted_nodes=nodes)
    content = debugger.get_nondebug_quantized_model()
    return _int8_weights_for_float_matmuls(content, nodes)


def _int8_weights_for_float_matmuls(content, nodes):
    """Store the weights of the float32 FULLY_CONNECTED operators among ``nodes`` in int8.

    The denylisted matmuls keep float32 activations, but their weights need not stay
    float32: ai-edge-quantizer's dynamic-range config gives them int8 per-channel
    weights, as in mode "dynamic".
    """
    from ai_edge_quantizer import qtyping, quantizer

    matmuls = set(flatbuffer.operator_outputs(content, "FULLY_CONNECTED", "FLOAT32"))
    names = [name for name in nodes if name in matmuls]
    if not names:
        return content
    weights = quantizer.Quantizer(bytearray(content))
    for name in names:
        weights.add_dynamic_config(_operator_scope(name),
                                   qtyping.TFLOperationName.FULLY_CONNECTED, 8,
                                   qtyping.QuantGranularity.CHANNELWISE)
    try:
        result = weights.quantize(enable_progress_report=False, enable_progress_bar=False)
    except Exception as error:  # The float32-weight model is still valid, only larger.
        warnings.warn(f"int8 weights for the {len(names)} float32 matmuls failed ({error}); "
                      "they keep float32 weights.", stacklevel=3)
        return content
    return bytes(result.quantized_model)


def _debugger_errors(debugger, top):
    debugger.run()
    rows = [(name, float(np.sqrt(stats["mean_squared_error"])), "rmse vs float")
            for name, stats in debugger.layer_statistics.items()]
    return sorted(rows, key=lambda row: -row[1])[:top]


def _int16x8_errors(int16, content, examples, top):
    """Return the per-tensor noise-to-signal ratios of the int16x8 model, largest first,
    from ai-edge-quantizer's validation of ``int16`` on a few examples."""
    from ai_edge_quantizer.utils import validation_utils

    comparison = int16.validate({_signature_key(content): examples[:4]},
                                error_metrics=[validation_utils.ValidationErrorMetric.SNR],
                                num_threads=1)
    computed = set(flatbuffer.operator_outputs(content))
    rows = []
    for name, metrics in comparison.get_all_tensor_results().items():
        snr = float(next(iter(metrics.values())))
        # Only operator outputs: constants and integer inputs have no useful ratio.
        if name in computed and snr > 0.0:
            rows.append((name, 1.0 / snr, "noise / signal power"))
    return sorted(rows, key=lambda row: -row[1])[:top]


def _tensor_errors(reference_content, content, example, top):
    """Compare same-named float intermediate tensors of two models on one example."""
    from ai_edge_litert.interpreter import Interpreter

    values = []
    for model_content in (reference_content, content):
        interpreter = Interpreter(model_content=model_content,
                                  experimental_preserve_all_tensors=True)
        interpreter.get_signature_runner()(**example)
        tensors = {}
        for detail in interpreter.get_tensor_details():
            if detail["dtype"] != np.float32:
                continue
            try:
                tensors[detail["name"]] = interpreter.get_tensor(detail["index"])
            except ValueError:
                continue
        values.append(tensors)
    rows = []
    for name, expected in values[0].items():
        actual = values[1].get(name)
        if actual is None or actual.shape != expected.shape or not expected.size:
            continue
        scale = float(np.max(np.abs(expected))) or 1.0
        rows.append((name, float(np.max(np.abs(actual - expected))) / scale,
                     "max abs error / max |float32 value|"))
    return sorted(rows, key=lambda row: -row[1])[:top]


def _failure_message(mode, failed, verification, layers):
    lines = [f"the {mode} TFLite model differs from the Keras model beyond tolerance on "
             f"{verification.examples} examples: {'; '.join(failed)}. Nothing was written."]
    for name, stats in verification.per_output.items():
        lines.append(f"  output {name}: max abs diff {stats['max_abs_diff']:.3g}, "
                     f"cosine {stats['cosine']:.6f}")
    if layers:
        lines.append(f"Layers with the largest error ({layers[0][2]}):")
        lines.extend(f"  {name}: {error:.4g}" for name, error, _ in layers)
    lines.append("Use a milder mode, more representative calibration data, or pass a "
                 "looser tolerance if this error is acceptable.")
    return "\n".join(lines)
