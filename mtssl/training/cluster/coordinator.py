"""The coordinator of a parameter-server run: one worker group per task
(synchronous inside a group, asynchronous across groups), each task's rounds
applied by its own optimizer on the parameter servers."""

import collections
import contextlib
import functools
import os
import time
from typing import Dict, Optional

import tensorflow as tf
from absl import logging
# tf.data's sleep transformation (the in-graph poll interval).
from tensorflow.python.data.experimental.ops import testing as tf_data_testing  # pylint: disable=g-direct-tensorflow-import

from mtssl.configs import training as configs
from mtssl.training import checkpoints as checkpoints_lib
from mtssl.training import monitoring
from mtssl.training import run as run_lib
from mtssl.training.cluster import plan as plan_lib
from mtssl.training.cluster import rounds as rounds_lib
from mtssl.training.cluster.rounds import CONTRIBUTED, IDLE, NONFINITE
from mtssl.training.cluster.closures import Closures
from mtssl.training.cluster import worker as cluster_worker
from mtssl.training.cluster.plan import RESULT_FILE, cluster_dict
from mtssl.utils import io_utils

POLL_SECONDS = rounds_lib.POLL_SECONDS

class DistributedState(tf.Module):
  """Distributed-only counters saved with every checkpoint."""

  def __init__(self, plan: plan_lib.ClusterPlan):
    super().__init__(name='distributed_state')
    # Next stream position of every rank, and applied worker steps per task.
    self.positions = {n: {str(r): tf.Variable(0, dtype=tf.int64,
                                              trainable=False)
                          for r in range(k)}
                      for n, k in plan.task_workers.items()}
    self.worker_steps = {n: tf.Variable(0, dtype=tf.int64, trainable=False)
                         for n in plan.task_workers}


def _sleep_dataset(dataset, seconds):
  return dataset.apply(tf_data_testing.sleep(int(round(seconds * 1e6))))


