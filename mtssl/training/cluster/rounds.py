"""One task's synchronous rounds on a parameter-server cluster: workers write
per-rank gradient rows next to the variables, the coordinator applies a round
when every rank of the task has contributed."""

import functools

import tensorflow as tf

from mtssl.training.cluster import plan as plan_lib

# Status of a work closure.
CONTRIBUTED, WAITING, IDLE, NONFINITE = 0, 1, 2, 3

POLL_SECONDS = 0.02        # in-graph poll interval of a waiting worker
MAX_WAIT_SECONDS = 5.0     # longest a closure waits before reporting back


class Rounds:
  """Round variables (gradient rows, row tags, stop flag) on the parameter
  servers, the workers' work function and the coordinator's apply function.

  Build inside the strategy's scope, after the run's steps exist.
  """

  def __init__(self, run, plan: plan_lib.ClusterPlan, strategy, task_table):
    self.run = run
    self.names = run.names
    self.plan = plan
    self.strategy = strategy
    self._task_table = task_table
    self._make_variables()

  def _make_variables(self):
    """Per task: [K] + v.shape rows next to each variable, and row tags."""
    self.accumulators = {}
    self.tags = {}
    self._has_grad = {}
    for name in self.names:
      k = self.plan.task_workers[name]
      accs = []
      for v in self.run.steps[name].variables:
        with self.strategy.extended.colocate_vars_with(v):
          accs.append(tf.Variable(
              lambda v=v: tf.zeros([k] + v.shape.as_list(), v.dtype),
              trainable=False, name=f'accumulator_{name}'))
      self.accumulators[name] = accs
      with self.strategy.extended.colocate_vars_with(self.run.state.task_steps[name]):
        self.tags[name] = tf.Variable(tf.fill([k], tf.constant(-1, tf.int64)),
                                      trainable=False, name=f'tags_{name}')
    self.stop_flag = tf.Variable(False, trainable=False, name='stop')

  # Worker side ----------------------------------------------------------------
  def work_fn(self, ticks, *iterators):
    worker = tf.cast(
        tf.distribute.coordinator.experimental_get_current_worker_index(),
        tf.int32)
    branches = [functools.partial(self._task_branch, name, iterators[i], ticks,
                                  worker)
                for i, name in enumerate(self.names)]
    return tf.switch_case(tf.gather(self._task_table, worker), branches)

  def _task_branch(self, name, iterator, ticks, worker):
    step = self.run.steps[name]
    task = self.run.tasks[name]
    ranks = [r if t == name else 0 for t, r in self.plan.assignments()]
    rank = tf.gather(tf.constant(ranks, tf.int64), worker)
    round_var = self.run.state.task_steps[name]
    tags = self.tags[name]
    target = self.plan.task_steps.get(name, -1)
    own_tag = tf.gather(tags.read_value(), rank)
    max_polls = int(MAX_WAIT_SECONDS / POLL_SECONDS)

    def finished(n):
      stop = self.stop_flag.read_value()
      if target >= 0:
        stop = tf.logical_or(stop, n >= target)
      return stop

    def keep_waiting(i, n):
      return tf.logical_and(
          tf.logical_and(tf.equal(own_tag, n), i < max_polls),
          tf.logical_not(finished(n)))

    def poll(i, n):
      tick = next(ticks)
      with tf.control_dependencies([tick]):
        return i + 1, round_var.read_value()

    _, n = tf.while_loop(keep_waiting, poll,
                         [tf.constant(0), round_var.read_value()])

    def report(status, loss=0.0, position=-1, examples=0, seconds=0.0,
               input_seconds=0.0):
      return {'task': tf.constant(self.names.index(name), tf.int32),
              'worker': worker, 'rank': tf.cast(rank, tf.int32), 'round': n,
              'status': tf.constant(status, tf.int32),
              'loss': tf.cast(loss, tf.float32),
              'position': tf.cast(position, tf.int64),
              'examples': tf.cast(examples, tf.int32),
              'seconds': tf.cast(seconds, tf.float64),
              'input_seconds': tf.cast(input_seconds, tf.float64)}

    def compute():
      start = tf.timestamp()
      with tf.control_dependencies([start]):
        features, labels = next(iterator)
      with tf.control_dependencies(tf.nest.flatten((features, labels))):
        input_seconds = tf.timestamp() - start
      features, labels = task.device_inputs(features, labels)
      result = step.compute_gradients(features, labels)
      grads = result['grads']
      self._has_grad[name] = [g is not None for g in grads]

      def write():
        index = tf.reshape(rank, [1])
        writes = [acc.scatter_update(tf.IndexedSlices(g[tf.newaxis], index))
                  for acc, g in zip(self.accumulators[name], grads)
                  if g is not None]
        with tf.control_dependencies(writes):
          tagged = tags.scatter_update(tf.IndexedSlices(tf.reshape(n, [1]),
                                                        index))
        with tf.control_dependencies([tagged]):
          # The task's metrics (variables on the ps, read by the coordinator)
          # count the batches that contribute.
          task.update_metrics(step.metrics, labels, result['outputs'])
          return tf.constant(CONTRIBUTED)

      def drop():
        step.restore_moving_statistics(result['saved_moving'])
        return tf.constant(NONFINITE)

      status = tf.cond(result['finite'], write, drop)
      with tf.control_dependencies([status]):
        seconds = tf.timestamp() - start
      out = report(0, result['loss'],
                   tf.reduce_max(features['index']) + 1,
                   task.examples_in(features), seconds, input_seconds)
      out['status'] = status
      return out

    return tf.cond(
        finished(n), lambda: report(IDLE),
        lambda: tf.cond(tf.equal(own_tag, n), lambda: report(WAITING), compute))

  # Coordinator side -----------------------------------------------------------
  def apply_fn(self, name):
    """Applies task `name`'s round: mean of the rows, then round += 1."""
    pairs = [(acc, v) for acc, v, has in zip(self.accumulators[name],
                                             self.run.steps[name].variables,
                                             self._has_grad[name]) if has]
    optimizer = self.run.optimizers[name]

    def replica_fn():
      grads_and_vars = []
      for acc, v in pairs:
        with tf.device(acc.device):
          grads_and_vars.append((tf.reduce_mean(acc, axis=0), v))
      applied = optimizer.apply_gradients(grads_and_vars)
      with tf.control_dependencies([applied]):
        return tf.constant(True)

    done = self.strategy.run(replica_fn)
    with tf.control_dependencies([done]):
      self.run.state.task_steps[name].assign_add(1)
      self.run.state.global_step.assign_add(1)
