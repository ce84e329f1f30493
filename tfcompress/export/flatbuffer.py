"""Facts read from a .tflite flatbuffer: operators, stored weights, sizes.

The TFLite schema module shipped with ai-edge-litert parses the file. This module adds
two checks that tfcompress reports on. The first is that every operator is a builtin,
with no Flex or custom op that a stock LiteRT runtime lacks. The second is the fraction
of exact zeros in the stored constant weights, counted from the buffers, sparse-encoded
tensors included. It also rewrites embedding gathers as EMBEDDING_LOOKUP
(``gather_to_embedding_lookup``), the form ai-edge-quantizer's weight recipes cover.
"""

import dataclasses
import gzip
import logging

import numpy as np
from ai_edge_litert import schema_py_generated as schema

logger = logging.getLogger(__name__)

_BUILTIN_NAMES = {value: name for name, value in vars(schema.BuiltinOperator).items()
                  if not name.startswith("_")}

# numpy dtype of each stored tensor type; INT4 is packed two values a byte.
_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT32: np.int32,
    schema.TensorType.UINT8: np.uint8,
    schema.TensorType.INT64: np.int64,
    schema.TensorType.INT16: np.int16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.FLOAT64: np.float64,
}


class UnsupportedOpError(ValueError):
    """A converted model needs an operator outside the TFLite builtin set."""

    def __init__(self, ops, detail=""):
        self.ops = sorted(set(ops))
        message = (
            f"the model needs operators that are not TFLite builtins: {', '.join(self.ops)}. "
            "A stock LiteRT runtime cannot run them (Flex ops need the TensorFlow "
            "select-ops runtime). Replace the layer using them with builtin-friendly "
            "ops, or compute that step outside the model."
        )
        if detail:
            message += f" {detail}"
        super().__init__(message)


def read_model(content):
    """Return the schema ``Model`` of flatbuffer bytes."""
    return schema.Model.GetRootAs(content, 0)


def operator_names(content):
    """Return the operator names of a .tflite model, custom ops as ``custom:<code>``."""
    model = read_model(content)
    names = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 are only in builtin_code; older files only fill the deprecated one.
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            custom = code.CustomCode()
            names.append("custom:" + (custom.decode() if custom else "?"))
        else:
            names.append(_BUILTIN_NAMES.get(builtin, f"builtin_{builtin}"))
    return names


def _operators(content):
    """Yield ``(model, subgraph, operator, operator name)`` for every operator node."""
    model = read_model(content)
    codes = operator_names(content)
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for o in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(o)
            yield model, subgraph, op, codes[op.OpcodeIndex()]


def _first_input_type(subgraph, op):
    return subgraph.Tensors(op.Inputs(0)).Type() if op.InputsLength() else None


def _output_names(subgraph, op):
    return [subgraph.Tensors(i).Name().decode() for i in op.OutputsAsNumpy().tolist()]


def used_operator_names(content):
    """Return the operator name of every operator node; unused operator codes are left out."""
    return [name for _, _, _, name in _operators(content)]


def operators_with_unblocked_weights(content, block):
    """Return the first output name of each operator with a constant input of rank >= 2
    whose last axis is not a multiple of ``block``."""
    names = []
    for model, subgraph, op, _ in _operators(content):
        for index in op.InputsAsNumpy().tolist() if op.InputsLength() else []:
            if index < 0:
                continue
            tensor = subgraph.Tensors(index)
            shape = tensor.ShapeAsNumpy() if tensor.ShapeLength() else []
            constant = _buffer_bytes(model, tensor.Buffer(), content) is not None
            if constant and len(shape) >= 2 and shape[-1] % block:
                names.append(_output_names(subgraph, op)[0])
                break
    return names


def float_edge_operator_outputs(content):
    """Return the output names of the main graph's operators that produce a graph output
    or read a float32 graph input."""
    model = read_model(content)
    subgraph = model.Subgraphs(0)
    outputs = set(subgraph.OutputsAsNumpy().tolist())
    float_inputs = {i for i in subgraph.InputsAsNumpy().tolist()
                    if subgraph.Tensors(i).Type() == schema.TensorType.FLOAT32}
    names = []
    for o in range(subgraph.OperatorsLength()):
        op = subgraph.Operators(o)
        if (outputs.intersection(op.OutputsAsNumpy().tolist())
                or float_inputs.intersection(op.InputsAsNumpy().tolist())):
            names.extend(_output_names(subgraph, op))
    return names


