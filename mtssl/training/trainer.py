"""Joint multi-task pre-training on one machine (paper section 4).

One shared trunk, one head per task, one active head per step; tasks take
turns by a seeded schedule (round-robin, or weighted). `Trainer(config)`
composes a `run.Run` (model, optimizers, state, checkpoints) and owns the loop:
schedule, input, step, counters, logs, summaries, checkpoints and snapshots.
"""

import collections
import contextlib
import time
from typing import Dict, Optional

import tensorflow as tf
from absl import logging

from mtssl.configs import training as configs
from mtssl.data import prefetch
from mtssl.training import monitoring
from mtssl.data import problems
from mtssl.data import service
from mtssl.data import sources as sources_lib
from mtssl.training import run as run_lib

NonFiniteLossError = run_lib.NonFiniteLossError
task_schedule = run_lib.task_schedule
task_seed = run_lib.task_seed


class Trainer:
  """Builds everything from a TrainConfig, then `train()`."""

  def __init__(self, config: configs.TrainConfig):
    self.run = run_lib.Run(config)
    self.config = self.run.config
    self.names = self.run.names
    self._stop_requested = False
    self.iterators = {}
    self._pending = {}

  @property
  def model(self):
    return self.run.model

  @property
  def optimizers(self):
    return self.run.optimizers

  @property
  def steps(self):
    return self.run.steps

  @property
  def state(self):
    return self.run.state

  @property
  def tasks(self):
    return self.run.tasks

  @property
  def sources(self):
    return self.run.sources

  def setup(self):
    """Validates data, builds the model, restores or initializes. Idempotent."""
    if self.run.model is not None:
      return self
    try:
      self._setup()
    except BaseException:
      self.close_inputs()  # Live input iterators can hang the exit.
      raise
    return self

  def _setup(self):
    cfg, run = self.config, self.run
    run.prepare()
    self.config_changes = monitoring.save_config(cfg)
    addresses = {n: cfg.data_service_for(n) for n in run.tasks}
    with run.precision_policy():
      restore_status = run.create_model_and_state()
      first = {}
      for name, task in run.tasks.items():
        ds = task.make_dataset(run.sources[name],
                               cfg.tasks[name].config.batch_size,
                               seed=run.task_seed(name),
                               start=int(run.state.positions[name].numpy()))
        if addresses[name]:
          ds = service.distribute(
              ds, addresses[name], service.job_name(
                  name, run.task_seed(name),
                  int(run.state.positions[name].numpy())),
              cfg.data_service_mode)
        ds = ds.prefetch(tf.data.AUTOTUNE)
        if cfg.prefetch_to_device:
          ds = prefetch.to_device(ds)
        self.iterators[name] = iter(ds)
        with (service.waiting_notice(name, addresses[name])
              if addresses[name] else contextlib.nullcontext()):
          first[name] = self._take(name)
      run.model.build_all({n: f for n, (f, _) in first.items()})
      self._pending = dict(first)
      run.restore_or_initialize(restore_status)
      run.make_steps(restore_status)
    self.writer = run.summary_writer()

  # Training ---------------------------------------------------------------
  def request_stop(self):
    """Ends training after the current step, with a checkpoint (e.g. SIGTERM)."""
    self._stop_requested = True

  def step_cost(self, name) -> Optional[float]:
    """Device-hours per step of task `name` (None until measured)."""
    return self.run.step_cost(name, float(self.state.time_sum[name].numpy()),
                              int(self.state.time_count[name].numpy()))

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

  def _take(self, name):
    try:
      batch = next(self.iterators[name])
    except tf.errors.OpError as e:
      sources_lib.raise_if_stalled(e, self.sources[name].counter)
      address = self.config.data_service_for(name)
      if address:
        service.raise_if_job_lost(e, name, address)
      raise
    problems.take_counts(batch[0], self.sources[name].counter)
    return batch

  def _next_batch(self, name):
    if name in self._pending:
      return self._pending.pop(name)
    return self._take(name)

  def save(self, bad_streak=False):
    return self.run.save(bad_streak)

  def train(self):
    """Runs until `steps` or `max_cost`; returns a summary dict."""
    self.setup()
    try:
      return self._train()
    finally:
      self.close_inputs()

  def _train(self):
    profiler = monitoring.StepProfiler(self.config.profile_steps,
                                       self.config.model_dir)
    try:
      return self._train_loop(profiler)
    finally:
      profiler.stop()

  def _train_loop(self, profiler):
    cfg = self.config
    weights = [cfg.tasks[n].weight for n in self.names]
    consecutive_bad = collections.Counter()
    window = {n: collections.defaultdict(float) for n in self.names}
    start_time = time.time()
    start_step = int(self.state.global_step.numpy())
    checkpoint_path = self.run.resumed_from
    saved_at = start_step if self.run.resumed_from else None
    images = monitoring.ImageSchedule(self.names, cfg.image_summary_every,
                                      start_step)
    if self.run.resumed_from:
      logging.info('Resuming from %s at global step %d.', self.run.resumed_from,
                   start_step)
    while not self._done(sum(self.costs().values())):
      if self._stop_requested:
        logging.info('Stop requested: saving and ending.')
        break
      g = int(self.state.global_step.numpy())
      name = task_schedule(self.names, cfg.schedule, weights, cfg.seed, g)
      profiler.before_step(g + 1)
      t0 = time.perf_counter()
      features, labels = self._next_batch(name)
      t1 = time.perf_counter()
      out = self.steps[name](features, labels)
      finite = bool(out['finite'])
      t2 = time.perf_counter()
      # The highest position trained on (+1): under the data service's
      # dynamic sharding batches arrive out of order.
      self.state.positions[name].assign(max(
          int(self.state.positions[name].numpy()),
          int(tf.reduce_max(features['index']).numpy()) + 1))
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
          latest = self.run.manager.latest_checkpoint
          raise NonFiniteLossError(
              f'{name}: {consecutive_bad[name]} consecutive non-finite steps '
              f'(max_nonfinite_steps={cfg.max_nonfinite_steps}); stopping. '
              + (f'The latest checkpoint, {latest}, was written before the '
                 f'streak and holds only finite values.' if latest else
                 'No checkpoint was written.'))
      g += 1
      profiler.after_step(g)
      costs = self.costs()
      total_cost = sum(costs.values())
      self.run.maybe_snapshot(total_cost)
      if g % cfg.summary_every == 0:
        self._write_scalars(window, costs, g)
      if finite and images.due(name, g):
        self._write_images(name, features, labels, out['outputs'], g)
        images.written(name, g)
      if g % cfg.log_every == 0:
        self._log_progress(window, costs, g, start_step, start_time,
                           time.time())
        for n in self.names:
          window[n].clear()
      if g % cfg.checkpoint_every == 0:
        checkpoint_path = self.save(any(consecutive_bad.values())
                                    ) or checkpoint_path
        saved_at = g
    profiler.stop()
    g = int(self.state.global_step.numpy())
    if saved_at != g:
      checkpoint_path = self.save(any(consecutive_bad.values())
                                  ) or checkpoint_path
    self.writer.flush()
    result = {
        'checkpoint': checkpoint_path,
        'global_step': g,
        'task_steps': {n: int(self.state.task_steps[n].numpy()) for n in self.names},
        'skipped_steps': {n: int(self.state.skipped_steps[n].numpy())
                          for n in self.names},
        'cost_hours': self.costs(),
        'data_problems': self.run.problems(),
        'stopped_early': self._stop_requested,
    }
    logging.info('Done: %s', result)
    return result

  def close_inputs(self):
    """Releases the input iterators (an iterator alive at interpreter
    shutdown can hang the process at exit)."""
    self.iterators = {}
    self._pending = {}

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
          tf.summary.scalar(prefix + 'input_wait_fraction',
                            w['input_s'] / (w['step_s'] + w['input_s']))
        tf.summary.scalar(prefix + 'steps', int(self.state.task_steps[name].numpy()))
        tf.summary.scalar(prefix + 'skipped_steps',
                          int(self.state.skipped_steps[name].numpy()))
        tf.summary.scalar(prefix + 'cost_hours', costs[name])
        for key, value in self.steps[name].metric_results().items():
          if key != 'loss':  # the window's mean loss above
            tf.summary.scalar(prefix + key, value)
        for reason, count in self.sources[name].counter.problems().items():
          tf.summary.scalar(f'{prefix}data/{reason}', count)
      tf.summary.scalar('total/cost_hours', sum(costs.values()))

  def _write_images(self, name, features, labels, outputs, g):
    features, labels = self.tasks[name].device_inputs(features, labels)
    images = self.tasks[name].image_summaries(features, labels, outputs)
    with self.writer.as_default(step=g):
      for key, value in images.items():
        tf.summary.image(monitoring.summary_tag(name, key), value,
                         max_outputs=4)

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
      busy = w['step_s'] + w['input_s']
      speed = w['examples'] / busy if w['step_s'] else 0.0
      wait = f'input {100 * w["input_s"] / busy:.0f}%' if busy else 'input -'
      parts.append(f'{name} {int(self.state.task_steps[name].numpy())} st '
                   f'{loss} {metric_text} {speed:.1f} ex/s {wait}'
                   .replace('  ', ' '))
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
                 ' | '.join(parts), rate, total_cost, run_lib.format_duration(eta),
                 f' | data {problems}' if problems else '')
