"""Distributed training on a real localhost cluster, and its configuration.

The cluster test starts real processes with mtssl.training.local_cluster:
one parameter server and three workers (first task: 2 workers, second task:
1) for the class, and one run through two coordinators. Every process is
ended by the class cleanup (and a coordinator by the test's cleanup), also
when the test fails.

Each worker registers the input pipeline of its own task and rank only, so a
worker that ever ran another task's (or rank's) pipeline would fail the run
("has not registered the input pipeline"): every successful run below also
shows that each worker computes only its task.
"""

import contextlib
import dataclasses
import io
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from unittest import mock

import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.training import checkpoints
from mtssl.training import optimizers
from mtssl.training.cluster import coordinator
from mtssl.training.cluster import local as local_cluster
from mtssl.training.cluster import plan as cluster_plan
from mtssl.training.cluster import worker as cluster_worker
from mtssl.training import trainer as trainer_lib

# What the cluster trains: relative position on two workers, colorization on
# one, at small sizes.
ENTRY = ('-m', 'mtssl.train')
TASKS = ('rp', 'col')
FIRST, SECOND = TASKS
# Settings shared by every process (the data settings must be equal on the
# coordinator and the workers), as config fields.
RUN_FIELDS = {'trunk': 'resnet_v2_tiny', 'seed': 3, 'log_every': 1,
              'summary_every': 1000, 'image_summary_every': 100000}
TASK_FIELDS = {
    'rp': {'batch_size': 2, 'patch_size': 32, 'gap': 16, 'jitter': 3,
           'min_pixels': 20000, 'max_pixels': 30000, 'unit_depths': (32, 16),
           'unit_bottleneck': 8, 'fc_bottleneck': 16},
    'col': {'batch_size': 2, 'image_size': 64, 'head_widths': (32, 32)},
}


def _flag_value(value):
  return ','.join(map(str, value)) if isinstance(value, tuple) else value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 240.0  # seconds: the longest any single wait below may take


def run_flags():
  flags = list(ENTRY) + [f'--tasks={FIRST},{SECOND}',
                         f'--task_workers={FIRST}:2,{SECOND}:1']
  flags += [f'--{k}={v}' for k, v in RUN_FIELDS.items()]
  flags += [f'--{t}_{k}={_flag_value(v)}' for t in TASKS
            for k, v in TASK_FIELDS[t].items()]
  return flags


def make_config(model_dir):
  """The TrainConfig the flags above describe (for in-process expectations)."""
  config = configs.cpu_config(list(TASKS))
  config = dataclasses.replace(config, model_dir=model_dir, **RUN_FIELDS)
  for name, run in config.tasks.items():
    config.tasks[name] = dataclasses.replace(
        run, config=dataclasses.replace(run.config, **TASK_FIELDS[name]))
  return config


def read_result(model_dir):
  with open(os.path.join(model_dir, cluster_plan.RESULT_FILE)) as f:
    return json.load(f)


