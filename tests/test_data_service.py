"""tf.data service: a dispatcher and two workers on localhost serve rp and
col from tfrecord shards to a short training run; a run goes on when a
worker process is killed and when its journaled dispatcher restarts; the
local cluster launcher's service feeds a worker group; bad setups fail by
name, quickly."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.data import image_records
from mtssl.data import service
from mtssl.data import sources
from mtssl.tasks import col
from mtssl.tasks import rp
from mtssl.training import trainer as trainer_lib
from mtssl.training.cluster import local as local_cluster
from tests import test_sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  return local_cluster.free_ports(1)[0]


def task_runs(data):
  return {
      'rp': configs.TaskRun(config=rp.RPConfig(
          batch_size=2, patch_size=32, gap=16, jitter=3, min_pixels=20000,
          max_pixels=30000, unit_depths=(32, 16), unit_bottleneck=8,
          fc_bottleneck=16), data=data),
      'col': configs.TaskRun(config=col.ColConfig(
          batch_size=2, image_size=32, head_widths=(16, 16)), data=data),
  }


def make_config(model_dir, data, steps=2, tasks=('rp', 'col'), **overrides):
  runs = task_runs(data)
  values = dict(tasks={n: runs[n] for n in tasks}, model_dir=model_dir,
                trunk='resnet_v2_tiny', output_stride=8, steps=steps,
                checkpoint_every=1000, log_every=1000, summary_every=1000,
                image_summary_every=1000)
  values.update(overrides)
  return configs.TrainConfig(**values)


def start_service(*flags):
  """`python -m mtssl.data_service FLAGS`, once it has said it serves."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  process = subprocess.Popen(
      [sys.executable, '-m', 'mtssl.data_service', *flags], cwd=ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 120
  line = ''
  while time.time() < deadline and process.poll() is None:
    line = process.stdout.readline()
    if line.startswith('data service:'):
      return process
  process.kill()
  raise RuntimeError(f'the data service did not start: {line!r}')


def train_beside(trainer, action, done):
  """(result, {logged step: rp loss}) of `trainer.train()` while `action`
  runs in a thread; `done` is set when training ends."""
  thread = threading.Thread(target=action)
  thread.start()
  try:
    with tf.test.TestCase().assertLogs('absl', level='INFO') as logs:
      result = trainer.train()
  finally:
    done.set()
    thread.join()
  return result, {int(m.group(1)): float(m.group(2)) for m in re.finditer(
      r'\[(\d+)/\d+\] rp \d+ st loss (\S+)', '\n'.join(logs.output))}


class DataServiceTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tf.test.TestCase().get_temp_dir()
    cls.images = root = os.path.join(cls.tmp, 'images')
    test_sources.write_folder(root)
    cls.shards = os.path.join(cls.tmp, 'shards')
    image_records.make_shards(root, cls.shards, records_per_shard=2,
                              log=lambda _: None)
    cls.port = free_port()
    cls.server = start_service(f'--port={cls.port}', '--workers=2')

  @classmethod
  def tearDownClass(cls):
    cls.server.terminate()
    cls.server.wait(timeout=30)
    super().tearDownClass()

  def test_rp_and_col_train_from_two_workers(self):
    # rp from shards, col from the image folder, both with preprocessing in
    # the step: the workers send col's crops (their grayscale test reads the
    # colour table, a constant of the graph) and rp's kept channels with the
    # noise's keys and counters.
    cfg = make_config(os.path.join(self.get_temp_dir(), 'run'),
                      'tfrecord:' + self.shards, steps=4,
                      data_service=f'grpc://localhost:{self.port}')
    cfg.tasks['rp'] = dataclasses.replace(cfg.tasks['rp'], config=(
        dataclasses.replace(cfg.tasks['rp'].config, device_preprocessing=True)))
    cfg.tasks['col'] = dataclasses.replace(
        cfg.tasks['col'], data='folder:' + self.images, config=(
            dataclasses.replace(cfg.tasks['col'].config,
                                device_preprocessing=True)))
    trainer = trainer_lib.Trainer(cfg)
    result = trainer.train()
    self.assertEqual(result['task_steps'], {'rp': 2, 'col': 2})
    # Decode statuses came back with the batches (every example counted, 'ok'
    # or converted) although no Python ran on the workers.
    for name in ('rp', 'col'):
      counts = trainer.sources[name].counter.snapshot()
      self.assertGreaterEqual(sum(counts.values()), 4, msg=name)
      self.assertGreater(int(trainer.state.positions[name].numpy()), 0)

  def test_col_off_mode_on_a_worker_gives_the_local_batches(self):
    # col's pipeline (its grayscale filter carries counts in a scan) on the
    # two worker processes and, in `off` mode with one in-process worker,
    # batch for batch what it gives without the service.
    source = sources.make_image_source('tfrecord:' + self.shards)
    task = col.ColorizationTask(task_runs('')['col'].config)

    def batches(ds):
      out = []
      for features, labels in ds.take(3):
        out.append((features['index'].numpy().tolist(),
                    labels['ab'].numpy()))
      return out

    local = batches(task.make_dataset(source, 2, seed=4, start=3))
    dynamic = batches(service.distribute(
        task.make_dataset(source, 2, seed=4, start=3),
        f'grpc://localhost:{self.port}', 'col-dynamic-test'))
    self.assertLen(dynamic, 3)
    dispatcher = tf.data.experimental.service.DispatchServer()
    worker = tf.data.experimental.service.WorkerServer(
        tf.data.experimental.service.WorkerConfig(
            dispatcher_address=dispatcher.target.split('://')[1]))
    served = batches(service.distribute(
        task.make_dataset(source, 2, seed=4, start=3), dispatcher.target,
        'col-off-test', mode='off'))
    self.assertEqual([i for i, _ in served], [i for i, _ in local])
    for (_, a), (_, b) in zip(served, local):
      self.assertAllEqual(a, b)
    del worker

  def test_unreachable_dispatcher_is_a_named_error_in_bounded_time(self):
    cfg = make_config(os.path.join(self.get_temp_dir(), 'run'),
                      'tfrecord:' + self.shards)
    # Per task (--rp_data_service): nothing listens on that port.
    cfg.tasks['rp'].data_service = f'grpc://localhost:{free_port()}'
    start = time.time()
    with self.assertRaisesRegex(service.DataServiceError, 'unreachable'):
      trainer_lib.Trainer(cfg).setup()
    self.assertLess(time.time() - start, service.CONNECT_TIMEOUT_S + 20)

  def test_python_sources_are_refused_by_name(self):
    cfg = make_config(os.path.join(self.get_temp_dir(), 'run'), 'synthetic',
                      data_service=f'grpc://localhost:{self.port}')
    with self.assertRaisesRegex(service.DataServiceError,
                                r'rp_data=synthetic\(256x256\): .*numpy_function'):
      trainer_lib.Trainer(cfg).setup()

  def test_training_goes_on_through_a_killed_worker_and_a_dispatcher_restart(
      self):
    # A dispatcher with a journal (--work_dir) and two workers, each its own
    # process. One worker is killed after step 2: the run trains on from the
    # other. The dispatcher is killed two steps later and started again on
    # the same port and journal: the run trains on (the worker keeps serving
    # meanwhile) and keeps going once the clients talk to the new dispatcher.
    port = free_port()
    journal = ['--workers=0', f'--port={port}',
               f'--work_dir={os.path.join(self.get_temp_dir(), "journal")}']
    dispatchers = [start_service(*journal)]
    self.addCleanup(lambda: [p.kill() for p in dispatchers])
    workers = [start_service(f'--dispatcher=localhost:{port}', '--workers=1')
               for _ in range(2)]
    self.addCleanup(lambda: [p.kill() for p in workers])
    cfg = make_config(os.path.join(self.get_temp_dir(), 'run'),
                      'tfrecord:' + self.shards, steps=10000, tasks=('rp',),
                      data_service=f'grpc://localhost:{port}', log_every=1)
    trainer = trainer_lib.Trainer(cfg).setup()
    killed_at, restarted_at = [], []
    done = threading.Event()

    def kill_restart_then_stop():
      step = lambda: int(trainer.state.global_step.numpy())

      def wait_for(target):
        while step() < target and not done.is_set():
          time.sleep(0.01)

      wait_for(2)
      workers[1].kill()
      workers[1].wait()
      killed_at.append(step())
      wait_for(killed_at[0] + 2)
      dispatchers[0].kill()
      dispatchers[0].wait()
      dispatchers.append(start_service(*journal))
      restarted_at.append(step())
      # Clients heartbeat every second: 3 s and 3 steps on the new one.
      deadline = time.time() + 3
      while not done.is_set() and (step() < restarted_at[0] + 3
                                   or time.time() < deadline):
        time.sleep(0.01)
      trainer.request_stop()

    result, losses = train_beside(trainer, kill_restart_then_stop, done)
    self.assertLen(killed_at, 1)
    self.assertLen(restarted_at, 1)
    self.assertGreaterEqual(restarted_at[0], killed_at[0] + 2)
    self.assertGreaterEqual(result['global_step'], restarted_at[0] + 3)
    for since in (killed_at[0], restarted_at[0]):
      after = [loss for step, loss in losses.items() if step > since]
      self.assertGreaterEqual(len(after), 3, msg=losses)
      self.assertTrue(all(np.isfinite(after)), msg=losses)

  def test_a_job_lost_to_a_restart_is_a_named_error(self):
    # Measured with real processes: a dispatcher restarted without a journal
    # answers the client's next heartbeat with this NotFoundError.
    lost = tf.errors.NotFoundError(
        None, None, 'Failed to get tasks: Unknown iteration client id 3000. '
        'The dispatcher is not configured to be fault tolerant, so this '
        'could be caused by a dispatcher restart.')
    with self.assertRaisesRegex(service.DataServiceError,
                                r'rp: .*localhost:5050 was restarted without '
                                r'a journal.*--work_dir'):
      service.raise_if_job_lost(lost, 'rp', 'grpc://localhost:5050')
    service.raise_if_job_lost(tf.errors.NotFoundError(None, None, 'other'),
                              'rp', 'grpc://localhost:5050')

  def test_bad_address_is_a_config_error(self):
    cfg = make_config(os.path.join(self.get_temp_dir(), 'run'), 'synthetic',
                      data_service='localhost')
    with self.assertRaisesRegex(configs.ConfigError, 'data_service='):
      cfg.validate()