def check_builtin_ops(content):
    """Raise ``UnsupportedOpError`` naming every Flex or custom operator of a model."""
    custom = [name.split(":", 1)[1] for name in operator_names(content)
              if name.startswith("custom:")]
    if custom:
        raise UnsupportedOpError(custom)


def operators_with_input_type(content, operator, tensor_type):
    """Count the ``operator`` nodes (a BuiltinOperator name) whose first input has ``tensor_type``."""
    return sum(1 for _, subgraph, op, name in _operators(content)
               if name == operator and _first_input_type(subgraph, op)
               == getattr(schema.TensorType, tensor_type))


def operator_outputs(content, operator=None, input_type=None):
    """Return the output tensor names of the operators, in graph order.

    Args:
      content: flatbuffer bytes.
      operator: a BuiltinOperator name such as "FULLY_CONNECTED"; None for every one.
      input_type: a TensorType name such as "FLOAT32" that the first input must have;
        None for any.
    """
    names = []
    for _, subgraph, op, name in _operators(content):
        if operator is not None and name != operator:
            continue
        if input_type is not None and (_first_input_type(subgraph, op)
                                       != getattr(schema.TensorType, input_type)):
            continue
        names.extend(_output_names(subgraph, op))
    return names


def _buffer_bytes(model, index, content):
    buffer = model.Buffers(index)
    if buffer is None:
        return None
    # Models over 2 GB keep buffers after the flatbuffer; offset 0 or 1 means inline.
    if buffer.Offset() > 1:
        return np.frombuffer(content, np.uint8, count=buffer.Size(), offset=buffer.Offset())
    if buffer.DataLength() == 0:
        return None
    return buffer.DataAsNumpy()


def _nonzero_count(raw, tensor_type, zero_point):
    if tensor_type == schema.TensorType.INT4:
        low = (raw & 0x0F).astype(np.int8)
        high = (raw >> 4).astype(np.int8)
        values = np.stack([np.where(low > 7, low - 16, low), np.where(high > 7, high - 16, high)])
        return int(np.count_nonzero(values != zero_point))
    values = raw.view(_NUMPY_TYPES[tensor_type])
    return int(np.count_nonzero(values != zero_point))


@dataclasses.dataclass(frozen=True)
class WeightStats:
    """Counts over the stored constant tensors of rank >= 2 of a model."""

    elements: int
    zeros: int
    tensors: int
    sparse_tensors: int

    @property
    def sparsity(self):
        return self.zeros / self.elements if self.elements else 0.0


def weight_stats(content):
    """Count the exact zeros of the constant weight tensors (rank >= 2) of a model.

    A quantized value counts as zero when it equals the tensor's zero point. A
    sparse-encoded tensor stores only some blocks; the elements it does not store are
    zeros. Buffers shared by several tensors are counted once.
    """
    model = read_model(content)
    seen = set()
    elements = zeros = tensors = sparse_tensors = 0
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for t in range(subgraph.TensorsLength()):
            tensor = subgraph.Tensors(t)
            index = tensor.Buffer()
            if index == 0 or index in seen or tensor.ShapeLength() < 2:
                continue
            tensor_type = tensor.Type()
            if tensor_type not in _NUMPY_TYPES and tensor_type != schema.TensorType.INT4:
                continue
            raw = _buffer_bytes(model, index, content)
            if raw is None:
                continue
            seen.add(index)
            zero_point = 0
            quantization = tensor.Quantization()
            if quantization is not None and quantization.ZeroPointLength() > 0:
                points = quantization.ZeroPointAsNumpy()
                if np.all(points == points[0]):
                    zero_point = int(points[0])
            total = int(np.prod(tensor.ShapeAsNumpy()))
            nonzero = _nonzero_count(raw, tensor_type, zero_point)
            if tensor_type == schema.TensorType.INT4 and total % 2:
                # The pad nibble of an odd count is stored as 0.
                nonzero = min(nonzero, total)
            elements += total
            zeros += total - nonzero
            tensors += 1
            sparse_tensors += tensor.Sparsity() is not None
    return WeightStats(elements, zeros, tensors, sparse_tensors)


