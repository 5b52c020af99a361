"""TF-Slim ResNet-v2 checkpoints into the Keras trunk; converted checkpoints.

Every trunk variable is looked up under its Slim name
(`ResNetV2.slim_variables()`); checkpoint variables the trunk does not use
are reported, and nothing is assigned unless every trunk variable is present
with the right shape. Converted checkpoints are
`tf.train.Checkpoint(backbone=trunk)`. Usage: README, "Importing a TF-Slim
checkpoint".
"""

import collections
import dataclasses
import os
import re
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from mtssl.utils import io_utils
from mtssl.backbones import resnet_v2 as resnet_lib

CONVERTED_PREFIX = 'backbone'
_UNIT_RE = re.compile(r'^(?P<scope>[^/]+)/(?P<block>block\d+)/unit_(?P<unit>\d+)/'
                      r'bottleneck_v2/')


class SlimCheckpointError(ValueError):
  """The checkpoint does not fit the trunk; the message says why."""


@dataclasses.dataclass
class ConversionReport:
  checkpoint: str
  checkpoint_scope: str
  trunk_scope: str
  loaded: List[str]
  unused: List[str]

  def unused_summary(self) -> Dict[str, int]:
    """Unused variables counted by their first two name components."""
    counts = collections.Counter('/'.join(n.split('/')[:2]) for n in self.unused)
    return dict(sorted(counts.items()))

  def to_json(self):
    return {
        'checkpoint': self.checkpoint,
        'checkpoint_scope': self.checkpoint_scope,
        'trunk_scope': self.trunk_scope,
        'num_loaded': len(self.loaded),
        'num_unused': len(self.unused),
        'unused_summary': self.unused_summary(),
        'unused': self.unused,
    }


def _units_per_block(names, scope) -> Dict[str, int]:
  units = collections.defaultdict(int)
  for name in names:
    m = _UNIT_RE.match(name)
    if m and m.group('scope') == scope:
      units[m.group('block')] = max(units[m.group('block')], int(m.group('unit')))
  return dict(sorted(units.items()))


def _describe_depth(units: Dict[str, int]) -> str:
  counts = tuple(units.get(f'block{i}', 0) for i in range(1, 5))
  for depth, known in resnet_lib._DEPTH_BLOCKS.items():  # pylint: disable=protected-access
    n = len(units)
    if n and counts[:n] == known[:n]:
      return f'resnet_v2_{depth} (units per block {counts[:n]})'
  return f'a ResNet-v2 with units per block {counts}'


def _detect_scope(names, trunk_scope) -> str:
  scopes = collections.Counter()
  for name in names:
    m = _UNIT_RE.match(name)
    if m:
      scopes[m.group('scope')] += 1
  if not scopes:
    raise SlimCheckpointError(
        'The checkpoint holds no ResNet-v2 bottleneck variables (names like '
        '<scope>/block1/unit_1/bottleneck_v2/...); is it a TF-Slim ResNet-v2 '
        'checkpoint?')
  if trunk_scope in scopes:
    return trunk_scope
  if len(scopes) > 1:
    raise SlimCheckpointError(
        f'The checkpoint holds several ResNet-v2 scopes {sorted(scopes)} and '
        f'none is {trunk_scope!r}; name the one to load.')
  return next(iter(scopes))


def read_slim_checkpoint(path: str):
  """Returns (reader, {name: shape}) or raises SlimCheckpointError."""
  try:
    reader = tf.train.load_checkpoint(path)
  except (tf.errors.OpError, ValueError) as e:
    raise SlimCheckpointError(f'Cannot read checkpoint {path!r}: '
                              f'{str(e).splitlines()[0]}') from None
  return reader, reader.get_variable_to_shape_map()