class DistributedTrainer:
  """Trains a TrainConfig on a PSS cluster, one worker group per task."""

  def __init__(self, config: configs.TrainConfig, plan: plan_lib.ClusterPlan, resolver):
    self.run = run_lib.Run(config)
    self.config = self.run.config
    self.names = self.run.names
    self._stop_requested = False
    self.iterators = {}
    if list(plan.task_workers) != self.names:
      raise configs.ConfigError(
          f'--task_workers lists {",".join(plan.task_workers)}, --tasks '
          f'{",".join(self.names)}: they must name the same tasks.')
    self.plan = plan
    self.resolver = resolver
    plan.validate_cluster(cluster_dict(resolver))
    self.strategy = None
    if config.xla:
      logging.warning('--xla is not used on a cluster: the work function '
                      'reads its input iterators and is not compiled.')
    if config.native_atrous:
      logging.warning('--native_atrous on a cluster needs GPU workers: the '
                      'work function is not XLA-compiled, and TensorFlow\'s '
                      'CPU kernels have no gradient for dilated Conv2D ops.')

  # Set-up -----------------------------------------------------------------
  @contextlib.contextmanager
  def _explained_failures(self):
    """Re-raises a lost ps or an unregistered worker as a clear error, also
    when it surfaced as a failed checkpoint write."""
    try:
      yield
    except (tf.errors.OpError, checkpoints_lib.CheckpointError) as e:
      # A failed write is a CheckpointError raised while handling the OpError.
      cause = e.__context__ if isinstance(
          e, checkpoints_lib.CheckpointError) else e
      failure = (self._cluster_failure(cause)
                 if isinstance(cause, tf.errors.OpError) else None)
      if failure is None:
        raise
      raise failure from e

  def setup(self):
    with self._explained_failures():
      return self._setup()

  def _setup(self):
    if self.run.model is not None:
      return self
    run = self.run
    run.prepare()
    self.config_changes = monitoring.save_config(self.config)
    logging.info('Connecting to the cluster: %s', cluster_dict(self.resolver))
    self.strategy = tf.distribute.ParameterServerStrategy(self.resolver)
    self.coordinator = tf.distribute.coordinator.ClusterCoordinator(
        self.strategy)
    t0 = time.time()
    with run.precision_policy(), self.strategy.scope():
      self.dstate = DistributedState(self.plan)
      restore_status = run.create_model_and_state(
          extra_checkpoint_items={'distributed': self.dstate})
      self._make_inputs()
      run.model.build_all({n: self._zero_features(n) for n in self.names})
      run.restore_or_initialize(restore_status)
      run.make_steps(restore_status)
      self.rounds = rounds_lib.Rounds(run, self.plan, self.strategy,
                                      self._task_table)
    logging.info('Built the model and its state on the parameter servers in '
                 '%.1f s.', time.time() - t0)
    self.writer = run.summary_writer()
    self._work = tf.function(self.rounds.work_fn, autograph=False)
    self._apply = {n: tf.function(functools.partial(self.rounds.apply_fn, n),
                                  autograph=False)
                   for n in self.names}
    return self

  def _make_inputs(self):
    plan = self.plan
    assignments = plan.assignments()
    self._task_table = tf.constant(
        [self.names.index(t) for t, _ in assignments], tf.int32)
    self.per_worker_datasets = {}
    self.iterators = {}
    for name in self.names:
      ranks = [r if t == name else -1 for t, r in assignments]
      positions = [int(self.dstate.positions[name][str(r)].numpy())
                   for r in range(plan.task_workers[name])]
      fn = functools.partial(self._dataset_fn, name, tf.constant(ranks, tf.int64),
                             positions)
      self.per_worker_datasets[name] = self.coordinator.create_per_worker_dataset(fn)
      self.iterators[name] = iter(self.per_worker_datasets[name])

    def tick_fn():
      ds = _sleep_dataset(tf.data.Dataset.from_tensors(tf.constant(0)).repeat(),
                          POLL_SECONDS)
      options = tf.data.Options()
      options.autotune.enabled = False
      options.experimental_optimization.inject_prefetch = False
      return ds.with_options(options)

    self._ticks = iter(self.coordinator.create_per_worker_dataset(tick_fn))

  def _dataset_fn(self, name, ranks, positions):
    """Task `name`'s stream on the worker running this; empty off its group.

    Without a data service every rank reads its own stream; with one, the
    group shares the task's served stream, which resumes at the furthest
    position any rank reached.
    """
    worker = tf.distribute.coordinator.experimental_get_current_worker_index()
    rank = tf.gather(ranks, worker)
    task, source = self.run.tasks[name], self.run.sources[name]
    if self.config.data_service_for(name):
      pipelines = [cluster_worker.served_pipeline(
          self.config, task, source, name, max(positions))]
    else:
      pipelines = [cluster_worker.rank_pipeline(
          self.config, task, source, name, r, start)
                   for r, start in enumerate(positions)]
    if len(pipelines) == 1:
      ds = pipelines[0]
    else:
      choice = tf.data.Dataset.from_tensors(tf.maximum(rank, 0)).repeat()
      ds = tf.data.Dataset.choose_from_datasets(pipelines, choice)
    return ds.take(tf.where(rank >= 0, tf.constant(-1, tf.int64),
                            tf.constant(0, tf.int64)))

  def _zero_features(self, name):
    features, _ = self.per_worker_datasets[name].element_spec

    def zeros(spec):
      shape = [1 if d is None else d for d in spec.shape.as_list()]
      if spec.dtype == tf.string:
        return tf.fill(shape, '')
      return tf.zeros(shape, spec.dtype)

    return tf.nest.map_structure(zeros, features)

  def step_cost(self, name) -> Optional[float]:
    """Device-hours per worker step of task `name` (None until measured)."""
    return self.run.step_cost(name, self._time_sum[name],
                              self._time_count[name])

  def costs(self) -> Dict[str, float]:
    out = {}
    for name in self.names:
      c = self.step_cost(name)
      out[name] = 0.0 if c is None else c * self._worker_steps[name]
    return out

  def _sync_state(self):
    """Copies the coordinator's counters into the (checkpointed) variables."""
    s = self.run.state
    for name in self.names:
      s.skipped_steps[name].assign(self._skipped[name])
      s.time_sum[name].assign(self._time_sum[name])
      s.time_count[name].assign(self._time_count[name])
      s.positions[name].assign(self._positions[name][0])
      self.dstate.worker_steps[name].assign(self._worker_steps[name])
      for r, value in enumerate(self._positions[name]):
        self.dstate.positions[name][str(r)].assign(value)

  def request_stop(self):
    """Ends training after the current round, with a checkpoint."""
    self._stop_requested = True

  def close_inputs(self):
    self.iterators = {}

  def save(self):
    self._sync_state()
    return self.run.save()

  def _maybe_snapshot(self, total_cost):
    every = self.config.snapshot_cost
    if every and int(total_cost // every) > int(self.run.state.snapshots.numpy()):
      self._sync_state()
      self.run.maybe_snapshot(total_cost)

  def _cluster_failure(self, e):
    """A clear exception for an error that ends the run, or None."""
    manager = getattr(self.run, 'manager', None)
    return plan_lib.explain_failure(
        e, self.plan, cluster_dict(self.resolver),
        manager.latest_checkpoint if manager is not None else None)

  def train(self):
    """Runs until every task's --task_steps, --steps or --max_cost."""
    # On a cluster --profile_steps traces the coordinator process.
    self._profiler = monitoring.StepProfiler(self.config.profile_steps,
                                             self.config.model_dir)
    try:
      with self._explained_failures():
        return self._train()
    finally:
      self._profiler.stop()

  def _load_counters(self):
    """Python mirrors of the run state (reading a variable is an RPC)."""
    s, names, plan = self.run.state, self.names, self.plan
    self._rounds = {n: int(s.task_steps[n].numpy()) for n in names}
    self._global = int(s.global_step.numpy())
    self._skipped = {n: int(s.skipped_steps[n].numpy()) for n in names}
    self._time_sum = {n: float(s.time_sum[n].numpy()) for n in names}
    self._time_count = {n: int(s.time_count[n].numpy()) for n in names}
    self._worker_steps = {n: int(self.dstate.worker_steps[n].numpy())
                          for n in names}
    self._positions = {n: [int(self.dstate.positions[n][str(r)].numpy())
                           for r in range(plan.task_workers[n])]
                       for n in names}
    # Ranks that hold the current round of each task: rank -> report, or
    # None when only a wait proved it (the contribution's report was lost).
    self._contributed = {n: {} for n in names}
    self._consecutive_bad = collections.Counter()
    self._window = {n: collections.defaultdict(float) for n in names}
    self._window_start = time.time()
    self._warm_workers = set()
    self._idle_workers = set()
    self._worker_log = collections.defaultdict(collections.Counter)

  def _finished(self):
    cfg, plan = self.config, self.plan
    if plan.task_steps and all(
        self._rounds[n] >= plan.task_steps.get(n, float('inf'))
        for n in self.names):
      return True
    if cfg.steps is not None and self._global >= cfg.steps:
      return True
    return (cfg.max_cost is not None
            and sum(self.costs().values()) >= cfg.max_cost)

  def _handle(self, r):
    """Counts one work report; applies the task's round when it is complete."""
    cfg = self.config
    name = self.names[int(r['task'])]
    rank, n, status = int(r['rank']), int(r['round']), int(r['status'])
    worker = int(r['worker'])
    self._worker_log[worker][name] += status == CONTRIBUTED
    if status == IDLE:
      self._idle_workers.add(worker)
      return
    self._idle_workers.discard(worker)
    if status == NONFINITE:
      self._skipped[name] += 1
      self._consecutive_bad[name] += 1
      bad = self._consecutive_bad[name]
      self._positions[name][rank] = max(self._positions[name][rank],
                                        int(r['position']))
      logging.warning('%s rank %d: non-finite loss or gradient in round %d '
                      '(%d in a row); batch dropped.', name, rank, n, bad)
      if bad >= cfg.max_nonfinite_steps:
        raise run_lib.NonFiniteLossError(
            f'{name}: {bad} consecutive non-finite steps (max_nonfinite_steps='
            f'{cfg.max_nonfinite_steps}); stopping. The last good checkpoint '
            f'is {self.run.manager.latest_checkpoint}.')
      return
    if n != self._rounds[name]:
      return  # a report on a round applied since: nothing to count
    if status == CONTRIBUTED:
      self._consecutive_bad[name] = 0
      self._contributed[name][rank] = {
          'loss': float(r['loss']), 'position': int(r['position']),
          'examples': int(r['examples']), 'seconds': float(r['seconds']),
          'input_seconds': float(r['input_seconds'])}
      if worker in self._warm_workers:  # a worker's first step warms up
        self._time_sum[name] += float(r['seconds'])
        self._time_count[name] += 1
      self._warm_workers.add(worker)
    else:  # WAITING on round n: the rank's row holds round n.
      self._contributed[name].setdefault(rank, None)
    if len(self._contributed[name]) == self.plan.task_workers[name]:
      self._apply_round(name)

  def _apply_round(self, name):
    self._apply[name]()
    self._rounds[name] += 1
    self._global += 1
    self._worker_steps[name] += self.plan.task_workers[name]
    w = self._window[name]
    for rank, info in self._contributed[name].items():
      if info is None:
        continue
      self._positions[name][rank] = max(self._positions[name][rank],
                                        info['position'])
      w['loss'] += info['loss']
      w['contributions'] += 1
      w['examples'] += info['examples']
      w['seconds'] += info['seconds']
      w['input_s'] += info['input_seconds']
    self._contributed[name] = {}

  def _train(self):
    self.setup()
    cfg = self.config
    self._load_counters()
    start_time, start_global = time.time(), self._global
    checkpoint_path = self.run.resumed_from
    saved_at = start_global if self.run.resumed_from else None
    if self.run.resumed_from:
      logging.info('Resuming from %s at global step %d, task steps %s.',
                   self.run.resumed_from, self._global, self._rounds)
    closures = Closures(self.coordinator, self._work,
                         (self._ticks,) + tuple(self.iterators[n]
                                                for n in self.names))
    traced = False
    while not self._finished() and not self._stop_requested:
      closures.fill(self.plan.num_workers - len(self._idle_workers))
      if not traced:
        # While the workers start on the first closures.
        traced = True
        for name in self.names:
          self._apply[name].get_concrete_function()
      self._profiler.before_step(self._global + 1)
      report = closures.next(timeout=1.0)
      if report is None:
        continue
      before = self._global
      self._handle(report)
      if self._global == before:
        continue
      g = self._global
      self._profiler.after_step(g)
      costs = self.costs()
      self._maybe_snapshot(sum(costs.values()))
      if g % cfg.summary_every == 0 or g % cfg.log_every == 0:
        # Reading the metrics is a round trip to the parameter servers.
        values = {n: self._window_metrics(n) for n in self.names}
        if g % cfg.summary_every == 0:
          self._write_distributed_scalars(values, costs, g)
        if g % cfg.log_every == 0:
          self._log_distributed(values, costs, g, start_global, start_time)
      if g % cfg.checkpoint_every == 0:
        checkpoint_path = self.save()
        saved_at = g
    if self._stop_requested:
      logging.info('Stop requested: saving and ending.')
    self._profiler.stop()
    # Releases the closures still waiting on the workers.
    self.rounds.stop_flag.assign(True)
    if saved_at != self._global:
      checkpoint_path = self.save()
    self.writer.flush()
    result = {
        'checkpoint': checkpoint_path,
        'global_step': self._global,
        'task_steps': dict(self._rounds),
        'worker_steps': dict(self._worker_steps),
        'skipped_steps': dict(self._skipped),
        'cost_hours': self.costs(),
        'positions': {n: list(p) for n, p in self._positions.items()},
        'worker_contributions': {w: dict(c) for w, c
                                 in sorted(self._worker_log.items())},
        'worker_tasks': {w: t for w, (t, _) in
                         enumerate(self.plan.assignments())},
        'stopped_early': self._stop_requested,
    }
    io_utils.atomic_write_json(os.path.join(cfg.model_dir, RESULT_FILE), result)
    logging.info('Done: %s', result)
    return result

  def _window_metrics(self, name):
    """The window's loss, the task's metrics, examples/s and input-wait share
    ({} when no round of the task was applied since the last progress line)."""
    w = self._window[name]
    if not w['contributions']:
      return {}
    out = {'loss': w['loss'] / w['contributions']}
    for key, value in self.run.steps[name].metric_results().items():
      out.setdefault(key, value)  # the window's mean loss stays
    elapsed = time.time() - self._window_start
    out['examples_per_second'] = w['examples'] / max(elapsed, 1e-9)
    if w['seconds']:
      out['input_wait_fraction'] = w['input_s'] / w['seconds']
    return out

  def _write_distributed_scalars(self, values, costs, g):
    with self.writer.as_default(step=g):
      for name in self.names:
        prefix = f'{name}/'
        for key, value in values[name].items():
          tf.summary.scalar(prefix + key, value)
        tf.summary.scalar(prefix + 'steps', self._rounds[name])
        tf.summary.scalar(prefix + 'worker_steps', self._worker_steps[name])
        tf.summary.scalar(prefix + 'skipped_steps', self._skipped[name])
        tf.summary.scalar(prefix + 'cost_hours', costs[name])
      tf.summary.scalar('total/cost_hours', sum(costs.values()))

  def _log_distributed(self, values, costs, g, start_global, start_time):
    cfg = self.config
    rate = (g - start_global) / max(time.time() - start_time, 1e-9)
    parts = []
    for name in self.names:
      task_values = dict(values[name])
      if task_values:
        speed = task_values.pop('examples_per_second')
        wait = task_values.pop('input_wait_fraction', None)
        text = ' '.join([f'loss {task_values.pop("loss"):.4g}'] +
                        [f'{k} {v:.3g}' for k, v in task_values.items()] +
                        [f'{speed:.1f} ex/s'] +
                        ([f'input {100 * wait:.0f}%'] if wait is not None
                         else []))
        self.run.steps[name].reset_metrics()
      else:
        text = 'loss -'
      skipped = (f' {self._skipped[name]} skipped' if self._skipped[name]
                 else '')
      parts.append(f'{name} {self._rounds[name]} st {text}{skipped} '
                   f'({self.plan.task_workers[name]} workers)')
      self._window[name].clear()
    self._window_start = time.time()
    total_cost = sum(costs.values())
    eta = (cfg.steps - g) / rate if cfg.steps is not None and rate > 0 else None
    target = f'{g}/{cfg.steps}' if cfg.steps is not None else f'{g}'
    logging.info('[%s] %s | %.2f rounds/s | cost %.4g h | eta %s', target,
                 ' | '.join(parts), rate, total_cost,
                 run_lib.format_duration(eta))