def gzip_size(content):
    """Return the size in bytes of ``content`` gzip-compressed at level 6 (the gzip command's default)."""
    return len(gzip.compress(bytes(content), compresslevel=6, mtime=0))


def gather_to_embedding_lookup(content):
    """Rewrite every GATHER of rows of a constant float32 table as EMBEDDING_LOOKUP.

    EMBEDDING_LOOKUP takes 1-D int32 ids, so each rewritten GATHER becomes RESHAPE
    (ids to 1-D), EMBEDDING_LOOKUP, RESHAPE (rows back to the GATHER's output shape).
    The outputs are identical. Only gathers along axis 0 with static int32 ids are
    rewritten; the others are kept. Returns the new flatbuffer bytes, or ``content``
    itself when nothing matched.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    rewritten = 0
    for subgraph in model.subgraphs:
        operators = []
        for op in subgraph.operators:
            if _is_table_gather(model, subgraph, op):
                operators.extend(_embedding_lookup(model, subgraph, op))
                rewritten += 1
            else:
                operators.append(op)
        subgraph.operators = operators
    if not rewritten:
        return content
    logger.info("rewrote %d GATHER operators on constant tables as EMBEDDING_LOOKUP",
                rewritten)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _builtin_code(code):
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _is_table_gather(model, subgraph, op):
    if _builtin_code(model.operatorCodes[op.opcodeIndex]) != schema.BuiltinOperator.GATHER:
        return False
    options = op.builtinOptions
    if options is not None and (options.axis != 0 or options.batchDims != 0):
        return False
    table, ids, output = (subgraph.tensors[i] for i in (op.inputs[0], op.inputs[1],
                                                        op.outputs[0]))
    buffer = model.buffers[table.buffer]
    constant = buffer.data is not None or buffer.offset > 1
    static = all(t.shapeSignature is None or np.all(np.asarray(t.shapeSignature) >= 0)
                 for t in (ids, output))
    unquantized = table.quantization is None or table.quantization.scale is None
    return (constant and static and unquantized and len(table.shape) == 2
            and table.type == schema.TensorType.FLOAT32
            and ids.type == schema.TensorType.INT32)


def _embedding_lookup(model, subgraph, gather):
    """Return the RESHAPE, EMBEDDING_LOOKUP, RESHAPE operators replacing ``gather``."""
    table, ids, output = (int(gather.inputs[0]), int(gather.inputs[1]),
                          int(gather.outputs[0]))
    name = subgraph.tensors[output].name.decode().rstrip(";")
    count = int(np.prod(subgraph.tensors[ids].shape))
    width = int(subgraph.tensors[table].shape[1])
    flat_ids = _add_tensor(model, subgraph, f"{name}/ids", [count], schema.TensorType.INT32)
    rows = _add_tensor(model, subgraph, f"{name}/rows", [count, width],
                       subgraph.tensors[output].type)
    lookup = _operator(model, schema.BuiltinOperator.EMBEDDING_LOOKUP, [flat_ids, table],
                       [rows])
    return [_reshape(model, subgraph, ids, flat_ids), lookup,
            _reshape(model, subgraph, rows, output)]


def _reshape(model, subgraph, source, target):
    shape = [int(d) for d in subgraph.tensors[target].shape]
    shape_tensor = _add_tensor(model, subgraph,
                               subgraph.tensors[target].name.decode() + "/shape",
                               [len(shape)], schema.TensorType.INT32,
                               np.array(shape, np.int32))
    op = _operator(model, schema.BuiltinOperator.RESHAPE, [source, shape_tensor], [target])
    op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    op.builtinOptions = schema.ReshapeOptionsT()
    op.builtinOptions.newShape = shape
    return op


def _add_tensor(model, subgraph, name, shape, tensor_type, data=None):
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(data.tobytes(), np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.array(shape, np.int32)
    tensor.type = tensor_type
    tensor.buffer = len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _operator(model, builtin, inputs, outputs):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, builtin)
    op.inputs = np.array(inputs, np.int32)
    op.outputs = np.array(outputs, np.int32)
    return op


def _opcode_index(model, builtin):
    for index, code in enumerate(model.operatorCodes):
        if _builtin_code(code) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin,
                                     schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1