def load_slim_checkpoint(trunk: resnet_lib.ResNetV2, path: str,
                         checkpoint_scope: Optional[str] = None) -> ConversionReport:
  """Assigns the Slim checkpoint at `path` to `trunk` (built on demand).

  Args:
    trunk: the Keras trunk; its blocks decide which variables are needed.
    path: checkpoint prefix (or a directory with a `checkpoint` file).
    checkpoint_scope: Slim scope in the checkpoint; detected when None.

  Returns:
    A ConversionReport with the loaded and unused checkpoint variables.

  Raises:
    SlimCheckpointError: the checkpoint cannot be read, is of another depth,
      lacks a variable or has a variable of another shape. Nothing is assigned.
  """
  reader, shapes = read_slim_checkpoint(path)
  scope = checkpoint_scope or _detect_scope(shapes, trunk.scope)
  if not trunk.built:
    trunk.build_for_input()
  expected = {
      scope + name[len(trunk.scope):]: var
      for name, var in trunk.slim_variables().items()
  }

  have = _units_per_block(shapes, scope)
  want = {b.scope: b.num_units for b in trunk.block_specs}
  mismatched = {b: (have.get(b, 0), n) for b, n in want.items()
                if have.get(b, 0) not in (0, n)}
  if mismatched:
    detail = ', '.join(f'{b}: checkpoint {h} units, trunk {n}'
                       for b, (h, n) in mismatched.items())
    raise SlimCheckpointError(
        f'Checkpoint {path!r} holds {_describe_depth(have)} under scope '
        f'{scope!r}, but the trunk is {_describe_depth(want)} ({detail}).')
  absent_blocks = [b for b in want if b not in have]
  if absent_blocks:
    raise SlimCheckpointError(
        f'Checkpoint {path!r} holds no variables of {", ".join(absent_blocks)} '
        f'under scope {scope!r} (it has {", ".join(have) or "no blocks"}); build '
        f'the trunk with num_blocks={len(have)} to load it.')

  missing = sorted(n for n in expected if n not in shapes)
  if missing:
    shown = '\n  '.join(missing[:20])
    more = f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''
    raise SlimCheckpointError(
        f'Checkpoint {path!r} lacks {len(missing)} variable(s) the trunk '
        f'needs:\n  {shown}{more}')
  bad_shapes = []
  for name, var in expected.items():
    if tuple(shapes[name]) != tuple(var.shape):
      bad_shapes.append(f'{name}: checkpoint {tuple(shapes[name])}, '
                        f'trunk {tuple(var.shape)}')
  if bad_shapes:
    raise SlimCheckpointError(
        f'Checkpoint {path!r} has {len(bad_shapes)} variable(s) of the wrong '
        f'shape:\n  ' + '\n  '.join(bad_shapes[:20]))

  values = {}
  for name, var in expected.items():
    try:
      value = reader.get_tensor(name)
    except (tf.errors.OpError, IndexError) as e:  # Truncated or corrupt data.
      raise SlimCheckpointError(
          f'Checkpoint {path!r}: variable {name} cannot be read: '
          f'{str(e).splitlines()[0]}') from None
    if not np.all(np.isfinite(value)):
      raise SlimCheckpointError(f'Checkpoint {path!r}: variable {name} holds '
                                f'non-finite values.')
    values[name] = value
  for name, var in expected.items():
    var.assign(tf.cast(values[name], var.dtype))
  unused = sorted(n for n in shapes if n not in expected)
  return ConversionReport(checkpoint=path, checkpoint_scope=scope,
                          trunk_scope=trunk.scope, loaded=sorted(expected),
                          unused=unused)


def write_trunk_checkpoint(trunk: resnet_lib.ResNetV2, output_dir: str,
                           overwrite: bool = False, report=None) -> str:
  """Writes `tf.train.Checkpoint(backbone=trunk)` atomically into output_dir.

  Returns the checkpoint prefix (`<output_dir>/backbone-1`), which
  `tf.train.latest_checkpoint(output_dir)` also finds.
  """
  with io_utils.atomic_directory(output_dir, overwrite=overwrite) as tmp:
    ckpt = tf.train.Checkpoint(**{CONVERTED_PREFIX: trunk})
    manager = tf.train.CheckpointManager(ckpt, tmp, max_to_keep=1,
                                         checkpoint_name=CONVERTED_PREFIX)
    manager.save(checkpoint_number=1)
    if report is not None:
      io_utils.atomic_write_json(os.path.join(tmp, 'conversion_report.json'),
                                 report.to_json())
  # CheckpointManager records relative paths, so the renamed directory works.
  return os.path.join(output_dir, f'{CONVERTED_PREFIX}-1')


def convert_slim_checkpoint(slim_path: str, output_dir: str, depth: int = 101,
                            num_blocks: int = 3,
                            checkpoint_scope: Optional[str] = None,
                            overwrite: bool = False):
  """Slim checkpoint -> TF2 trunk checkpoint. Returns (prefix, report)."""
  if os.path.exists(output_dir) and not overwrite:
    raise FileExistsError(f'{output_dir} already exists; pass overwrite to '
                          f'replace it.')
  trunk = resnet_lib.resnet_v2(depth, num_blocks=num_blocks)
  report = load_slim_checkpoint(trunk, slim_path, checkpoint_scope)
  prefix = write_trunk_checkpoint(trunk, output_dir, overwrite=overwrite,
                                  report=report)
  return prefix, report


def restore_objects(path: str, objects, description: str,
                    error_class=SlimCheckpointError) -> str:
  """Restores `objects` ({checkpoint key: object}) from a checkpoint.

  `path` may be a checkpoint prefix or a directory (its latest checkpoint).
  Every variable of `objects` must be in the checkpoint, or `error_class` is
  raised naming `description` and the first mismatch; anything else in the
  checkpoint (other heads, optimizer state) is ignored. Returns the prefix.
  """
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise error_class(f'No checkpoint found in directory {path!r}.')
    path = latest
  status = None
  try:
    status = tf.train.Checkpoint(**objects).read(path)
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    if status is not None:
      status.expect_partial()  # The mismatch is reported here, once.
    raise error_class(
        f'Checkpoint {path!r} does not match {description}: '
        f'{str(e).splitlines()[0]}') from None
  status.expect_partial()
  return path


def restore_trunk(trunk: resnet_lib.ResNetV2, path: str):
  """Restores the trunk from a converted or trainer checkpoint (`backbone` key).

  `path` may be a checkpoint prefix or a directory. Every trunk variable must
  be restored; the trainer's extra objects (heads, optimizers) are ignored.
  """
  if not trunk.built:
    trunk.build_for_input()
  return restore_objects(path, {CONVERTED_PREFIX: trunk}, f'trunk {trunk.scope}')
