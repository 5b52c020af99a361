r"""Image sources at scale: per-core rate of tfrecord: against folder:, and
the cost of starting a stream at a far position.

  python benchmarks/source_rates.py --images=64 --output=benchmarks/results/X

Inputs: --images synthetic scenes at 375x500 (the most common ImageNet size)
written as JPEG files in a folder and as shards of that folder
(tools/make_shards.py's library). Rows:

  decode   the source's (index, image) stream alone
  rp, col  the task's whole batched pipeline (CPU preset settings)

each on one tf.data thread (examples per second of wall time, and per second
of CPU time, the figure least affected by other jobs on the machine), and
the wall time to the first element of a stream started at position 0, 10^6
and 10^12. Writes OUTPUT.json and OUTPUT.md; timings are reported, never
asserted.
"""

import json
import os
import platform
import tempfile
import time

from absl import app
from absl import flags

_IMAGES = flags.DEFINE_integer('images', 64, 'Images in the folder.')
_BATCHES = flags.DEFINE_integer('batches', 6, 'Timed batches of 8 per row.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output path without extension.')


def main(argv) -> int:
  del argv
  import cv2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mtssl import benchmark  # pylint: disable=g-import-not-at-top
  from mtssl import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
  from mtssl.data import sources  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix='mtssl-source-rates-')
  folder = os.path.join(tmp, 'images')
  os.makedirs(folder)
  images, _ = benchmark.pipeline_data('rp', _IMAGES.value, (375, 500))
  for i, image in enumerate(images):
    cv2.imwrite(os.path.join(folder, f'{i:05d}.jpg'), image[..., ::-1],
                [cv2.IMWRITE_JPEG_QUALITY, 90])
  shards = os.path.join(tmp, 'shards')
  image_records.make_shards(folder, shards, records_per_shard=16,
                            log=lambda _: None)
  specs = {'folder': 'folder:' + folder, 'tfrecord': 'tfrecord:' + shards}
  batch = 8
  rows = []
  for what in ('decode', 'rp', 'col'):
    for kind, spec in specs.items():
      source = sources.make_image_source(spec)
      if what == 'decode':
        ds = source.images(0).batch(batch)
      else:
        cls = tasks_lib.get_task_class(what)
        task = cls(cls.config_class(**dict(cls.cpu_overrides, batch_size=batch)))
        ds = task.make_dataset(source, batch, seed=0)
      rate = benchmark.time_pipeline(benchmark._single_threaded(ds, 1),  # pylint: disable=protected-access
                                     batch, warmup=2, batches=_BATCHES.value)
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
  report = {'machine': platform.processor() or platform.machine(),
            'cpus': os.cpu_count(), 'load_average': os.getloadavg(),
            'tensorflow': tf.__version__, 'images': _IMAGES.value,
            'image_size': [375, 500], 'rates': rows, 'resume': resume}
  if _OUTPUT.value:
    with open(_OUTPUT.value + '.json', 'w') as f:
      json.dump(report, f, indent=1)
    lines = [
        '# Image sources: per-core rate and resume cost', '',
        f'{report["cpus"]} CPUs, load average {report["load_average"][0]:.1f} '
        f'at the start (other jobs shared the machine), TensorFlow '
        f'{report["tensorflow"]}; {_IMAGES.value} synthetic 375x500 JPEG '
        f'images (quality 90); one tf.data thread per pipeline, batches of '
        f'{batch}.', '',
        '| pipeline | source | examples/s (wall) | examples per CPU-s |',
        '|---|---|---|---|']
    lines += [f'| {r["pipeline"]} | {r["source"]} | {r["examples_per_s"]} | '
              f'{r["examples_per_cpu_s"]} |' for r in rows]
    lines += ['', '| source | start position | first element (s) |',
              '|---|---|---|']
    lines += [f'| {r["source"]} | {r["start"]:,} | {r["first_element_s"]} |'
              for r in resume]
    with open(_OUTPUT.value + '.md', 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return 0


if __name__ == '__main__':
  app.run(main)
