"""What a training run records besides checkpoints: its configuration, image
summaries on a per-task schedule, summary tags and a profile of chosen steps.

Typical use (inside a trainer's loop):

  monitoring.save_config(config)                 # <model_dir>/config.json
  images = monitoring.ImageSchedule(names, config.image_summary_every, step)
  profiler = monitoring.StepProfiler(config.profile_steps, config.model_dir)
  ...
  profiler.before_step(g + 1); <step>; profiler.after_step(g + 1)
  if images.due(name, g + 1): <write name's images>
"""

import dataclasses
import json
import os
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf
from absl import logging

from mtssl.utils import io_utils

CONFIG_FILE = 'config.json'


def config_dict(config) -> dict:
  """The configuration as JSON-ready nested dicts (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def flatten(tree, prefix='') -> Dict[str, object]:
  """{'tasks.rp.learning_rate': 0.001, ...}: one dotted key per leaf."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(flatten(value, f'{prefix}.{key}' if prefix else str(key)))
  return out


def config_differences(old: dict, new: dict):
  """['steps: 300 -> 600', ...] for every leaf that differs."""
  before, after = flatten(old), flatten(new)
  missing = '(absent)'
  return [f'{key}: {before.get(key, missing)} -> {after.get(key, missing)}'
          for key in sorted(set(before) | set(after))
          if before.get(key, missing) != after.get(key, missing)]


def save_config(config) -> Optional[list]:
  """Writes the resolved configuration to <model_dir>/config.json.

  When the directory already holds a configuration that differs, logs a
  warning listing the changed fields and returns them (None otherwise); the
  new configuration replaces the old one.
  """
  path = os.path.join(config.model_dir, CONFIG_FILE)
  new = config_dict(config)
  changes = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, ValueError) as e:
      logging.warning('%s is unreadable (%s); it is replaced.', path, e)
    else:
      changes = config_differences(old, new) or None
      if changes:
        logging.warning('%s holds a run configured differently; changed: %s',
                        config.model_dir, '; '.join(changes))
  io_utils.atomic_write_json(path, new)
  return changes


def summary_tag(task: str, key: str) -> str:
  """`<task>/<key>`; a key already under the task's name is kept as it is."""
  return key if key.startswith(f'{task}/') else f'{task}/{key}'


class ImageSchedule:
  """Each task's images at its first step past every `every` boundary.

  Global step g (counted after the step) lies in interval g // every; a task
  writes its images once per interval, at its first finite step there, so
  every task gets images whatever the order in which tasks take turns.
  """

  def __init__(self, names: Sequence[str], every: int, start_step: int):
    self.every = every
    self.last = {n: start_step // every for n in names}

  def due(self, name: str, g: int) -> bool:
    return g // self.every > self.last[name]

  def written(self, name: str, g: int):
    self.last[name] = g // self.every


class StepProfiler:
  """A TensorBoard profile of global steps first..last (1-based, inclusive),
  written under <logdir>/plugins/profile/."""

  def __init__(self, steps: Optional[Tuple[int, int]], logdir: str):
    self.first, self.last = steps if steps else (None, None)
    self.logdir = logdir
    self.active = False
    self.done = steps is None

  def before_step(self, g: int):
    """Call before the step that makes the global step `g`."""
    if self.done or self.active:
      return
    if g > self.last:
      self.done = True
      logging.warning('profile_steps=%d,%d: the run is already at step %d; '
                      'nothing is profiled.', self.first, self.last, g - 1)
    elif g >= self.first:
      try:
        tf.profiler.experimental.start(self.logdir)
      except (tf.errors.OpError, RuntimeError) as e:
        self.done = True
        logging.warning('profile_steps: the profiler did not start: %s', e)
        return
      self.active = True
      logging.info('Profiling global steps %d to %d.', g, self.last)

  def after_step(self, g: int):
    """Call after the step that made the global step `g`."""
    if self.active and g >= self.last:
      self.stop()

  def stop(self):
    if not self.active:
      return
    tf.profiler.experimental.stop()
    self.active = False
    self.done = True
    logging.info('Wrote the profile to %s',
                 os.path.join(self.logdir, 'plugins', 'profile'))
