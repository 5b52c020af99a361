"""Where an evaluation gets its pre-trained trunk from (`TrunkProvider`).

`CheckpointTrunkProvider` builds the named trunk and fills it from an object
checkpoint, a TF-Slim checkpoint, an exported SavedModel, or nothing (random
init); a mismatched or non-finite checkpoint is a `TrunkLoadError`.
Choices: BUILD.md, "Trunk loading".
"""

import abc
import dataclasses
import json
import os
import re
from typing import Dict, Optional

import numpy as np
import tensorflow as tf

from mtssl.backbones import resnet_v2 as resnet_lib
from mtssl.backbones import slim_checkpoint
from mtssl.deploy import saved_model


class TrunkLoadError(ValueError):
  """The trunk cannot be built or its weights do not fit; says why."""


@dataclasses.dataclass
class TrunkSpec:
  name: str = 'resnet_v2_101'
  output_stride: Optional[int] = 8
  init_checkpoint: Optional[str] = None
  seed: int = 0


def saved_model_variables(path: str, trunk_name: Optional[str] = None):
  """The trunk checkpoint inside an exported SavedModel, or None if not one.

  `python -m mtssl.export` (mtssl.deploy.saved_model) saves the trunk under
  the `backbone` key, so the SavedModel's `variables/variables` is a trunk
  checkpoint like a converted or trainer one. Its `assets.extra/mtssl_export.json` names the trunk; a
  different --trunk is refused.
  """
  if not (tf.io.gfile.isdir(path) and tf.saved_model.contains_saved_model(path)):
    return None
  metadata_path = os.path.join(path, saved_model.ASSETS_EXTRA,
                               saved_model.METADATA_FILE)
  if trunk_name and tf.io.gfile.exists(metadata_path):
    with tf.io.gfile.GFile(metadata_path) as f:
      exported = json.load(f).get('trunk')
    if exported and exported != trunk_name:
      raise TrunkLoadError(
          f'SavedModel {path!r} holds trunk {exported}, not {trunk_name}; pass '
          f'--trunk={exported}.')
  return os.path.join(path, 'variables', 'variables')


def checkpoint_exists(path: str) -> bool:
  if saved_model_variables(path) is not None:
    return True
  if tf.io.gfile.isdir(path):
    return tf.train.latest_checkpoint(path) is not None
  return tf.io.gfile.exists(path + '.index') or tf.io.gfile.exists(path)


def validate_trunk_spec(spec: TrunkSpec) -> None:
  """Checks the trunk name, output stride and checkpoint path up front."""
  try:
    resnet_lib.check_trunk(spec.name, spec.output_stride)
  except ValueError as e:
    if spec.name not in resnet_lib.TRUNK_BLOCKS:
      raise TrunkLoadError(str(e)) from None
    raise TrunkLoadError(f'Trunk {spec.name}: {e}') from None
  if spec.init_checkpoint and not checkpoint_exists(spec.init_checkpoint):
    raise TrunkLoadError(
        f'Checkpoint {spec.init_checkpoint!r} does not exist (expected a '
        f'checkpoint prefix with a .index file, or a directory holding one).')


class TrunkProvider(abc.ABC):
  """Builds a trunk with its weights."""

  def __init__(self, spec: TrunkSpec):
    self.spec = spec

  @abc.abstractmethod
  def build(self) -> resnet_lib.ResNetV2:
    """The trunk, built (variables exist) and initialised."""

  def describe(self) -> Dict[str, object]:
    return {'trunk': self.spec.name, 'output_stride': self.spec.output_stride,
            'init_checkpoint': self.spec.init_checkpoint or None}


_UNIT_KEY = re.compile(r'^' + slim_checkpoint.CONVERTED_PREFIX +
                       r'/units/(\d+)/')


