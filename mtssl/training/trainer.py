"""Joint multi-task pre-training on one machine (paper section 4, SPEC 5).

One shared trunk, one head per task, one active head per step. Tasks take
turns by a seeded schedule: round-robin by default, or weighted, where the
task of global step g is drawn from (seed, g) alone, so the order survives a
restart. The total objective is the sum of the task losses, reached by
alternating steps. Each task has its own TF1-exact RMSProp whose slots cover
the trunk and that task's head (and alpha).

Checkpoints (tf.train.CheckpointManager, `<model_dir>/ckpt-N`) hold the
trunk (`backbone`, so it restores alone), the heads, the lasso alphas, every
task's optimizer state, and the run state: global step, per-task step counts,
per-task stream positions (where each task's data resumes), per-task measured
step times, the cost counters and the seed. Every random choice in the input
pipelines and the schedule is a stateless function of (seed, position) or
(seed, step), so this state is the whole RNG state: an interrupted run that
resumes reproduces the uninterrupted one (bit-for-bit on CPU; with
`deterministic=True` TensorFlow's op determinism guarantees it on any
device). The seed also fixes the initial weights. TensorFlow writes checkpoint data under temporary names
and updates the `checkpoint` index file last, so a killed run leaves the
previous checkpoint intact.

Compute accounting follows the paper (configs.py): cost per task = steps x a
constant step cost; a snapshot (`<model_dir>/snapshots/snapshot-N`, never
deleted) is written each time the total crosses a multiple of snapshot_cost.

A non-finite loss or gradient skips the step (nothing is applied); after
`max_nonfinite_steps` consecutive non-finite steps of one task the run stops
with NonFiniteLossError, keeping the last good checkpoint.
"""

import collections
import contextlib
import dataclasses
import math
import os
import time
from typing import Dict, Optional

import numpy as np
import tensorflow as tf
import tf_keras
from absl import logging

from mtssl import configs
from mtssl import model as model_lib
from mtssl import optimizers
from mtssl import tasks as tasks_lib
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import prefetch
from mtssl.data import sources as sources_lib
from mtssl.training import step as step_lib

POLICIES = {'none': 'float32', 'bf16': 'mixed_bfloat16', 'fp16': 'mixed_float16'}


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
  """The configured tasks ({name: Task}), rp harmonized when asked."""
  tasks = {}
  for name, run in config.tasks.items():
    task_config = run.config
    if name == 'rp' and config.harmonize:
      if not hasattr(task_config, 'harmonize'):
        raise configs.ConfigError('the rp task has no harmonize setting.')
      task_config = dataclasses.replace(task_config, harmonize=True)
    tasks[name] = tasks_lib.get_task_class(name)(task_config)
  return tasks


def make_sources(config: configs.TrainConfig, tasks):
  """A validated data source per task; DataSourceError names the flag."""
  srcs = {}
  for name, task in tasks.items():
    spec = config.tasks[name].data
    try:
      source = task.make_source(spec, tfds_data_dir=config.tfds_data_dir)
      source.validate()
    except sources_lib.DataSourceError as e:
      raise sources_lib.DataSourceError(f'{name}_data={spec!r}: {e}') from None
    srcs[name] = source
  return srcs


def _format_duration(seconds):
  if seconds is None or not math.isfinite(seconds):
    return '?'
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  if seconds >= 60:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds}s'