def event_scalars(model_dir):
  """{tag: [value, ...]} of the scalars under <model_dir>/train."""
  values = {}
  for path in tf.io.gfile.glob(os.path.join(model_dir, 'train', 'events.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        values.setdefault(value.tag, []).append(
            float(tf.make_ndarray(value.tensor)))
  return values


def checkpoint_task_steps(path):
  reader = tf.train.load_checkpoint(path)
  return {name: int(reader.get_tensor(
      f'state/task_steps/{name}/.ATTRIBUTES/VARIABLE_VALUE'))
          for name in TASKS}


class ClusterTest(tf.test.TestCase):
  """1 ps + 3 workers ({FIRST}: 2, {SECOND}: 1) and a coordinator per run."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # Failure messages quote the logs they need; the directory goes away.
    cls.log_dir = tempfile.mkdtemp(prefix='mtssl_cluster_logs_')
    cls.addClassCleanup(shutil.rmtree, cls.log_dir, ignore_errors=True)
    cls.cluster = local_cluster.LocalCluster(
        run_flags(), num_ps=1, num_workers=3, log_dir=cls.log_dir, cwd=ROOT,
        env={'PYTHONPATH': ROOT, 'TF_CPP_MIN_LOG_LEVEL': '2'})
    cls.addClassCleanup(cls.cluster.stop)
    cls.cluster.start_servers(timeout=WAIT)

  def setUp(self):
    super().setUp()
    self.addCleanup(self.cluster.kill, local_cluster.CHIEF, 0)
    for job, index in self.cluster.dead_servers():
      self.cluster.restart(job, index, timeout=WAIT)

  # Helpers --------------------------------------------------------------
  def coordinator_log(self):
    """The log of the latest coordinator start."""
    text = self.cluster.log_tail(local_cluster.CHIEF, 0, lines=100000)
    return text.rsplit('==== start chief', 1)[-1]

  def wait_for_log(self, pattern, timeout=WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
      match = re.search(pattern, self.coordinator_log())
      if match:
        return match
      if not self.cluster.alive(local_cluster.CHIEF):
        log = '\n'.join(l for l in self.coordinator_log().splitlines()
                        if 'could not be found' not in l)
        self.fail(f'The coordinator ended before logging {pattern!r}:\n'
                  f'{log[-4000:]}')
      time.sleep(0.5)
    self.fail(f'No {pattern!r} in the coordinator log after {timeout} s:\n'
              f'{self.coordinator_log()[-4000:]}')

  def task_rounds(self, name):
    """The latest step count of task `name` in the coordinator's progress log."""
    counts = re.findall(rf'\] .*?{name} (\d+) st', self.coordinator_log())
    return int(counts[-1]) if counts else 0

  def assert_coordinator_exits(self, expect=0):
    try:
      rc = self.cluster.wait_coordinator(timeout=WAIT)
    except subprocess.TimeoutExpired:
      self.fail(f'The coordinator still runs after {WAIT} s:\n'
                f'{self.coordinator_log()[-4000:]}')
    self.assertEqual(rc, expect, msg=self.coordinator_log()[-4000:])

  def assert_round_is_the_mean_of_two_gradients(self, init, checkpoint):
    """`checkpoint`, after FIRST's first round from `init`'s weights, holds
    what one process computes: each rank's first batch of its own stream,
    the mean of the two gradients, a fresh TF1 RMSProp."""
    step = init.steps[FIRST]
    grads = []
    for rank in range(2):
      ds = cluster_worker.rank_pipeline(init.config, init.tasks[FIRST],
                                        init.sources[FIRST], FIRST, rank,
                                        start=0)
      features, labels = next(iter(ds))
      grads.append(step.compute_gradients(features, labels)['grads'])
    variables = step.variables
    before = [v.numpy() for v in variables]
    second_head = [v.numpy()
                   for v in init.model.heads[SECOND].trainable_variables]
    cfg = init.config
    optimizers.TF1RMSProp(cfg.tasks[FIRST].learning_rate,
                          decay=cfg.rmsprop_decay,
                          momentum=cfg.rmsprop_momentum,
                          epsilon=cfg.rmsprop_epsilon).apply_gradients(
                              [((a + b) / 2, v)
                               for a, b, v in zip(*grads, variables)
                               if a is not None])
    expected = [v.numpy() for v in variables]
    # The two ranks read different batches: their gradients differ.
    self.assertNotAllClose(grads[0][0], grads[1][0])
    # The cluster's weights, read into the same model.
    tf.train.Checkpoint(backbone=init.model.trunk, heads=init.model.heads).read(
        checkpoint).expect_partial()
    for v, want, start in zip(variables, expected, before):
      # Compare the update (after - before). Measured: at most 3e-8 apart
      # (one float32 ulp of the weights) for updates up to 1.2e-3.
      self.assertAllClose(v.numpy() - start, want - start, rtol=1e-4,
                          atol=1e-7, msg=v.name)
    for v, want in zip(init.model.heads[SECOND].trainable_variables,
                       second_head):
      self.assertAllEqual(v.numpy(), want, msg=v.name)

  # Test -------------------------------------------------------------------
  def test_rounds_restarts_and_a_killed_worker_holding_back_its_group(self):
    tmp = self.get_temp_dir()
    model_dir = os.path.join(tmp, 'run')
    # A fixed starting point, written in-process.
    init = trainer_lib.Trainer(make_config(os.path.join(tmp, 'init'))).setup()
    init_path = tf.train.Checkpoint(backbone=init.model.trunk,
                                    heads=init.model.heads).write(
                                        os.path.join(tmp, 'init_ckpt', 'ckpt'))
    # Enough rounds that FIRST has 3 left after the ps is lost (at most 8
    # global steps by then).
    steps = {FIRST: 16, SECOND: 16}
    flags = [f'--model_dir={model_dir}', f'--init_checkpoint={init_path}',
             '--summary_every=1']
    # 1. FIRST alone, a checkpoint after every round. Its first round is the
    #    mean of its two workers' gradients. The parameter server is lost:
    #    the run stops with a clear message.
    self.cluster.start_coordinator(
        flags + [f'--task_steps={FIRST}:{steps[FIRST]},{SECOND}:0',
                 '--checkpoint_every=1', '--keep_checkpoints=1000'])
    self.wait_for_log(r'Saved checkpoint \S+ckpt-4')
    # Restarted at once, as a cluster manager would.
    self.cluster.restart(local_cluster.PS, 0, wait=False)
    self.assert_coordinator_exits(4)
    self.assertRegex(self.coordinator_log(),
                     r'error: Lost /job:ps/task:0 .*Restart the parameter '
                     r'server')
    self.assertEqual(checkpoint_task_steps(os.path.join(model_dir, 'ckpt-1')),
                     {FIRST: 1, SECOND: 0})
    self.assert_round_is_the_mean_of_two_gradients(
        init, os.path.join(model_dir, 'ckpt-1'))
    latest = tf.train.latest_checkpoint(model_dir)
    saved = checkpoint_task_steps(latest)
    self.assertGreaterEqual(saved[FIRST], 4)
    self.assertEqual(saved[SECOND], 0)
    self.assertLessEqual(saved[FIRST] + 3, steps[FIRST], msg=saved)
    # 2. A new coordinator, on the workers that served the first one and the
    #    restarted ps, resumes with the per-task step counts of the last
    #    checkpoint and trains both tasks. It saves only at the end: a save
    #    on a cluster takes seconds, and nothing below reads an intermediate
    #    checkpoint.
    self.cluster.wait_ready(local_cluster.PS, 0, timeout=WAIT)
    self.cluster.start_coordinator(
        flags + [f'--task_steps={FIRST}:{steps[FIRST]},{SECOND}:{steps[SECOND]}',
                 '--checkpoint_every=1000'])
    resumed = self.wait_for_log(r'Resuming from (\S+) at global step (\d+), '
                                r'task steps (\{.*?\})')
    self.assertEqual(resumed.group(1), latest)
    self.assertEqual(int(resumed.group(2)), sum(saved.values()))
    self.assertEqual(eval(resumed.group(3)), saved)  # pylint: disable=eval-used
    # 3. A worker of FIRST's group is killed once SECOND trains (SECOND has
    #    all its rounds ahead; it can outrun FIRST's two workers). The
    #    cluster manager restarts it at once. While it starts (a new process:
    #    seconds), FIRST's group cannot finish a round, and the other task is
    #    not held back: it trains on; then FIRST continues too.
    self.wait_for_log(rf'\] .*{SECOND} 1 st')
    self.cluster.kill(local_cluster.WORKER, 1)  # FIRST's rank 1
    first, second = self.task_rounds(FIRST), self.task_rounds(SECOND)
    self.cluster.restart(local_cluster.WORKER, 1, wait=False)
    self.wait_for_log(rf'{SECOND} {second + 2} st')
    self.assertLessEqual(self.task_rounds(FIRST), first + 1)
    self.assert_coordinator_exits(0)
    result = read_result(model_dir)
    self.assertEqual(result['task_steps'], steps)
    self.assertEqual(result['global_step'], sum(steps.values()))
    # Rounds of both coordinators: 2 workers per FIRST round.
    self.assertEqual(result['worker_steps'],
                     {FIRST: 2 * steps[FIRST], SECOND: steps[SECOND]})
    # Workers 0 and 1 train FIRST, worker 2 SECOND, and nothing else.
    contributions = result['worker_contributions']
    for worker, task in ((0, FIRST), (1, FIRST), (2, SECOND)):
      self.assertEqual(set(contributions.get(str(worker), {task: 0})) - {task},
                       set(), msg=contributions)
    # Every task's metrics, as its workers compute them, in the progress
    # lines and as scalars.
    log = self.coordinator_log()
    scalars = event_scalars(model_dir)
    for name, metrics in (('rp', ('accuracy',)),
                          ('col', ('accuracy', 'cross_entropy', 'ab_error'))):
      self.assertRegex(log, rf'{name} \d+ st loss \S+ ' +
                       ''.join(rf'.*{m} \S+' for m in metrics) +
                       r' [\d.]+ ex/s input \d+%', msg=log[-4000:])
      for key in ('loss', 'examples_per_second', 'input_wait_fraction',
                  'skipped_steps') + metrics:
        self.assertIn(f'{name}/{key}', scalars, msg=sorted(scalars))
      self.assertTrue(all(0 <= v <= 1 for v in
                          scalars[f'{name}/input_wait_fraction']))
      self.assertTrue(all(v > 0 for v in
                          scalars[f'{name}/examples_per_second']))
      self.assertTrue(all(0 <= v <= 1 for v in scalars[f'{name}/accuracy']))
      self.assertEqual(scalars[f'{name}/skipped_steps'][-1], 0)


class ClusterPlanTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.config = make_config(self.get_temp_dir())

  def test_assignments_follow_the_task_order(self):
    plan = cluster_plan.ClusterPlan.from_strings(
        self.config, f'{SECOND}:1,{FIRST}:2', f'{FIRST}:10')
    self.assertEqual(plan.task_workers, {FIRST: 2, SECOND: 1})
    self.assertEqual(plan.assignments(), [(FIRST, 0), (FIRST, 1), (SECOND, 0)])
    self.assertEqual(plan.workers_of(SECOND), [2])
    self.assertEqual(plan.task_steps, {FIRST: 10})
    plan.validate_cluster({'chief': ['a:1'], 'ps': ['b:1'],
                           'worker': ['c:1', 'c:2', 'c:3']})

  def test_bad_plans_name_the_problem(self):
    cases = [
        ('', None, '--task_workers is required'),
        (f'{FIRST}:2', None, f'gives no workers to {SECOND}'),
        (f'{FIRST}:2,{SECOND}:0', None, 'needs at least one worker'),
        (f'{FIRST}:2,{SECOND}', None, 'expected task:value'),
        (f'{FIRST}:2,{SECOND}:1,ms:1', None, "'ms' is not among --tasks"),
        (f'{FIRST}:2,{SECOND}:1,{FIRST}:1', None, 'given twice'),
        (f'{FIRST}:x,{SECOND}:1', None, 'is not an integer'),
        (f'{FIRST}:2,{SECOND}:1', 4, 'assigns 3 workers .* the cluster has 4'),
    ]
    for workers, cluster_workers, message in cases:
      with self.assertRaisesRegex(configs.ConfigError, message):
        cluster_plan.ClusterPlan.from_strings(self.config, workers,
                                             num_workers=cluster_workers)
    plan = cluster_plan.ClusterPlan.from_strings(self.config,
                                                f'{FIRST}:2,{SECOND}:1')
    for cluster, message in (
        ({'ps': ['b:1'], 'worker': ['c:1'] * 3}, 'exactly one chief'),
        ({'chief': ['a:1'], 'worker': ['c:1'] * 3}, 'at least one ps'),
        ({'chief': ['a:1'], 'ps': ['b:1'], 'worker': ['c:1'] * 3,
          'evaluator': ['d:1']}, r"jobs \['evaluator'\] are not supported")):
      with self.assertRaisesRegex(configs.ConfigError, message):
        plan.validate_cluster(cluster)

  def test_resolvers(self):
    self.assertIsNone(cluster_plan.make_cluster_resolver('auto', environ={}))
    cluster = {'chief': ['h0:1'], 'ps': ['h1:2'], 'worker': ['h2:3', 'h3:4']}
    resolver = cluster_plan.make_cluster_resolver('auto', environ={
        'TF_CONFIG': json.dumps({'cluster': cluster,
                                 'task': {'type': 'worker', 'index': 1}})})
    self.assertEqual((resolver.task_type, resolver.task_id), ('worker', 1))
    self.assertEqual(cluster_plan.cluster_dict(resolver), cluster)
    with self.assertRaisesRegex(configs.ConfigError, 'not valid JSON'):
      cluster_plan.make_cluster_resolver('auto', environ={'TF_CONFIG': '{'})
    with self.assertRaisesRegex(configs.ConfigError, 'task type must be'):
      cluster_plan.make_cluster_resolver('tfconfig', environ={
          'TF_CONFIG': json.dumps({'cluster': cluster,
                                   'task': {'type': 'evaluator'}})})
    # Slurm: 2 nodes x 3 tasks; rank 0 coordinates, then 2 ps, then 3 workers.
    slurm = {'SLURM_PROCID': '4', 'SLURM_STEP_NUM_TASKS': '6',
             'SLURM_STEP_NODELIST': 'node[1-2]',
             'SLURM_STEP_TASKS_PER_NODE': '3(x2)'}
    resolver = cluster_plan.make_cluster_resolver(
        'slurm', plan_workers=3, slurm_port_base=9000, environ=slurm)
    self.assertEqual(cluster_plan.cluster_dict(resolver), {
        'chief': ['node1:9000'], 'ps': ['node1:9001', 'node1:9002'],
        'worker': ['node2:9000', 'node2:9001', 'node2:9002']})
    self.assertEqual((resolver.task_type, resolver.task_id), ('worker', 1))
    with self.assertRaisesRegex(configs.ConfigError, 'leave 0 for parameter'):
      cluster_plan.make_cluster_resolver('slurm', plan_workers=5, environ=slurm)
    with self.assertRaisesRegex(configs.ConfigError, 'SLURM_PROCID is not set'):
      cluster_plan.make_cluster_resolver('slurm', plan_workers=3, environ={})

  def test_cluster_failures_are_explained(self):
    cluster = {'chief': ['h0:1'], 'ps': ['h1:2', 'h4:7'],
               'worker': ['h2:3', 'h2:4', 'h3:5']}
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type='chief', task_id=0)
    plan = cluster_plan.ClusterPlan.from_strings(self.config,
                                                f'{FIRST}:2,{SECOND}:1')
    trainer = coordinator.DistributedTrainer(self.config, plan, resolver)
    failure = trainer._cluster_failure(tf.errors.InvalidArgumentError(  # pylint: disable=protected-access
        None, None, 'ValueError: Could not find callback with key='
        f'mtssl-input/{FIRST}/1/0123abcd/0 in the registry.'))
    self.assertIsInstance(failure, configs.ConfigError)
    self.assertRegex(str(failure), f'worker 1 has not registered the input '
                     f'pipeline of {FIRST} rank 1 .*same flags')
    for text in ('Socket closed. Additional GRPC error information from remote '
                 'target /job:ps/replica:0/task:1/device:CPU:0',
                 'failed to connect to all addresses; ipv4:h4:7: refused'):
      failure = trainer._cluster_failure(  # pylint: disable=protected-access
          tf.errors.UnavailableError(None, None, text))
      self.assertIsInstance(failure, cluster_plan.ClusterError)
      self.assertRegex(str(failure), r'^Lost /job:ps/task:1 .*Restart the '
                       r'parameter server\(s\), then the coordinator')
    failure = trainer._cluster_failure(tf.errors.UnavailableError(  # pylint: disable=protected-access
        None, None, 'Graph execution error:\n... remote target /job:ps/replica:0/'
        'task:0 ... {grpc_message:"Socket closed", grpc_status:14}'))
    self.assertStartsWith(str(failure), 'Lost /job:ps/task:0 (Socket closed). ')
    self.assertIsNone(trainer._cluster_failure(  # pylint: disable=protected-access
        tf.errors.InvalidArgumentError(None, None, 'Incompatible shapes')))
    # A ps lost during a checkpoint write is a lost ps, not a write failure;
    # a write failure of its own stays one.
    lost = tf.errors.UnavailableError(None, None, 'Socket closed. remote '
                                      'target /job:ps/replica:0/task:0')
    for cause, expected in ((lost, cluster_plan.ClusterError),
                            (OSError('disk full'), checkpoints.CheckpointError)):
      with self.assertRaises(expected):
        with trainer._explained_failures():  # pylint: disable=protected-access
          try:
            raise cause
          except (tf.errors.OpError, OSError):
            raise checkpoints.CheckpointError('Could not write') from None

  def test_input_functions_get_stable_unplaced_names(self):
    calls = []

    @tf.function
    def build():
      with cluster_worker.worker_local_python_functions('prefix/x'):
        return tf.numpy_function(lambda v: calls.append(v) or v,
                                 [tf.constant(1)], tf.int32)

    graph = build.get_concrete_function().graph
    ops = [op for op in graph.get_operations() if op.type.startswith('PyFunc')]
    self.assertLen(ops, 1)
    self.assertEqual(ops[0].get_attr('token'), b'prefix/x/0')
    self.assertEqual(ops[0].device, '')
    self.assertEqual(int(build()), 1)
    # Outside the block TensorFlow's own names come back.
    plain = tf.function(lambda: tf.numpy_function(lambda v: v, [tf.constant(1)],
                                                  tf.int32))
    op = [op for op in plain.get_concrete_function().graph.get_operations()
          if op.type.startswith('PyFunc')][0]
    self.assertTrue(op.get_attr('token').startswith(b'pyfunc_'))

  def test_free_ports_lie_below_the_ephemeral_range(self):
    # Outgoing connections take local ports from the ephemeral range; a port
    # chosen there could be taken before its server binds it.
    ports = local_cluster.free_ports(8)
    self.assertLen(set(ports), 8)
    low = local_cluster._ephemeral_low()  # pylint: disable=protected-access
    for port in ports:
      self.assertBetween(port, 10000, low - 1)
      with socket.socket() as s:
        s.bind(('localhost', port))

  def test_ranks_read_distinct_streams_and_rank_0_the_task_stream(self):
    seeds = {cluster_worker.rank_seed(3, FIRST, r) for r in range(16)}
    self.assertLen(seeds, 16)
    self.assertEqual(cluster_worker.rank_seed(3, FIRST, 0),
                     trainer_lib.task_seed(3, FIRST))
    a = cluster_worker.input_prefix(self.config, FIRST, 0)
    self.assertNotEqual(a, cluster_worker.input_prefix(self.config, FIRST, 1))
    other = make_config(self.get_temp_dir())
    other.tasks[FIRST].config.batch_size = 3
    self.assertNotEqual(a, cluster_worker.input_prefix(other, FIRST, 0))

  def test_wrong_worker_counts_fail_before_any_work(self):
    from mtssl import train  # pylint: disable=g-import-not-at-top
    cluster = {'chief': ['localhost:1'], 'ps': ['localhost:2'],
               'worker': ['localhost:3', 'localhost:4', 'localhost:5',
                          'localhost:6']}
    argv = ['train', f'--tasks={FIRST},{SECOND}',
            f'--task_workers={FIRST}:2,{SECOND}:1',
            f'--model_dir={self.get_temp_dir()}']
    self.addCleanup(train.FLAGS.unparse_flags)
    train.FLAGS(argv)
    stderr = io.StringIO()
    with mock.patch.dict(os.environ, {'TF_CONFIG': json.dumps(
        {'cluster': cluster, 'task': {'type': 'chief', 'index': 0}})}), \
        contextlib.redirect_stderr(stderr):
      status = train.main(['train'])
    self.assertEqual(status, 2)
    self.assertEqual(stderr.getvalue().splitlines(), [
        f'error: --task_workers assigns 3 workers ({FIRST} 2 + {SECOND} 1) but '
        f'the cluster has 4 workers; the counts must match.'])


if __name__ == '__main__':
  tf.test.main()
