"""Analytic multiply-accumulate counts of a model, read from its graph.

`count_macs(fn, *input_specs)` traces `fn` once and sums the MACs of every
convolution and matrix multiplication in the graph from their static shapes:
Conv2D: output positions x kernel height x kernel width x input channels x
output channels (dilation does not change the count; the padding positions of
TensorFlow's space-to-batch form of dilated convolutions are not counted); MatMul / BatchMatMul:
M x N x K (x batch). Element-wise work (batch norm, ReLU, additions, pooling)
is not counted, as in the usual MAC figures. A training step
is about 3x the forward count (forward, and two backward products).
"""

import collections
from typing import Dict

import numpy as np
import tensorflow as tf


def _static(shape):
  dims = shape.as_list() if hasattr(shape, 'as_list') else list(shape)
  if dims is None or any(d is None for d in dims):
    raise ValueError(f'count_macs needs static shapes, got {shape}.')
  return dims


def _atrous_output(conv_op):
  """The tensor whose positions a convolution really computes.

  TensorFlow runs a dilated convolution as SpaceToBatchND -> Conv2D ->
  BatchToSpaceND; on sizes not divisible by the rate the inner Conv2D also
  computes padding positions that BatchToSpaceND crops away. The useful
  positions are those of the BatchToSpaceND output.
  """
  if conv_op.inputs[0].op.type != 'SpaceToBatchND':
    return conv_op.outputs[0]
  for consumer in conv_op.outputs[0].consumers():
    if consumer.type == 'BatchToSpaceND':
      return consumer.outputs[0]
  return conv_op.outputs[0]


def graph_macs(graph) -> Dict[str, int]:
  """MACs per op type in a tf.Graph (FuncGraph), including nested functions."""
  counts = collections.Counter()
  functions = {f.name: f for f in graph._functions.values()}  # pylint: disable=protected-access
  for op in graph.get_operations():
    if op.type in ('Conv2D',):
      out = _static(_atrous_output(op).shape)
      kernel = _static(op.inputs[1].shape)
      counts['Conv2D'] += int(np.prod(out[:3])) * int(np.prod(kernel))
    elif op.type == 'MatMul':
      a = _static(op.inputs[0].shape)
      b = _static(op.inputs[1].shape)
      m = a[1] if op.get_attr('transpose_a') else a[0]
      k = a[0] if op.get_attr('transpose_a') else a[1]
      n = b[0] if op.get_attr('transpose_b') else b[1]
      counts['MatMul'] += m * n * k
    elif op.type in ('BatchMatMulV2', 'BatchMatMulV3', 'BatchMatMul'):
      a = _static(op.inputs[0].shape)
      out = _static(op.outputs[0].shape)
      counts['BatchMatMul'] += int(np.prod(out)) * (
          a[-2] if op.get_attr('adj_x') else a[-1])
    for attr in ('f', 'then_branch', 'else_branch', 'body'):
      try:
        name = op.get_attr(attr).name
      except (ValueError, AttributeError):
        continue
      if name in functions:
        counts.update(graph_macs(functions[name].graph))
  return dict(counts)


def count_macs(fn, *input_specs) -> int:
  """Forward MACs of `fn` traced on `input_specs` (tf.TensorSpec, static)."""
  concrete = tf.function(fn, autograph=False).get_concrete_function(*input_specs)
  return sum(graph_macs(concrete.graph).values())
