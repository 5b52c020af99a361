r"""Image sources at scale: per-core rate of tfrecord: against folder:, the
cost of starting a stream at a far position, and the rate through the
tf.data service.

  python benchmarks/source_rates.py --images=64 --output=benchmarks/results/X

Inputs: --images synthetic scenes at 375x500 (the most common ImageNet size)
written as JPEG files in a folder and as shards of that folder
(tools/make_shards.py's library). Rows:

  decode   the source's (index, image) stream alone
  rp, col, ex  the task's whole batched pipeline (CPU preset settings)
  rp/device, col/device, ex/device  the host's share with the task's
           device_preprocessing on (the rest runs in the compiled step)

each on one tf.data thread (examples per second of wall time, and per second
of CPU time, the figure least affected by other jobs on the machine), and
the wall time to the first element of a stream started at position 0, 10^6
and 10^12. Then rp, col and ex from the shards in this process on every
core (tf.data's defaults) against the same pipelines on a tf.data service
of 1 and 2 local worker processes (--service_workers), with the CPU seconds
those processes spent; and the host cores one H200 needs at the compiled
steps' rates (COMPILED_STEP_RATES) from the one-thread examples per CPU-s,
with host and with device preprocessing.
Writes OUTPUT.json and OUTPUT.md; timings are reported, never asserted.
"""

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_IMAGES = flags.DEFINE_integer('images', 64, 'Images in the folder.')
_BATCHES = flags.DEFINE_integer(
    'batches', 40, 'Timed batches of 8 per row (with 6, a row timed a tenth '
    'of a CPU-second and its rate moved by a third between runs).')
_OUTPUT = flags.DEFINE_string('output', None, 'Output path without extension.')
_SERVICE_WORKERS = flags.DEFINE_list(
    'service_workers', ['1', '2'], 'tf.data service sizes (worker processes) '
    'to time; empty: none.')

