"""Compatibility shims for third-party code on TensorFlow 2.20.

`tf_slim` 1.1.0 imports `tf_keras.legacy_tf_layers`, which tf_keras 2.20 only
ships as `tf_keras.src.legacy_tf_layers`. Aliasing the two modules is enough
for `tf_slim.nets.resnet_v2` to build in graph mode. tf_slim is used only as
the numerical reference in tests and is never needed to train or convert.
"""

import importlib
import sys


def import_tf_slim():
  """Imports and returns `tf_slim`, aliasing the tf_keras modules it expects."""
  for public, private in (
      ('tf_keras.legacy_tf_layers', 'tf_keras.src.legacy_tf_layers'),
      ('tf_keras.legacy_tf_layers.normalization',
       'tf_keras.src.legacy_tf_layers.normalization'),
  ):
    if public not in sys.modules:
      sys.modules[public] = importlib.import_module(private)
  return importlib.import_module('tf_slim')