class ClusterTest(tf.test.TestCase):
  """tools/launch_local_cluster.py with --data_service_workers: a parameter
  server, rp's group of two workers and a coordinator, fed by a dispatcher
  and one service worker, all real processes."""

  def test_rp_group_shares_its_task_job(self):
    tmp = self.get_temp_dir()
    root = os.path.join(tmp, 'images')
    test_sources.write_folder(root)
    shards = os.path.join(tmp, 'shards')
    image_records.make_shards(root, shards, records_per_shard=2,
                              log=lambda _: None)
    model_dir = os.path.join(tmp, 'run')
    rp_config = task_runs('')['rp'].config
    rounds, batch = 3, rp_config.batch_size
    task_flags = [f'--rp_{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}'
                  for k, v in (('batch_size', batch),
                               ('patch_size', rp_config.patch_size),
                               ('gap', rp_config.gap), ('jitter', rp_config.jitter),
                               ('min_pixels', rp_config.min_pixels),
                               ('max_pixels', rp_config.max_pixels),
                               ('unit_depths', rp_config.unit_depths),
                               ('unit_bottleneck', rp_config.unit_bottleneck),
                               ('fc_bottleneck', rp_config.fc_bottleneck))]
    logs = os.path.join(tmp, 'logs')
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'launch_local_cluster.py'),
         '--num_ps=1', '--data_service_workers=1', f'--cluster_log_dir={logs}',
         '--max_restarts=0', '--timeout=400', '--',
         '--tasks=rp', '--task_workers=rp:2', f'--task_steps=rp:{rounds}',
         '--trunk=resnet_v2_tiny', f'--rp_data=tfrecord:{shards}',
         f'--model_dir={model_dir}', '--log_every=1', *task_flags],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2'),
        capture_output=True, text=True, timeout=500, check=False)

    def log(name):
      with open(os.path.join(logs, name)) as f:
        return f.read()[-3000:]

    self.assertEqual(proc.returncode, 0, msg=proc.stderr[-3000:] + log(
        'chief-0.log'))
    self.assertIn('data service: dispatcher', log('data_service-0.log'))
    with open(os.path.join(model_dir, 'distributed_result.json')) as f:
      result = json.load(f)
    self.assertEqual(result['task_steps'], {'rp': rounds})
    self.assertEqual(result['worker_steps'], {'rp': 2 * rounds})
    # Every batch went to one consumer of the task's job: the two ranks'
    # last batches differ, and 2 * rounds disjoint batches reach a position
    # of at least 2 * rounds * batch (each rank reading its own stream would
    # give both ranks rounds * batch).
    positions = result['positions']['rp']
    self.assertNotEqual(positions[0], positions[1])
    self.assertGreaterEqual(max(positions), 2 * rounds * batch)


class WaitingNoticeTest(tf.test.TestCase):

  def test_a_long_wait_for_the_first_batch_is_logged(self):
    with self.assertLogs(level='WARNING') as logs:
      with service.waiting_notice('rp', 'grpc://localhost:5050', every_s=0.2):
        time.sleep(0.7)
    self.assertRegex(logs.output[0], 'rp: no batch from the data service '
                     'grpc://localhost:5050 after 0 s; is a worker registered')