# Training examples per second of the XLA-compiled training steps (paper
# heads, bf16) on one NVIDIA H200, replayed with XLA at commit 357a851:
# col 64 images per batch, rp 256 pairs, ex 64 triplets.
COMPILED_STEP_RATES = {'col': 925.0, 'rp': 4818.0, 'ex': 2114.0}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Service:
  """A dispatcher with one worker, plus `workers - 1` worker processes."""

  def __init__(self, workers: int):
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    self.address = f'grpc://localhost:{port}'
    self.processes = []
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
    for i in range(workers):
      where = [f'--port={port}'] if i == 0 else [f'--dispatcher=localhost:{port}']
      process = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, '-m', 'mtssl.data_service', '--workers=1', *where],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      self.processes.append(process)
      line = process.stdout.readline()
      while line and not line.startswith('data service:'):
        line = process.stdout.readline()
      if not line:
        self.stop()
        raise RuntimeError('a data service process ended before serving')

  def cpu_seconds(self) -> float:
    total = 0
    for process in self.processes:
      with open(f'/proc/{process.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf('SC_CLK_TCK')

  def stop(self):
    for process in self.processes:
      process.kill()
      process.wait()


def time_served(ds, batch, batches, service=None):
  """Examples per wall second, and per CPU second of the service processes."""
  iterator = iter(ds)
  for _ in range(2):
    next(iterator)
  cpu0 = service.cpu_seconds() if service else 0.0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  wall = time.perf_counter() - t0
  out = {'examples_per_s': round(batch * batches / wall, 2)}
  if service:
    cpu = service.cpu_seconds() - cpu0
    out['service_cpu_s_per_example'] = round(cpu / (batch * batches), 5)
  del iterator
  return out


def main(argv) -> int:
  del argv
  import cv2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtssl import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from mtssl.benchmarking import pipelines  # pylint: disable=g-import-not-at-top
  from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
  from mtssl.data import sources  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix='mtssl-source-rates-')
  folder = os.path.join(tmp, 'images')
  os.makedirs(folder)
  images, _ = pipelines.pipeline_data(tasks_lib.get_task_class('rp')(),
                                      _IMAGES.value, (375, 500))
  for i, image in enumerate(images):
    cv2.imwrite(os.path.join(folder, f'{i:05d}.jpg'), image[..., ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 90])
  shards = os.path.join(tmp, 'shards')
  image_records.make_shards(folder, shards, records_per_shard=16,
                            log=lambda _: None)
  specs = {'folder': 'folder:' + folder, 'tfrecord': 'tfrecord:' + shards}
  batch = 8
  rows = []
  for what in ('decode', 'rp', 'col', 'ex', 'rp/device', 'col/device',
               'ex/device'):
    for kind, spec in specs.items():
      source = sources.make_image_source(spec)
      if what == 'decode':
        ds = source.images(0).batch(batch)
      else:
        name, _, device = what.partition('/')
        cls = tasks_lib.get_task_class(name)
        task = cls(cls.config_class(**dict(
            cls.cpu_overrides, batch_size=batch,
            device_preprocessing=bool(device))))
        ds = task.make_dataset(source, batch, seed=0)
      rate = pipelines.time_pipeline(pipelines.with_threads(ds, 1), batch,
                                     warmup=2, batches=_BATCHES.value)
      rows.append(dict(pipeline=what, source=kind, **rate))
      print(rows[-1], flush=True)
  resume = []
  for kind, spec in specs.items():
    source = sources.make_image_source(spec)
    for start in (0, 10**6, 10**12):
      t0 = time.perf_counter()
      next(iter(source.images(0, start)))
      resume.append({'source': kind, 'start': start,
                     'first_element_s': round(time.perf_counter() - t0, 4)})
      print(resume[-1], flush=True)
  from mtssl.data import service as service_lib  # pylint: disable=g-import-not-at-top
  served = []
  source = sources.make_image_source(specs['tfrecord'])

  def pipeline(name):
    cls = tasks_lib.get_task_class(name)
    task = cls(cls.config_class(**dict(cls.cpu_overrides, batch_size=batch)))
    return task.make_dataset(source, batch, seed=0)

  for name in COMPILED_STEP_RATES:
    served.append(dict(pipeline=name, where='in process',
                       **time_served(pipeline(name), batch, _BATCHES.value)))
    print(served[-1], flush=True)
    for workers in map(int, filter(None, _SERVICE_WORKERS.value)):
      service = Service(workers)
      try:
        ds = service_lib.distribute(pipeline(name), service.address,
                                    f'rates-{name}-{workers}')
        served.append(dict(pipeline=name, where=f'service, {workers} worker(s)',
                           **time_served(ds, batch, _BATCHES.value, service)))
      finally:
        service.stop()
      print(served[-1], flush=True)
  per_core = {r['pipeline']: r['examples_per_cpu_s'] for r in rows
              if r['source'] == 'tfrecord'}
  cores = {what: {'compiled_step_examples_per_s': rate,
                  'examples_per_cpu_s': per_core.get(what),
                  'host_cores': round(rate / per_core[what], 1)
                  if per_core.get(what) else None}
           for name, rate in COMPILED_STEP_RATES.items()
           for what in (name, name + '/device')}
  report = {'machine': platform.processor() or platform.machine(),
            'cpus': os.cpu_count(), 'load_average': os.getloadavg(),
            'tensorflow': tf.__version__, 'images': _IMAGES.value,
            'timed_batches': _BATCHES.value,
            'image_size': [375, 500], 'rates': rows, 'resume': resume,
            'service': served, 'host_cores_per_h200': cores}
  if _OUTPUT.value:
    with open(_OUTPUT.value + '.json', 'w') as f:
      json.dump(report, f, indent=1)
    lines = [
        '# Image sources: per-core rate and resume cost', '',
        f'{report["cpus"]} CPUs, load average {report["load_average"][0]:.1f} '
        f'(1 minute) at the start, TensorFlow '
        f'{report["tensorflow"]}; {_IMAGES.value} synthetic 375x500 JPEG '
        f'images (quality 90); one tf.data thread per pipeline, '
        f'{_BATCHES.value} timed batches of {batch}.', '',
        '| pipeline | source | examples/s (wall) | examples per CPU-s |',
        '|---|---|---|---|']
    lines += [f'| {r["pipeline"]} | {r["source"]} | {r["examples_per_s"]} | '
              f'{r["examples_per_cpu_s"]} |' for r in rows]
    lines += ['', '| source | start position | first element (s) |',
              '|---|---|---|']
    lines += [f'| {r["source"]} | {r["start"]:,} | {r["first_element_s"]} |'
              for r in resume]
    lines += ['', '| pipeline (tfrecord:) | where | examples/s (wall) | '
              'service CPU-s per example |', '|---|---|---|---|']
    lines += [f'| {r["pipeline"]} | {r["where"]} | {r["examples_per_s"]} | '
              f'{r.get("service_cpu_s_per_example", "")} |' for r in served]
    lines += ['', '| task (/device: device preprocessing) | compiled step on '
              'one H200 (examples/s) | host examples per CPU-s | host cores '
              'per H200 |', '|---|---|---|---|']
    lines += [f'| {n} | {c["compiled_step_examples_per_s"]:.0f} | '
              f'{c["examples_per_cpu_s"]} | {c["host_cores"]} |'
              for n, c in cores.items()]
    with open(_OUTPUT.value + '.md', 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return 0


if __name__ == '__main__':
  app.run(main)