class Trainer:
  """Builds everything from a TrainConfig, then `train()`."""

  def __init__(self, config: configs.TrainConfig):
    config.validate()
    self.config = config
    self.names = list(config.tasks)
    self._stop_requested = False
    self.model = None

  # Set-up -----------------------------------------------------------------
  def _make_tasks(self):
    return make_tasks(self.config)

  def _make_sources(self):
    return make_sources(self.config, self.tasks)

  def _make_optimizer(self, name):
    run = self.config.tasks[name]
    opt = optimizers.TF1RMSProp(
        run.learning_rate, decay=self.config.rmsprop_decay,
        momentum=self.config.rmsprop_momentum,
        epsilon=self.config.rmsprop_epsilon, name=f'RMSProp_{name}')
    if self.config.mixed_precision == 'fp16':
      opt = tf_keras.mixed_precision.LossScaleOptimizer(opt)
    return opt

  @contextlib.contextmanager
  def _precision_policy(self):
    """The configured mixed-precision policy while the model is built."""
    previous_policy = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(
        POLICIES[self.config.mixed_precision])
    try:
      yield
    finally:
      tf_keras.mixed_precision.set_global_policy(previous_policy)

  def _prepare(self):
    """Everything before the model: determinism, tasks, data sources."""
    if self.config.deterministic:
      tf.config.experimental.enable_op_determinism()
    if (self.config.native_atrous and not self.config.xla and
        not tf.config.list_physical_devices('GPU')):
      raise configs.ConfigError(
          'native_atrous needs --xla on a machine without a GPU: '
          'TensorFlow\'s CPU kernels have no gradient for dilated Conv2D ops.')
    self.tasks = self._make_tasks()
    self.sources = self._make_sources()
    os.makedirs(self.config.model_dir, exist_ok=True)

  def _create_model_and_state(self, extra_checkpoint_items=None):
    """Model, optimizers, run state, checkpoint and managers; starts a restore.

    Variables are created in the current (distribution strategy) scope.
    `extra_checkpoint_items` are saved with every checkpoint and restored
    leniently (what a checkpoint lacks keeps its initial value). Returns the
    restore status of the latest checkpoint in model_dir, or None.
    """
    cfg = self.config
    # The seed fixes the initial weights too (Python, NumPy and TF global
    # seeds), so two runs with one seed start from the same model.
    tf_keras.utils.set_random_seed(cfg.seed)
    trunk = resnet_v2.trunk_from_name(cfg.trunk, cfg.output_stride,
                                      native_atrous=cfg.native_atrous)
    self.model = model_lib.MultiTaskModel(
        trunk, self.tasks, lasso_l1=cfg.lasso_l1 if cfg.lasso else None)
    self.optimizers = {n: self._make_optimizer(n) for n in self.names}
    self.state = RunState(self.names, cfg.seed)
    items = dict(optimizers=self.optimizers, state=self.state,
                 **self.model.checkpoint_items)
    extra = dict(extra_checkpoint_items or {})
    self.checkpoint = tf.train.Checkpoint(**items, **extra)
    self.manager = tf.train.CheckpointManager(
        self.checkpoint, cfg.model_dir, max_to_keep=cfg.keep_checkpoints,
        checkpoint_name='ckpt')
    self.snapshot_manager = tf.train.CheckpointManager(
        self.checkpoint, os.path.join(cfg.model_dir, 'snapshots'),
        max_to_keep=None, checkpoint_name='snapshot')
    self.resumed_from = self.manager.latest_checkpoint
    if not self.resumed_from:
      return None
    restore_status = tf.train.Checkpoint(**items).restore(self.resumed_from)
    if extra:
      tf.train.Checkpoint(**extra).restore(self.resumed_from).expect_partial()
    if int(self.state.seed.numpy()) != cfg.seed:
      raise configs.ConfigError(
          f'{cfg.model_dir} holds a run with seed '
          f'{int(self.state.seed.numpy())}, not {cfg.seed}; use another '
          f'model_dir or the same seed to resume.')
    return restore_status

  def _restore_or_initialize(self, restore_status):
    """After the model is built: checks the restore, or applies init_checkpoint."""
    if restore_status is not None:
      restore_status.assert_existing_objects_matched()
    elif self.config.init_checkpoint:
      self._initialize_from(self.config.init_checkpoint)

  def _make_steps(self, restore_status):
    self.steps = {n: step_lib.TaskTrainStep(self.model, n, self.optimizers[n],
                                            jit_compile=self.config.xla)
                  for n in self.names}
    if restore_status is not None:
      # Optimizer slots created just now were restored on creation.
      restore_status.assert_existing_objects_matched()

  def setup(self):
    """Validates data, builds the model, restores or initializes. Idempotent."""
    if self.model is not None:
      return self
    cfg = self.config
    self._prepare()
    with self._precision_policy():
      restore_status = self._create_model_and_state()
      self.iterators = {}
      first = {}
      for name, task in self.tasks.items():
        ds = task.make_dataset(self.sources[name],
                               cfg.tasks[name].config.batch_size,
                               seed=self._task_seed(name),
                               start=int(self.state.positions[name].numpy()))
        ds = ds.prefetch(tf.data.AUTOTUNE)
        if cfg.prefetch_to_device:
          ds = prefetch.to_device(ds)
        self.iterators[name] = iter(ds)
        first[name] = next(self.iterators[name])
      self.model.build_all({n: f for n, (f, _) in first.items()})
      self._pending = dict(first)
      self._restore_or_initialize(restore_status)
      self._make_steps(restore_status)
    self.writer = tf.summary.create_file_writer(os.path.join(cfg.model_dir,
                                                             'train'))
    return self

  def _task_seed(self, name):
    return task_seed(self.config.seed, name)

  def _initialize_from(self, path):
    slim_checkpoint.restore_trunk(self.model.trunk, path)
    restored = ['backbone']
    reader = tf.train.load_checkpoint(
        tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path) else path)
    keys = reader.get_variable_to_shape_map()
    for name in self.names:
      if any(k.startswith(f'heads/{name}/') for k in keys):
        tf.train.Checkpoint(heads={name: self.model.heads[name]}).read(
            tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path) else path
        ).expect_partial()
        restored.append(f'heads/{name}')
      elif hasattr(self.tasks[name], 'initialize_head'):
        # A task may start its head from another task's (ti from rp's units).
        done = self.tasks[name].initialize_head(
            self.model.heads[name],
            tf.train.latest_checkpoint(path) if tf.io.gfile.isdir(path) else path)
        if done:
          restored.append(done)
    logging.info('Initialized %s from %s.', ', '.join(restored), path)

  # Training ---------------------------------------------------------------
  def request_stop(self):
    """Ends training after the current step, with a checkpoint (e.g. SIGTERM)."""
    self._stop_requested = True

  def step_cost(self, name) -> Optional[float]:
    """Device-hours per step of task `name` (None until measured)."""
    cfg = self.config
    if cfg.tasks[name].step_cost is not None or cfg.cost_model == 'paper':
      return cfg.step_cost_from_paper(name)
    count = int(self.state.time_count[name].numpy())
    if count == 0:
      return None
    return float(self.state.time_sum[name].numpy()) / count / 3600.0

  def costs(self) -> Dict[str, float]:
    out = {}
    for name in self.names:
      c = self.step_cost(name)
      out[name] = 0.0 if c is None else c * int(self.state.task_steps[name].numpy())
    return out

  def _done(self, total_cost):
    cfg = self.config
    if cfg.steps is not None and int(self.state.global_step.numpy()) >= cfg.steps:
      return True
    return cfg.max_cost is not None and total_cost >= cfg.max_cost

  def _next_batch(self, name):
    if name in self._pending:
      return self._pending.pop(name)
    return next(self.iterators[name])

  def save(self):
    path = self.manager.save(checkpoint_number=int(self.state.global_step.numpy()))
    logging.info('Saved checkpoint %s', path)
    return path

  def train(self):
    """Runs until `steps` or `max_cost`; returns a summary dict."""
    self.setup()
    try:
      return self._train()
    finally:
      self.close_inputs()

  def _train(self):
    cfg = self.config
    weights = [cfg.tasks[n].weight for n in self.names]
    consecutive_bad = collections.Counter()
    window = {n: collections.defaultdict(float) for n in self.names}
    start_time = time.time()
    start_step = int(self.state.global_step.numpy())
    last_log_time = start_time
    checkpoint_path = self.resumed_from
    if self.resumed_from:
      logging.info('Resuming from %s at global step %d.', self.resumed_from,
                   start_step)
    while not self._done(sum(self.costs().values())):
      if self._stop_requested:
        logging.info('Stop requested: saving and ending.')
        break
      g = int(self.state.global_step.numpy())
      name = task_schedule(self.names, cfg.schedule, weights, cfg.seed, g)
      t0 = time.perf_counter()
      features, labels = self._next_batch(name)
      t1 = time.perf_counter()
      out = self.steps[name](features, labels)
      finite = bool(out['finite'])
      t2 = time.perf_counter()
      self.state.positions[name].assign(
          int(tf.reduce_max(features['index']).numpy()) + 1)
      self.state.global_step.assign_add(1)
      w = window[name]
      w['input_s'] += t1 - t0
      w['step_s'] += t2 - t1
      w['examples'] += int(self.tasks[name].examples_in(features))
      if finite:
        consecutive_bad[name] = 0
        steps_done = int(self.state.task_steps[name].assign_add(1).numpy())
        if steps_done > 1:  # the first step compiles
          self.state.time_sum[name].assign_add(t2 - t1)
          self.state.time_count[name].assign_add(1)
        w['loss'] += float(out['loss'])
        w['steps'] += 1
      else:
        self.state.skipped_steps[name].assign_add(1)
        consecutive_bad[name] += 1
        logging.warning('%s: non-finite loss or gradient at global step %d '
                        '(%d in a row); step not applied.', name, g,
                        consecutive_bad[name])
        if consecutive_bad[name] >= cfg.max_nonfinite_steps:
          raise NonFiniteLossError(
              f'{name}: {consecutive_bad[name]} consecutive non-finite steps '
              f'(max_nonfinite_steps={cfg.max_nonfinite_steps}); stopping. The '
              f'last good checkpoint is {self.manager.latest_checkpoint}.')
      g += 1
      costs = self.costs()
      total_cost = sum(costs.values())
      self._maybe_snapshot(total_cost)
      if g % cfg.summary_every == 0:
        self._write_scalars(window, costs, g)
      if g % cfg.image_summary_every == 0 and finite:
        self._write_images(name, features, labels, out['outputs'], g)
      if g % cfg.log_every == 0:
        now = time.time()
        self._log_progress(window, costs, g, start_step, start_time, now)
        last_log_time = now
        for n in self.names:
          window[n].clear()
      if g % cfg.checkpoint_every == 0:
        checkpoint_path = self.save()
    del last_log_time
    g = int(self.state.global_step.numpy())
    if g != start_step or checkpoint_path is None:
      checkpoint_path = self.save()
    self.writer.flush()
    result = {
        'checkpoint': checkpoint_path,
        'global_step': g,
        'task_steps': {n: int(self.state.task_steps[n].numpy()) for n in self.names},
        'skipped_steps': {n: int(self.state.skipped_steps[n].numpy())
                          for n in self.names},
        'cost_hours': self.costs(),
        'data_problems': {n: self.sources[n].counter.problems() for n in self.names},
        'stopped_early': self._stop_requested,
    }
    logging.info('Done: %s', result)
    return result

  def close_inputs(self):
    """Releases the input iterators.

    Pipelines that run Python (tf.numpy_function) must not outlive the
    interpreter's shutdown, where an iterator still alive can hang the
    process at exit.
    """
    self.iterators = {}
    self._pending = {}

  def _maybe_snapshot(self, total_cost):
    every = self.config.snapshot_cost
    if not every:
      return
    due = int(total_cost // every)
    while int(self.state.snapshots.numpy()) < due:
      self.state.snapshots.assign_add(1)
      path = self.snapshot_manager.save(
          checkpoint_number=int(self.state.snapshots.numpy()))
      logging.info('Cost %.4g device-hours crossed %d x %.4g: snapshot %s',
                   total_cost, int(self.state.snapshots.numpy()), every, path)

  def _write_scalars(self, window, costs, g):
    with self.writer.as_default(step=g):
      for name in self.names:
        w = window[name]
        prefix = f'{name}/'
        if w['steps']:
          tf.summary.scalar(prefix + 'loss', w['loss'] / w['steps'])
        if w['step_s']:
          tf.summary.scalar(prefix + 'examples_per_second',
                            w['examples'] / (w['step_s'] + w['input_s']))
        tf.summary.scalar(prefix + 'steps', int(self.state.task_steps[name].numpy()))
        tf.summary.scalar(prefix + 'cost_hours', costs[name])
        for key, value in self.steps[name].metric_results().items():
          tf.summary.scalar(prefix + key, value)
        for reason, count in self.sources[name].counter.problems().items():
          tf.summary.scalar(f'{prefix}data/{reason}', count)
      tf.summary.scalar('total/cost_hours', sum(costs.values()))

  def _write_images(self, name, features, labels, outputs, g):
    images = self.tasks[name].image_summaries(features, labels, outputs)
    with self.writer.as_default(step=g):
      for key, value in images.items():
        tf.summary.image(f'{name}/{key}', value, max_outputs=4)

  def _log_progress(self, window, costs, g, start_step, start_time, now):
    cfg = self.config
    rate = (g - start_step) / max(now - start_time, 1e-9)
    parts = []
    for name in self.names:
      w = window[name]
      metrics = self.steps[name].metric_results()
      # The window's mean loss; a task metric of the same name is not repeated.
      metrics.pop('loss', None)
      metric_text = ' '.join(f'{k} {v:.3g}' for k, v in metrics.items())
      loss = f'loss {w["loss"] / w["steps"]:.4g}' if w['steps'] else 'loss -'
      speed = (w['examples'] / (w['step_s'] + w['input_s'])
               if w['step_s'] else 0.0)
      parts.append(f'{name} {int(self.state.task_steps[name].numpy())} st '
                   f'{loss} {metric_text} {speed:.1f} ex/s'.replace('  ', ' '))
      self.steps[name].reset_metrics()
    total_cost = sum(costs.values())
    eta = None
    if cfg.steps is not None and rate > 0:
      eta = (cfg.steps - g) / rate
    elif cfg.max_cost and total_cost > 0:
      eta = (cfg.max_cost - total_cost) * (now - start_time) / total_cost
    target = f'{g}/{cfg.steps}' if cfg.steps is not None else f'{g}'
    problems = {n: p for n in self.names
                if (p := self.sources[n].counter.problems())}
    logging.info('[%s] %s | %.2f steps/s | cost %.4g h | eta %s%s', target,
                 ' | '.join(parts), rate, total_cost, _format_duration(eta),
                 f' | data {problems}' if problems else '')
