"""Pipeline benchmark: each task's real input pipeline on images held in
memory, on one thread and on all cores, against the per-image reference."""

import dataclasses
import itertools
import time
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from mtssl import tasks as tasks_lib
from mtssl.benchmarking import environment
from mtssl.benchmarking.settings import BenchmarkError
from mtssl.benchmarking.settings import make_task
from mtssl.data import motion_sources
from mtssl.data import sources

VIDEO_FRAME_SIZE = (240, 320)  # The size motion labels are extracted at.
VIDEO_LABEL_STRIDE = 8


class MemoryImageSource(sources.ImageSource):
  """Images held in memory, element k = image k mod n; decoded or JPEG."""

  def __init__(self, images: Sequence[np.ndarray], encoded: bool = False):
    super().__init__('memory-jpeg' if encoded else 'memory')
    self.encoded = encoded
    shapes = {im.shape for im in images}
    if encoded:
      import cv2  # pylint: disable=g-import-not-at-top
      self._data = tf.constant([
          cv2.imencode('.jpg', cv2.cvtColor(im, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
          for im in images])
    elif len(shapes) != 1:
      raise BenchmarkError(f'Decoded in-memory images must share one shape, '
                           f'got {sorted(shapes)}.')
    else:
      self._data = tf.constant(np.stack(images))
    self.n = len(images)

  def validate(self):
    if not self.n:
      raise sources.DataSourceError('No images in memory.')

  def images(self, seed, start=0):
    del seed
    data, n, counter = self._data, self.n, self.counter
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)

    def _image(k):
      return k, tf.gather(data, k % n)

    def _decode(k):
      image, ok = sources.decode_in_dataset(tf.gather(data, k % n), counter)
      return k, image, ok

    def _ok(k, image, ok):
      del k, image
      return ok

    def _drop_flag(k, image, ok):
      del ok
      return k, image

    if not self.encoded:
      return ds.map(_image)
    ds = ds.map(_decode, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.filter(_ok).map(_drop_flag)


class MemoryMotionSource(motion_sources.MotionSource):
  """(frame, label) pairs held in memory, element k = pair k mod n."""

  def __init__(self, frames: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               encoded: bool = False):
    super().__init__('memory-jpeg' if encoded else 'memory')
    self.images_source = MemoryImageSource(frames, encoded)
    self._labels = tf.constant(np.stack(labels))
    self.n = len(frames)

  def validate(self):
    self.images_source.validate()

  def examples(self, seed, start=0):
    labels, n = self._labels, self.n

    def _with_label(k, frame):
      return k, frame, tf.gather(labels, k % n)

    return self.images_source.images(seed, start).map(_with_label)


def pipeline_data(task: tasks_lib.Task, num_images: int, image_size,
                  seed: int = 0):
  """Decoded test inputs for `task`: (images, labels or None).

  Image tasks get synthetic scenes of `image_size` (default: 375x500, the
  most common ImageNet size); video tasks get synthetic video frames with
  their motion labels at the extracted size, 240x320.
  """
  if task.input_kind == 'video':
    from mtssl.data import synthetic_video  # pylint: disable=g-import-not-at-top
    from mtssl.motion import labels as labels_lib  # pylint: disable=g-import-not-at-top
    frames, labels = [], []
    for i in range(num_images):
      frame, mask = synthetic_video.render_frame(seed, i, 0, *VIDEO_FRAME_SIZE)
      frames.append(frame)
      labels.append(labels_lib.downsample_mask(mask, VIDEO_LABEL_STRIDE))
    return frames, labels
  from mtssl.data import synthetic  # pylint: disable=g-import-not-at-top
  height, width = image_size
  return [synthetic.synthetic_image(seed, i, height, width)
          for i in range(num_images)], None


def memory_source(task: tasks_lib.Task, images, labels, encoded: bool):
  """The in-memory source of the kind `task` reads."""
  if task.input_kind == 'video':
    return MemoryMotionSource(images, labels, encoded)
  return MemoryImageSource(images, encoded)


def with_threads(ds: tf.data.Dataset, threads: Optional[int]):
  """`ds` on a private pool of `threads` threads without intra-op
  parallelism; None: tf.data's defaults (all cores)."""
  options = tf.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def time_pipeline(dataset: tf.data.Dataset, batch_size: int, warmup: int,
                  batches: int) -> Dict[str, float]:
  """Examples per second of wall and of process CPU time over `batches`."""
  iterator = iter(dataset)
  try:
    for _ in range(warmup):
      next(iterator)
    cpu0, t0 = environment.cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(iterator)
    wall = time.perf_counter() - t0
    cpu = environment.cpu_seconds() - cpu0
  finally:
    del iterator
  examples = batch_size * batches
  return {'examples_per_s': round(examples / wall, 2),
          'examples_per_cpu_s': round(examples / max(cpu, 1e-9), 2)}


def benchmark_pipelines(task_configs: Mapping[str, tasks_lib.TaskConfig],
                        batch_size: int = 32, batches: int = 8,
                        warmup_batches: int = 2, num_images: int = 16,
                        image_size=(375, 500), threads: Optional[int] = None,
                        encodings: Sequence[str] = ('memory', 'jpeg'),
                        reference_examples: int = 32,
                        target_rates: Optional[Mapping[str, float]] = None,
                        variants: Sequence[str] = ('fast',),
                        seed: int = 0, log=print) -> List[Dict[str, object]]:
  """Rows of pipeline measurements: one per task, variant and input encoding.

  Variants: `fast` is the task config as given; `plain` turns the task's
  `fast_preprocessing` off; `device` turns `device_preprocessing` on (the
  host's share; tasks without the setting have only the variants they can).
  """
  from mtssl.benchmarking import reference_pipelines  # pylint: disable=g-import-not-at-top
  threads = threads or environment.cpu_cores()
  rows = []
  for name, config in task_configs.items():
    config = dataclasses.replace(config, batch_size=batch_size)
    has_variants = hasattr(config, 'fast_preprocessing')
    switches = {'plain': {'fast_preprocessing': False},
                'device': {'device_preprocessing': True}}
    images, labels = pipeline_data(make_task(name, config), num_images,
                                   image_size, seed)
    reference = reference_pipelines.measure(
        name, make_task(name, config), images, labels, reference_examples,
        seed)
    for variant, encoding in itertools.product(variants, encodings):
      change = switches.get(variant, {})
      if not all(hasattr(config, field) for field in change):
        continue
      task = make_task(name, dataclasses.replace(config, **change))
      encoded = encoding == 'jpeg'
      source = memory_source(task, images, labels, encoded)
      row = {'kind': 'pipeline', 'task': name, 'input': encoding,
             'variant': variant if has_variants else '-',
             'batch_size': batch_size, 'batches': batches,
             'image_size': list(images[0].shape[:2]),
             'threads_total': threads}
      one = time_pipeline(with_threads(
          task.make_dataset(source, batch_size, seed), 1), batch_size,
                          warmup_batches, batches)
      every = time_pipeline(with_threads(
          task.make_dataset(source, batch_size, seed), None), batch_size,
                            warmup_batches, batches)
      row.update(per_core_examples_per_s=one['examples_per_s'],
                 per_core_examples_per_cpu_s=one['examples_per_cpu_s'],
                 total_examples_per_s=every['examples_per_s'],
                 total_examples_per_cpu_s=every['examples_per_cpu_s'])
      if not encoded:
        row['reference'] = reference
        row['speedup_vs_reference'] = round(
            one['examples_per_cpu_s'] / reference['examples_per_cpu_s'], 2)
      if target_rates and name in target_rates:
        row['target_examples_per_s'] = round(target_rates[name], 1)
        row['cores_for_target'] = round(
            target_rates[name] / one['examples_per_cpu_s'], 1)
      rows.append(row)
      log(pipeline_line(row))
  return rows


def pipeline_line(row) -> str:
  ref = (f', reference {row["reference"]["examples_per_cpu_s"]:.1f}/cpu-s '
         f'(x{row["speedup_vs_reference"]})' if 'reference' in row else '')
  return (f'{row["task"]:4s} {row["variant"]:5s} {row["input"]:6s}: 1 thread '
          f'{row["per_core_examples_per_s"]:.1f} ex/s '
          f'({row["per_core_examples_per_cpu_s"]:.1f}/cpu-s), '
          f'{row["threads_total"]} threads {row["total_examples_per_s"]:.1f} '
          f'ex/s{ref}')
