"""A run directory's checkpoints: finding the latest intact one, writing new
ones without losing old ones.

A run resumes from the newest `ckpt-N` in its directory that reads back in
full (every tensor, checksums included), whether or not the `checkpoint` index
names it; when that is not the one the index names, the index is rewritten and
a warning says what was recovered. Damaged checkpoints newer than it are moved
into `set_aside/` so that no later save overwrites them. A directory whose
checkpoints are all damaged is a CheckpointError naming it.

A save that fails (disk full, read-only file system) leaves the previous
checkpoints and the index as they were, removes what the failed save wrote,
and is a CheckpointError.
"""

import glob
import logging as std_logging
import os
import re
import shutil
import tempfile
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from mtssl.configs import base

SET_ASIDE = 'set_aside'


class CheckpointError(base.ConfigError):
  """A run directory or checkpoint that cannot be used; one line says why."""


def first_line(error) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


class _RestoreWarnings(std_logging.Filter):
  """Drops TensorFlow's warnings about the values a restore left unmatched."""

  MESSAGES = ('being deleted with unrestored values',
              'Value in checkpoint could not be found',
              'An attribute in the restored object could not be found')

  def filter(self, record):
    message = record.getMessage()
    return not any(m in message for m in self.MESSAGES)


_RESTORE_WARNINGS = _RestoreWarnings()


def hide_restore_warnings():
  """For a restore mismatch the caller reports in one line: hides the
  per-value warnings TensorFlow logs for it (hundreds of lines), whenever its
  bookkeeping is collected, often at exit."""
  logger = tf.get_logger()
  if _RESTORE_WARNINGS not in logger.filters:
    logger.addFilter(_RESTORE_WARNINGS)


def check_model_dir(model_dir: str) -> None:
  """Creates `model_dir`; CheckpointError when it cannot hold a run."""
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise CheckpointError(f'model_dir {model_dir!r} is a file, not a '
                          f'directory.')
  try:
    os.makedirs(model_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=model_dir, prefix='.write_test-'):
      pass
  except OSError as e:
    raise CheckpointError(f'model_dir {model_dir!r} cannot be written: '
                          f'{e.strerror or first_line(e)}.') from None


def numbered(directory: str, name: str = 'ckpt') -> List[Tuple[int, str]]:
  """(N, prefix) of every `<name>-N` with an index file, by N."""
  out = []
  pattern = re.compile(re.escape(name) + r'-(\d+)\.index$')
  for path in glob.glob(os.path.join(glob.escape(directory), f'{name}-*.index')):
    match = pattern.match(os.path.basename(path))
    if match:
      out.append((int(match.group(1)), path[:-len('.index')]))
  return sorted(out)


def damage(prefix: str) -> Optional[str]:
  """None when every tensor of checkpoint `prefix` reads back, else why not."""
  try:
    reader = tf.train.load_checkpoint(prefix)
    for key in reader.get_variable_to_shape_map():
      reader.get_tensor(key)
  except Exception as e:  # pylint: disable=broad-except
    # The reader raises OpErrors, but IndexError on a short data file.
    return first_line(e)
  return None


def _index_state(directory: str):
  """(CheckpointState or None, problem or None) of the directory's index."""
  index = os.path.join(directory, 'checkpoint')
  if not os.path.exists(index):
    return None, 'no checkpoint index'
  state = tf.train.get_checkpoint_state(directory)
  if state is None or not state.model_checkpoint_path:
    return None, f'its index {index} cannot be parsed'
  return state, None


def set_aside(directory: str, prefix: str, why: str) -> str:
  """Moves the files of checkpoint `prefix` into `<directory>/set_aside/`."""
  target = os.path.join(directory, SET_ASIDE)
  os.makedirs(target, exist_ok=True)
  base_name = os.path.basename(prefix)
  dest = os.path.join(target, base_name)
  k = 1
  while glob.glob(glob.escape(dest) + '.*'):
    dest = os.path.join(target, f'{base_name}.{k}')
    k += 1
  for path in glob.glob(glob.escape(prefix) + '.*'):
    os.replace(path, dest + path[len(prefix):])
  logging.warning('Moved checkpoint %s (%s) to %s.', prefix, why, dest)
  return dest


