"""A training run's parts, built once for every trainer: tasks, data sources,
model, per-task optimizers and steps, run state and checkpoints.

`Run(config)` is composed by the single-machine trainer (trainer.py) and the
cluster coordinator (cluster/coordinator.py); each owns its own loop.
"""

import math
import os
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
from absl import logging

from mtssl import tasks as tasks_lib
from mtssl.backbones import slim_checkpoint
from mtssl.configs import training as configs
from mtssl.data import service
from mtssl.data import sources as sources_lib
from mtssl.training import checkpoints as checkpoints_lib
from mtssl.training import core
from mtssl.training import step as step_lib


class NonFiniteLossError(RuntimeError):
  """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class RunState(tf.Module):
  """Counters saved with every checkpoint."""

  def __init__(self, task_names, seed):
    super().__init__(name='run_state')
    self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.seed = tf.Variable(seed, dtype=tf.int64, trainable=False)
    self.snapshots = tf.Variable(0, dtype=tf.int64, trainable=False)
    self.task_steps = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                       for n in task_names}
    self.skipped_steps = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                          for n in task_names}
    self.positions = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                      for n in task_names}
    # Sum and count of measured step times (first, compiling step excluded).
    self.time_sum = {n: tf.Variable(0.0, dtype=tf.float64, trainable=False)
                     for n in task_names}
    self.time_count = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                       for n in task_names}


def task_schedule(names, schedule, weights, seed, step):
  """The task of global step `step`: round-robin, or drawn from (seed, step)."""
  if schedule == 'round_robin':
    return names[step % len(names)]
  p = np.asarray(weights, np.float64)
  rng = np.random.default_rng([seed & 0xFFFFFFFF, step, 0x5C4ED])
  return names[int(rng.choice(len(names), p=p / p.sum()))]


def task_seed(seed, name):
  """The data seed of task `name`: a distinct stream per task, fixed by the run seed."""
  return (seed * 1_000_003 + sum(map(ord, name))) & 0x7FFFFFFF


def make_tasks(config: configs.TrainConfig):
  """The configured tasks, {name: Task}; a task that cannot be built (e.g.
  an unreadable colour prior) is a ConfigError naming it."""
  tasks = {}
  for name, run in config.tasks.items():
    try:
      tasks[name] = tasks_lib.get_task_class(name)(run.config)
    except (ValueError, OSError) as e:
      raise configs.ConfigError(f'{name}: {checkpoints_lib.first_line(e)}'
                                ) from None
  return tasks


def make_sources(config: configs.TrainConfig, tasks):
  """A validated data source per task; DataSourceError names the flag."""
  srcs = {}
  for name, task in tasks.items():
    spec = config.tasks[name].data
    try:
      source = task.make_source(spec, tfds_data_dir=config.tfds_data_dir)
      source.max_consecutive_skips = config.max_consecutive_skips
      if hasattr(source, 'max_image_pixels'):  # Image sources (not ms's).
        source.max_image_pixels = config.max_image_pixels
      source.validate()
    except sources_lib.DataSourceError as e:
      raise sources_lib.DataSourceError(f'{name}_data={spec!r}: {e}') from None
    srcs[name] = source
  return srcs


def format_duration(seconds):
  """'1h02m', '3m05s', '7s' or '?'."""
  if seconds is None or not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


class Run:
  """The parts of one training run, built in order by a trainer:

    run.prepare()                          # tasks, sources, model_dir
    with core.precision_policy(...):       # (and a strategy scope)
      resumed = run.create_model_and_state()
      run.model.build_all(example_features)
      run.restore_or_initialize(resumed)
      run.make_steps(resumed)
  """

  def __init__(self, config: configs.TrainConfig):
    config.validate()
    self.config = config
    self.names = list(config.tasks)
    self.model = None
    self.resumed_from = None

  def prepare(self):
    """Everything before the model: determinism, tasks, data sources (and
    the data services that will run them)."""
    cfg = self.config
    if cfg.deterministic:
      tf.config.experimental.enable_op_determinism()
    if (cfg.native_atrous and not cfg.xla and
        not tf.config.list_physical_devices('GPU')):
      raise configs.ConfigError(
          'native_atrous needs --xla on a machine without a GPU: '
          'TensorFlow\'s CPU kernels have no gradient for dilated Conv2D ops.')
    self.tasks = make_tasks(cfg)
    checkpoints_lib.check_model_dir(cfg.model_dir)
    self.sources = make_sources(cfg, self.tasks)
    for name in self.tasks:
      address = cfg.data_service_for(name)
      if address:
        service.check_servable(name, self.sources[name])
        service.check_reachable(address)

  def precision_policy(self):
    return core.precision_policy(self.config.mixed_precision)

  def task_seed(self, name):
    return task_seed(self.config.seed, name)

  def create_model_and_state(self, extra_checkpoint_items=None):
    """Model, optimizers, run state, checkpoint and managers; starts a restore.

    Variables are created in the current (distribution strategy) scope.
    `extra_checkpoint_items` are saved with every checkpoint and restored
    leniently (what a checkpoint lacks keeps its initial value). Returns the
    checkpoint the run resumes from (the newest intact one in model_dir;
    its counters are restored now), or None.
    """
    cfg = self.config
    self.model = core.build_model(
        cfg.trunk, cfg.output_stride, self.tasks,
        native_atrous=cfg.native_atrous,
        lasso_l1=cfg.lasso_l1 if cfg.lasso else None, seed=cfg.seed)
    self.optimizers = {
        n: core.task_optimizer(n, cfg.tasks[n].learning_rate,
                               cfg.mixed_precision, decay=cfg.rmsprop_decay,
                               momentum=cfg.rmsprop_momentum,
                               epsilon=cfg.rmsprop_epsilon)
        for n in self.names}
    self.state = RunState(self.names, cfg.seed)
    items = dict(optimizers=self.optimizers, state=self.state,
                 **self.model.checkpoint_items)
    extra = dict(extra_checkpoint_items or {})
    self.checkpoint = tf.train.Checkpoint(**items, **extra)
    self.resumed_from = checkpoints_lib.resolve_latest(cfg.model_dir)
    checkpoints_lib.resolve_latest(os.path.join(cfg.model_dir, 'snapshots'),
                                   'snapshot', verify=False)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, cfg.model_dir, max_to_keep=cfg.keep_checkpoints,
        checkpoint_name='ckpt')
    self.snapshot_manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(cfg.model_dir, 'snapshots'),
        max_to_keep=None, checkpoint_name='snapshot')
    self.saved_at = None
    self._items = items
    self._restore_status = None
    if not self.resumed_from:
      return None
    self._check_saved_tasks(self.resumed_from)
    # The counters now (the input streams start at their positions); the
    # model and optimizers once built, by restore_or_initialize.
    tf.train.Checkpoint(state=self.state).restore(
        self.resumed_from).expect_partial()
    if extra:
      tf.train.Checkpoint(**extra).restore(self.resumed_from).expect_partial()
    if int(self.state.seed.numpy()) != cfg.seed:
      raise configs.ConfigError(
          f'{cfg.model_dir} holds a run with seed '
          f'{int(self.state.seed.numpy())}, not {cfg.seed}; use another '
          f'model_dir or the same seed to resume.')
    self.saved_at = int(self.state.global_step.numpy())
    return self.resumed_from

  def _check_saved_tasks(self, prefix):
    saved = checkpoints_lib.saved_tasks(prefix)
    if saved and sorted(saved) != sorted(self.names):
      raise checkpoints_lib.CheckpointError(
          f'{self.config.model_dir} holds a run of tasks {",".join(saved)}, '
          f'not {",".join(self.names)}: resume with --tasks={",".join(saved)}, '
          f'or start a new model_dir with --init_checkpoint={prefix} (trunk '
          f'and the heads it has).')

  def _assert_restored(self):
    """Restores the built model (first call) and checks that the checkpoint
    matched it, or raises a CheckpointError naming the run."""
    try:
      if self._restore_status is None:
        self._restore_status = tf.train.Checkpoint(**self._items).restore(
            self.resumed_from)
      self._restore_status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
      checkpoints_lib.hide_restore_warnings()
      raise checkpoints_lib.CheckpointError(
          f'{self.resumed_from} does not fit this model (trunk '
          f'{self.config.trunk}, output stride {self.config.output_stride}, '
          f'these task settings): {checkpoints_lib.first_line(e)}. Resume with '
          f'the flags the run was started with, or use another model_dir.'
      ) from None

  def restore_or_initialize(self, resumed_from):
    """After the model is built: restores it from `resumed_from` (what
    create_model_and_state returned), or applies init_checkpoint."""
    if resumed_from is not None:
      self._assert_restored()
    elif self.config.init_checkpoint:
      self._initialize_from(self.config.init_checkpoint)

  def make_steps(self, resumed_from):
    """One compiled TaskTrainStep per task (restoring their optimizer slots
    when `resumed_from`)."""
    self.steps = {n: step_lib.TaskTrainStep(self.model, n, self.optimizers[n],
                                            jit_compile=self.config.xla)
                  for n in self.names}
    if resumed_from is not None:
      # Optimizer slots created just now were restored on creation.
      self._assert_restored()
      self._restore_status.expect_partial()
      self._apply_learning_rates()

  def _apply_learning_rates(self):
    """The configured learning rates replace the restored ones (logged when
    they differ)."""
    for name in self.names:
      optimizer = core.inner_optimizer(self.optimizers[name])
      saved = optimizer.learning_rate.numpy()
      wanted = self.config.tasks[name].learning_rate
      if saved != saved.dtype.type(wanted):
        optimizer.learning_rate.assign(wanted)
        logging.warning('%s: learning rate %g (configured) replaces %g saved '
                        'in %s.', name, wanted, saved, self.resumed_from)

  def _initialize_from(self, path):
    if not (tf.io.gfile.exists(path) or tf.io.gfile.exists(path + '.index')):
      raise checkpoints_lib.CheckpointError(
          f'init_checkpoint {path!r} does not exist (give a checkpoint prefix '
          f'or a directory of checkpoints).')
    restored = ['backbone']
    try:
      slim_checkpoint.restore_trunk(self.model.trunk, path)
      prefix = (tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path)
                else path)
      keys = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
      for name in self.names:
        if any(k.startswith(f'heads/{name}/') for k in keys):
          tf.train.Checkpoint(heads={name: self.model.heads[name]}).read(
              prefix).expect_partial()
          restored.append(f'heads/{name}')
        else:
          # A task may start its head from another task's (ti from rp's units).
          done = self.tasks[name].initialize_head(self.model.heads[name],
                                                  prefix)
          if done:
            restored.append(done)
    except (ValueError, tf.errors.OpError) as e:
      checkpoints_lib.hide_restore_warnings()
      raise checkpoints_lib.CheckpointError(
          f'init_checkpoint {path!r}: {checkpoints_lib.first_line(e)}'
      ) from None
    logging.info('Initialized %s from %s.', ', '.join(restored), path)

  def step_cost(self, name, time_sum: float, time_count: int) -> Optional[float]:
    """Device-hours per step of task `name`: the configured or paper figure,
    else the measured mean (None until measured)."""
    cfg = self.config
    if cfg.tasks[name].step_cost is not None or cfg.cost_model == 'paper':
      return cfg.step_cost_from_paper(name)
    if time_count == 0:
      return None
    return time_sum / time_count / 3600.0

  def save(self, bad_streak: bool = False):
    """Writes checkpoint ckpt-<global step>; returns its prefix, or None when
    it is skipped: during a streak of non-finite steps (`bad_streak`), when a
    variable holds a non-finite value, or when this step is already saved."""
    g = int(self.state.global_step.numpy())
    if g == self.saved_at:
      return self.manager.latest_checkpoint
    if bad_streak:
      logging.warning('Step %d: checkpoint skipped during a streak of '
                      'non-finite steps; the latest is %s.', g,
                      self.manager.latest_checkpoint)
      return None
    bad = checkpoints_lib.non_finite(self.checkpoint_variables())
    if bad:
      logging.warning('Step %d: checkpoint skipped: %d variable(s) hold '
                      'non-finite values (%s); the latest is %s.', g, len(bad),
                      bad[0], self.manager.latest_checkpoint)
      return None
    path = checkpoints_lib.save(self.manager, g)
    self.saved_at = g
    logging.info('Saved checkpoint %s', path)
    return path

  def checkpoint_variables(self):
    """The model's and the optimizers' variables (what a checkpoint holds)."""
    out = list(self.model.variables)
    for optimizer in self.optimizers.values():
      out.extend(optimizer.variables())
    return out

  def maybe_snapshot(self, total_cost):
    """Keeps one snapshot when the total cost has crossed a multiple of
    snapshot_cost since the last one (at most one per call)."""
    every = self.config.snapshot_cost
    if not every:
      return
    due = int(total_cost // every)
    done = int(self.state.snapshots.numpy())
    if due <= done:
      return
    bad = checkpoints_lib.non_finite(self.checkpoint_variables())
    if bad:
      logging.warning('Snapshot %d skipped: %d variable(s) hold non-finite '
                      'values (%s).', due, len(bad), bad[0])
      return
    self.state.snapshots.assign(due)
    path = checkpoints_lib.save(self.snapshot_manager, due)
    if due - done > 1:
      logging.warning('Cost %.4g device-hours crossed %d multiples of '
                      'snapshot_cost %.4g at once (a step costs more than '
                      'snapshot_cost): one snapshot %s.', total_cost,
                      due - done, every, path)
    else:
      logging.info('Cost %.4g device-hours crossed %d x %.4g: snapshot %s',
                   total_cost, due, every, path)

  def summary_writer(self):
    return tf.summary.create_file_writer(
        os.path.join(self.config.model_dir, 'train'))

  def problems(self) -> Dict[str, Dict[str, int]]:
    """Data problems counted so far, per task."""
    return {n: self.sources[n].counter.problems() for n in self.names}