def _checkpoint_kind(path: str):
  """('object', number of trunk units) or ('slim', None); else raises."""
  if tf.io.gfile.isdir(path):
    path = tf.train.latest_checkpoint(path) or path
  try:
    names = [n for n, _ in tf.train.list_variables(path)]
  except (tf.errors.OpError, ValueError) as e:
    raise TrunkLoadError(f'Cannot read checkpoint {path!r}: '
                         f'{str(e).splitlines()[0]}') from None
  if any(n.startswith(slim_checkpoint.CONVERTED_PREFIX + '/') for n in names):
    units = {int(m.group(1)) for m in map(_UNIT_KEY.match, names) if m}
    return 'object', len(units)
  if any('/bottleneck_v2/' in n for n in names):
    return 'slim', None
  raise TrunkLoadError(
      f'Checkpoint {path!r} holds neither a `backbone` trunk (converted or '
      f'trainer checkpoint) nor TF-Slim ResNet-v2 variables; it has e.g. '
      f'{names[:3]}.')


def refuse_nonfinite(checkpoint: str, weights) -> None:
  """Raises TrunkLoadError if any of the (name, array) `weights` holds NaN or
  Inf, with their count."""
  total = size = 0
  first = None
  for name, value in weights:
    bad = int(np.sum(~np.isfinite(value)))
    if bad and first is None:
      first = name
    total += bad
    size += int(np.size(value))
  if total:
    raise TrunkLoadError(
        f'--init_checkpoint {checkpoint!r}: {total} of the trunk\'s {size} '
        f'weight values are not finite (NaN or Inf, first in {first}): a '
        f'diverged run, which cannot be evaluated.')


def _slim_trunk_weights(path: str, trunk: resnet_lib.ResNetV2):
  """The Slim checkpoint's tensors of the trunk's variables (any scope)."""
  reader = tf.train.load_checkpoint(path)
  wanted = {n.split('/', 1)[1] for n in trunk.slim_variables()}
  for name in sorted(reader.get_variable_to_shape_map()):
    if name.split('/', 1)[-1] in wanted:
      yield name, reader.get_tensor(name)


class CheckpointTrunkProvider(TrunkProvider):
  """A trunk from a checkpoint (object or Slim), or randomly initialised."""

  def build(self):
    spec = self.spec
    validate_trunk_spec(spec)
    tf.random.set_seed(spec.seed)
    trunk = resnet_lib.trunk_from_name(spec.name, spec.output_stride)
    trunk.build_for_input()
    if not spec.init_checkpoint:
      return trunk
    self._restore(trunk)
    refuse_nonfinite(spec.init_checkpoint,
                     ((v.name, v.numpy()) for v in trunk.variables))
    return trunk

  def _restore(self, trunk):
    spec = self.spec
    saved = saved_model_variables(spec.init_checkpoint, spec.name)
    if saved is not None:
      # The SavedModel's variables are keyed by their first object path, not
      # `backbone/...`; restore through the object graph, which checks that
      # every trunk variable is matched.
      try:
        slim_checkpoint.restore_trunk(trunk, saved)
      except slim_checkpoint.SlimCheckpointError as e:
        raise TrunkLoadError(f'--init_checkpoint: {e}') from None
      return
    path = spec.init_checkpoint
    kind, num_units = _checkpoint_kind(path)
    # A deeper trunk's checkpoint holds every variable a shallower one of the
    # same widths needs (resnet_v2_101 -> resnet_v2_50): count the units.
    if kind == 'object' and num_units != len(trunk.units):
      raise TrunkLoadError(
          f'--init_checkpoint {spec.init_checkpoint!r} holds a trunk of '
          f'{num_units} bottleneck units, but trunk {spec.name} has '
          f'{len(trunk.units)}; it is another architecture.')
    try:
      if kind == 'object':
        slim_checkpoint.restore_trunk(trunk, path)
      else:
        # Counted here: the loader stops at the first non-finite variable.
        refuse_nonfinite(path, _slim_trunk_weights(path, trunk))
        slim_checkpoint.load_slim_checkpoint(trunk, path)
    except slim_checkpoint.SlimCheckpointError as e:
      raise TrunkLoadError(f'--init_checkpoint: {e}') from None


def make_trunk_provider(spec: TrunkSpec) -> TrunkProvider:
  """The provider for a specification: a checkpoint (converted, trainer or
  Slim), an exported SavedModel directory, or none (random init)."""
  return CheckpointTrunkProvider(spec)


def describe_checkpoint(path: Optional[str]) -> str:
  """A short row label for a checkpoint path (its directory and prefix)."""
  if not path:
    return 'Random init'
  path = os.path.normpath(path)
  return os.path.join(os.path.basename(os.path.dirname(path)),
                      os.path.basename(path))