def resolve_latest(directory: str, name: str = 'ckpt',
                   verify: bool = True) -> Optional[str]:
  """The prefix to resume from: the newest intact checkpoint, or None.

  Rewrites the index when it is missing, unparsable or names another
  checkpoint; moves damaged checkpoints newer than the chosen one aside.
  Without `verify` every checkpoint with an index file counts as intact.
  """
  found = numbered(directory, name)
  state, problem = _index_state(directory)
  if not found and state is None:
    return None
  named = state.model_checkpoint_path if state else None
  if named and not os.path.isabs(named):
    named = os.path.join(directory, named)
  candidates = dict(found)
  number = re.search(r'-(\d+)$', named or '')
  if named and number and os.path.exists(named + '.index'):
    candidates.setdefault(int(number.group(1)), named)
  damaged = []
  chosen = None
  for n in sorted(candidates, reverse=True):
    why = damage(candidates[n]) if verify else None
    if why is None:
      chosen = n
      break
    damaged.append((n, candidates[n], why))
  if chosen is None and not verify:
    return None
  if chosen is None:
    listing = ', '.join(os.path.basename(p) for _, p, _ in damaged) or (
        f'none (the index names {named!r})')
    detail = f' ({damaged[0][2]})' if damaged else ''
    raise CheckpointError(
        f'model_dir {directory!r} holds no readable checkpoint: checkpoints '
        f'{listing}{detail}. Move them away or use another model_dir.')
  prefix = candidates[chosen]
  for _, path, why in damaged:
    set_aside(directory, path, why)
  if named != prefix or problem:
    reason = problem or (f'the index names {named}, which is damaged ('
                         f'{damaged[0][2]})' if damaged else
                         f'the index names {named}, not the newest')
    intact = [p for n, p in found if n <= chosen and p != prefix]
    tf.compat.v1.train.update_checkpoint_state(
        directory, prefix, all_model_checkpoint_paths=intact + [prefix])
    logging.warning('%s: %s; resuming from %s, the newest intact checkpoint '
                    'found by scanning the directory (index rewritten).',
                    directory, reason, prefix)
  return prefix


def saved_tasks(prefix: str) -> List[str]:
  """The tasks whose run counters checkpoint `prefix` holds."""
  keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  pattern = re.compile(r'^state/task_steps/([^/]+)/')
  return sorted({m.group(1) for k in keys if (m := pattern.match(k))})


def saved_value(prefix: str, key: str):
  """The value of `key` in checkpoint `prefix`, or None when absent."""
  reader = tf.train.load_checkpoint(prefix)
  if not reader.has_tensor(key):
    return None
  return reader.get_tensor(key)


@tf.function(autograph=False)
def _finite_flags(variables):
  return tf.stack([tf.reduce_all(tf.math.is_finite(v)) for v in variables])


def _remote(variable) -> bool:
  return tf.DeviceSpec.from_string(variable.device).job not in (None,
                                                                 'localhost')


def non_finite(variables: Sequence[tf.Variable]) -> List[str]:
  """Names of the floating-point variables holding a NaN or an infinity.

  Local variables are checked one by one (cheaper than tracing a function
  for a check that runs at each save); variables on other processes
  (parameter servers) by one traced function: one remote call per check,
  not one per variable.
  """
  floating = [v for v in variables if v.dtype.is_floating]
  if any(_remote(v) for v in floating):
    flags = _finite_flags(floating).numpy()
  else:
    flags = [bool(tf.reduce_all(tf.math.is_finite(v)).numpy())
             for v in floating]
  return [v.name for v, ok in zip(floating, flags) if not ok]


def _remove_partial(prefix: str):
  for path in glob.glob(glob.escape(prefix) + '_temp*'):
    shutil.rmtree(path, ignore_errors=True)
  for path in glob.glob(glob.escape(prefix) + '.*'):
    try:
      os.remove(path)
    except OSError:
      pass


def save(manager: tf.train.CheckpointManager, number: int) -> str:
  """`manager.save(number)`; an existing `<name>-number` is moved aside first.

  On a failed write the partial files are removed and CheckpointError says
  which checkpoint is still the latest.
  """
  directory = manager.directory
  name = os.path.basename(manager._checkpoint_prefix)  # pylint: disable=protected-access
  prefix = os.path.join(directory, f'{name}-{number}')
  if os.path.exists(prefix + '.index'):
    set_aside(directory, prefix, 'a new checkpoint of this number is due')
  try:
    return manager.save(checkpoint_number=number)
  except (tf.errors.OpError, OSError) as e:
    _remove_partial(prefix)
    latest = tf.train.latest_checkpoint(directory)
    kept = (f'the latest checkpoint is still {latest}' if latest
            else 'no checkpoint was written')
    raise CheckpointError(f'Could not write checkpoint {prefix}: '
                          f'{first_line(e)}; {kept}.') from None

