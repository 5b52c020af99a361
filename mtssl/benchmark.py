r"""Benchmarks of the training steps and the input pipelines.

  python -m mtssl.benchmark                                   # everything
  python -m mtssl.benchmark --what=steps --tasks=col --precisions=bf16 \
      --xla=true --batch_size=64                              # one GPU figure
  python -m mtssl.benchmark --what=pipelines                  # inputs only

Steps (`--what=steps`). For every combination of `--precisions` (fp32, bf16,
fp16), `--xla` and `--native_atrous`, the model is built exactly as
mtssl.training.trainer builds it: the mixed-precision policy is set before
anything is built, one MultiTaskModel holds the trunk and every task's head,
every task has its own TF1 RMSProp (wrapped in a LossScaleOptimizer under
fp16) and its own `TaskTrainStep` (XLA-compiled with `--xla`). Each task's
step then runs on one constant, device-resident batch (so input is not
measured): `--warmup_steps` untimed steps (the first one traces and
compiles; its time is reported as `compile_s`), then `--steps` timed steps
closed by a read of the loss, which waits for the device. With several
tasks a `multi` row times round-robin cycles of one step of every task, the
trainer's schedule. Reported per row: step time, training examples/s, the
analytic forward multiply-accumulates per example counted from the model's
own graph (mtssl.benchmarking.flops: trunk, with the task's trunk_images expansion, plus
head), training FLOPs per example (2 FLOPs per MAC, x3 for forward and
backward, the usual convention), achieved TFLOP/s and
model-FLOP utilization against the device's peak (`--peak_tflops`, or the
table `PEAK_TFLOPS` for known accelerators; none on a CPU). For the paper's
configuration the count is set beside the paper model's reference counts.

Pipelines (`--what=pipelines`). Each task's real input pipeline
(`Task.make_dataset`) reads images held in memory, decoded (`memory`: the
preprocessing alone) or JPEG-encoded (`jpeg`: with the project's decoder, as
folder and TFDS sources decode), and is timed on one thread (tf.data's
private thread pool of size 1, no intra-op parallelism) and on all cores.
Rates are examples per second of wall time and per second of process CPU
time; on a machine shared with other jobs the CPU-time rate is the stable
one. Beside them: the same preprocessing written the straightforward way,
per image with NumPy/OpenCV on one thread (mtssl.benchmarking.reference_pipelines), and
the ratio of the two per-core rates; and how many cores the pipeline needs
to feed one accelerator at the `--target_mfu` on the `--target_device`.

Results go to `<output_dir>/<name>.json` and `.md` (atomic writes), with the
device, versions, flags, batch sizes and the machine's load average before
and after. Nothing here asserts a timing; tests/test_benchmark.py only checks
that a tiny run completes and writes valid files.
"""

import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.configs import training as configs
from mtssl.benchmarking import flops
from mtssl.utils import io_utils
from mtssl.models import multitask as model_lib
from mtssl import tasks as tasks_lib
from mtssl.backbones import resnet_v2
from mtssl.data import motion_sources
from mtssl.data import sources
from mtssl.training import core
from mtssl.training import step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

PRECISIONS = {'fp32': 'none', 'bf16': 'bf16', 'fp16': 'fp16'}
# --precisions value -> the trainer's --mixed_precision value.
POLICIES = {'fp32': 'none', 'bf16': 'bf16', 'fp16': 'fp16'}

# Dense peak TFLOP/s by device-name substring (first match wins): bf16/fp16
# tensor cores, TF32 tensor cores (what fp32 convolutions and matmuls use
# when TensorFlow's TF32 execution is on, its default on Ampere and later),
# and plain fp32. NVIDIA datasheets.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bf16': 756.0, 'fp16': 756.0, 'tf32': 378.0, 'fp32': 51.2}),
    ('H100 NVL', {'bf16': 835.0, 'fp16': 835.0, 'tf32': 418.0, 'fp32': 60.0}),
    ('H100', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),
    ('H200', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),
    ('A100', {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
)
H100_BF16_PEAK_TFLOPS = 989.4

# Forward multiply-accumulates (G) of the paper's trunk (ResNet-v2-101 to
# block 3 at output stride 8) per input size, the reference count of the
# paper's model; each task states its head's (Task.paper_head_gmacs).
PAPER_TRUNK_GMACS = {(256, 256): 28.75, (96, 96): 4.04, (240, 320): 33.7}
TRAINING_FLOPS_PER_MAC = 2 * 3  # 2 FLOPs per MAC; forward + 2 backward products


class BenchmarkError(ValueError):
  """An invalid benchmark setting; the message names it."""


# Environment -----------------------------------------------------------------


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def accelerators() -> List[Dict[str, str]]:
  """Name and details of every GPU TensorFlow sees."""
  out = []
  for gpu in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(gpu)
    out.append({'device': gpu.name,
                'name': details.get('device_name', gpu.name),
                'compute_capability': '.'.join(
                    map(str, details.get('compute_capability', ())))})
  return out


def cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def device_name() -> str:
  gpus = accelerators()
  if gpus:
    return gpus[0]['name']
  return f'CPU: {_cpu_model()} ({cpu_cores()} cores)'


def environment() -> Dict[str, object]:
  import cv2  # pylint: disable=g-import-not-at-top
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'device': device_name(),
      'accelerators': accelerators(),
      'cpu': _cpu_model(),
      'cpu_cores': cpu_cores(),
      'memory_gib': round(os.sysconf('SC_PAGE_SIZE') *
                          os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1),
      'load_average': [round(x, 2) for x in os.getloadavg()],
      'python': platform.python_version(),
      'platform': platform.platform(),
      'tensorflow': tf.__version__,
      'tf_keras': tf_keras.__version__,
      'numpy': np.__version__,
      'opencv': cv2.__version__,
      'tf32_enabled': bool(
          tf.config.experimental.tensor_float_32_execution_enabled()),
  }


def peak_tflops(name: str, precision: str,
                tf32: Optional[bool] = None) -> Optional[float]:
  """Dense peak of a known accelerator for a precision, else None."""
  if tf32 is None:
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in name.lower():
      if precision == 'fp32':
        return peaks['tf32'] if tf32 else peaks['fp32']
      return peaks[precision]
  return None


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


# Settings ----------------------------------------------------------------------


@dataclasses.dataclass
class ModelSettings:
  """What the step benchmark builds: a trunk and tasks with their configs."""
  trunk: str
  output_stride: int
  task_configs: Dict[str, tasks_lib.TaskConfig]
  data: Dict[str, str] = dataclasses.field(default_factory=dict)
  seed: int = 0

  @property
  def task_names(self):
    return list(self.task_configs)


def settings_from_preset(preset: str, tasks: Optional[Sequence[str]] = None,
                         trunk: Optional[str] = None,
                         batch_sizes: Optional[Mapping[str, int]] = None,
                         task_overrides: Optional[Mapping[str, Mapping]] = None,
                         output_stride: Optional[int] = None) -> ModelSettings:
  """A preset of mtssl/configs.py (`paper` or `cpu`) with overrides."""
  if preset not in configs.PRESETS:
    raise BenchmarkError(f'--config: unknown preset {preset!r}; choose one of '
                         f'{", ".join(sorted(configs.PRESETS))}.')
  config = configs.PRESETS[preset](list(tasks) if tasks else None)
  trunk = trunk or config.trunk
  if trunk not in resnet_v2.TRUNK_BLOCKS:
    raise BenchmarkError(f'--trunk: unknown trunk {trunk!r}; choose one of '
                         f'{", ".join(sorted(resnet_v2.TRUNK_BLOCKS))}.')
  task_overrides = dict(task_overrides or {})
  unknown = set(task_overrides) - set(config.tasks)
  if unknown:
    raise BenchmarkError(f'--task_overrides names tasks that are not run: '
                         f'{sorted(unknown)}.')
  task_configs = {}
  for name, run in config.tasks.items():
    values = dict(task_overrides.get(name, {}))
    if batch_sizes and name in batch_sizes:
      values['batch_size'] = batch_sizes[name]
    fields = {f.name for f in dataclasses.fields(run.config)}
    bad = set(values) - fields
    if bad:
      raise BenchmarkError(f'{name} has no setting(s) {sorted(bad)}.')
    values = {k: tuple(v) if isinstance(v, list) else v
              for k, v in values.items()}
    try:
      task_configs[name] = dataclasses.replace(run.config, **values)
    except ValueError as e:
      raise BenchmarkError(f'{name}: {e}') from None
  return ModelSettings(trunk=trunk,
                       output_stride=output_stride or config.output_stride,
                       task_configs=task_configs,
                       data={n: r.data for n, r in config.tasks.items()},
                       seed=config.seed)


def make_task(name: str, config) -> tasks_lib.Task:
  return tasks_lib.get_task_class(name)(config)


def first_batches(task_objects: Mapping[str, tasks_lib.Task],
                  data: Mapping[str, str], seed: int):
  """One (features, labels) batch per task from its own pipeline."""
  out = {}
  for name, task in task_objects.items():
    source = task.make_source(data.get(name, 'synthetic'))
    source.validate()
    iterator = iter(task.make_dataset(source, task.config.batch_size, seed=seed))
    try:
      out[name] = next(iterator)
    finally:
      del iterator
  return out


def _specs(structure):
  return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                               structure)


def forward_macs(model: model_lib.MultiTaskModel, name: str,
                 features) -> Dict[str, float]:
  """Forward MACs per example of task `name` (trunk, head, total)."""
  task = model.tasks[name]
  examples = int(task.examples_in(features))
  images = task.trunk_images(features)
  trunk_macs = flops.count_macs(
      lambda x: model.representation(name, x, training=False),
      tf.TensorSpec(images.shape, images.dtype))
  total = flops.count_macs(
      lambda f: model.task_outputs(name, f, training=False), _specs(features))
  return {'trunk_gmacs': trunk_macs / examples / 1e9,
          'head_gmacs': (total - trunk_macs) / examples / 1e9,
          'forward_gmacs': total / examples / 1e9,
          'trunk_images_per_example': int(images.shape[0]) // examples,
          'trunk_image_size': list(images.shape[1:3])}


def paper_model_gmacs(name: str, trunk: str, output_stride: int, config,
                       counted: Mapping[str, object]) -> Optional[Dict[str, float]]:
  """The paper model's reference forward G MACs per example, or None."""
  if trunk != 'resnet_v2_101' or output_stride != 8:
    return None
  size = tuple(counted['trunk_image_size'])
  if size not in PAPER_TRUNK_GMACS:
    return None
  images = counted['trunk_images_per_example']
  out = {'trunk_gmacs': PAPER_TRUNK_GMACS[size] * images}
  task = make_task(name, config)
  head = task.paper_head_gmacs(images) if task.has_paper_head() else None
  if head is not None:
    out['head_gmacs'] = head
    out['forward_gmacs'] = out['trunk_gmacs'] + out['head_gmacs']
  return out


# Step benchmark ------------------------------------------------------------------


def mixed_precision_policy(precision: str):
  if precision not in POLICIES:
    raise BenchmarkError(f'--precisions: unknown precision {precision!r}; '
                         f'choose from {", ".join(POLICIES)}.')
  return core.precision_policy(POLICIES[precision])


def _device() -> str:
  return '/GPU:0' if tf.config.list_physical_devices('GPU') else '/CPU:0'


def build_steps(settings: ModelSettings, precision: str, xla: bool,
                native_atrous: bool, batches, learning_rate: float = 1e-4):
  """(model, {task: TaskTrainStep}, {task: device-resident batch})."""
  with mixed_precision_policy(precision):
    task_objects = {n: make_task(n, c) for n, c in settings.task_configs.items()}
    model = core.build_model(settings.trunk, settings.output_stride,
                             task_objects, native_atrous=native_atrous,
                             seed=settings.seed)
    with tf.device(_device()):
      resident = {n: tf.nest.map_structure(tf.identity, b)
                  for n, b in batches.items()}
    model.build_all({n: f for n, (f, _) in resident.items()})
    steps = {n: step_lib.TaskTrainStep(
        model, n, core.task_optimizer(n, learning_rate, POLICIES[precision]),
        jit_compile=xla)
             for n in settings.task_names}
  return model, steps, resident


def time_steps(run_once, warmup: int, steps: int):
  """(first call s, mean timed step s, last output); syncs on the loss."""
  start = time.perf_counter()
  out = run_once()
  float(out['loss'])
  compile_s = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    out = run_once()
  float(out['loss'])
  start = time.perf_counter()
  for _ in range(steps):
    out = run_once()
  float(out['loss'])  # Waits for the device.
  return compile_s, (time.perf_counter() - start) / steps, out


def _utilization(row, peak):
  flop = row['train_gflop_per_example'] * row['examples_per_s'] / 1e3
  row['achieved_tflops'] = round(flop, 4)
  row['peak_tflops'] = peak
  row['mfu'] = round(flop / peak, 4) if peak else None


def benchmark_steps(settings: ModelSettings, precisions: Sequence[str],
                    xla_values: Sequence[bool],
                    native_atrous_values: Sequence[bool] = (False,),
                    warmup_steps: int = 2, steps: int = 10,
                    multi_task: bool = True,
                    peak: Optional[float] = None,
                    log=print) -> List[Dict[str, object]]:
  """Rows of step measurements, one per task (and `multi`) and combination."""
  if warmup_steps < 1 or steps < 1:
    raise BenchmarkError('warmup_steps and steps must be at least 1.')
  task_objects = {n: make_task(n, c) for n, c in settings.task_configs.items()}
  batches = first_batches(task_objects, settings.data, settings.seed)
  counts = {}
  has_gpu = bool(tf.config.list_physical_devices('GPU'))
  rows = []
  for precision in precisions:
    for xla in xla_values:
      for native in native_atrous_values:
        base = {'kind': 'step', 'trunk': settings.trunk,
                'output_stride': settings.output_stride,
                'precision': precision, 'xla': bool(xla),
                'native_atrous': bool(native)}
        if native and not xla and not has_gpu:
          for name in settings.task_names:
            rows.append(dict(base, task=name, error=(
                'native atrous convolutions have no gradient kernel on CPU '
                'without XLA')))
          continue
        try:
          model, train_steps, resident = build_steps(
              settings, precision, xla, native, batches)
        except Exception as e:  # pylint: disable=broad-except
          rows.append(dict(base, task='all', error=_error_text(e)))
          log(f'build failed ({precision}, xla={xla}): {_error_text(e)}')
          continue
        for name in settings.task_names:
          if name not in counts:
            counts[name] = forward_macs(model, name, resident[name][0])
        results = {}
        for name in settings.task_names:
          row = dict(base, task=name)
          examples = int(model.tasks[name].examples_in(resident[name][0]))
          row['batch_size'] = examples
          row.update(counts[name])
          spec = paper_model_gmacs(name, settings.trunk,
                                    settings.output_stride,
                                    settings.task_configs[name], counts[name])
          if spec:
            row['paper_model'] = spec
          row['train_gflop_per_example'] = round(
              counts[name]['forward_gmacs'] * TRAINING_FLOPS_PER_MAC, 4)
          try:
            compile_s, step_s, out = time_steps(
                lambda n=name: train_steps[n](*resident[n]), warmup_steps,
                steps)
          except Exception as e:  # pylint: disable=broad-except
            row['error'] = _error_text(e)
            rows.append(row)
            log(f'{name} {precision} xla={xla}: {row["error"]}')
            continue
          row.update(compile_s=round(compile_s, 3), step_s=round(step_s, 5),
                     steps=steps, warmup_steps=warmup_steps,
                     examples_per_s=round(examples / step_s, 3),
                     loss=float(out['loss']), finite=bool(out['finite']))
          _utilization(row, peak)
          results[name] = row
          rows.append(row)
          log(_step_line(row))
        if multi_task and len(results) > 1:
          names = list(results)

          def cycle(names=names):
            out = None
            for n in names:
              out = train_steps[n](*resident[n])
            return out

          row = dict(base, task='multi', tasks=names)
          _, step_s, out = time_steps(cycle, 1, steps)
          examples = sum(results[n]['batch_size'] for n in names)
          gflop = sum(results[n]['train_gflop_per_example'] *
                      results[n]['batch_size'] for n in names)
          row.update(batch_size=examples, step_s=round(step_s, 5),
                     steps=steps, examples_per_s=round(examples / step_s, 3),
                     forward_gmacs=round(sum(
                         results[n]['forward_gmacs'] * results[n]['batch_size']
                         for n in names) / examples, 4),
                     train_gflop_per_example=round(gflop / examples, 4))
          _utilization(row, peak)
          rows.append(row)
          log(_step_line(row))
        del model, train_steps, resident
        tf_keras.backend.clear_session()
        gc.collect()
  return rows


def _error_text(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'[:300]


def _step_line(row) -> str:
  mfu = f' MFU {100 * row["mfu"]:.1f}%' if row.get('mfu') is not None else ''
  return (f'{row["task"]:5s} {row["precision"]} xla={int(row["xla"])} '
          f'atrous={"native" if row["native_atrous"] else "s2b"} '
          f'batch {row["batch_size"]}: {row["step_s"]:.4f} s/step, '
          f'{row["examples_per_s"]:.2f} ex/s, '
          f'{row["achieved_tflops"]:.3f} TFLOP/s{mfu}')


# Pipeline benchmark ----------------------------------------------------------------


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


def pipeline_data(name: str, num_images: int, image_size, seed: int = 0):
  """Decoded test inputs for task `name`: (images, labels or None).

  Image tasks get synthetic scenes of `image_size` (default: 375x500, the
  most common ImageNet size); ms gets synthetic video frames with their
  motion labels at the extracted size, 240x320.
  """
  if name == 'ms':
    from mtssl.data import synthetic_video  # pylint: disable=g-import-not-at-top
    from mtssl.motion import labels as labels_lib  # pylint: disable=g-import-not-at-top
    frames, labels = [], []
    for i in range(num_images):
      frame, mask = synthetic_video.render_frame(seed, i, 0, 240, 320)
      frames.append(frame)
      labels.append(labels_lib.downsample_mask(mask, 8))
    return frames, labels
  from mtssl.data import synthetic  # pylint: disable=g-import-not-at-top
  height, width = image_size
  return [synthetic.synthetic_image(seed, i, height, width)
          for i in range(num_images)], None


def _single_threaded(ds: tf.data.Dataset, threads: Optional[int]):
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
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
      next(iterator)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
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
  `fast_preprocessing` off (tasks without it have only the one variant).
  """
  from mtssl.benchmarking import reference_pipelines  # pylint: disable=g-import-not-at-top
  threads = threads or cpu_cores()
  rows = []
  for name, config in task_configs.items():
    config = dataclasses.replace(config, batch_size=batch_size)
    images, labels = pipeline_data(name, num_images, image_size, seed)
    reference = reference_pipelines.measure(
        name, make_task(name, config), images, labels, reference_examples,
        seed)
    for variant, encoding in itertools.product(variants, encodings):
      if variant == 'plain':
        if not hasattr(config, 'fast_preprocessing'):
          continue
        task = make_task(name, dataclasses.replace(config,
                                                   fast_preprocessing=False))
      else:
        task = make_task(name, config)
      encoded = encoding == 'jpeg'
      source = (MemoryMotionSource(images, labels, encoded) if name == 'ms'
                else MemoryImageSource(images, encoded))
      row = {'kind': 'pipeline', 'task': name, 'input': encoding,
             'variant': variant if hasattr(config, 'fast_preprocessing')
                        else '-',
             'batch_size': batch_size, 'batches': batches,
             'image_size': list(images[0].shape[:2]),
             'threads_total': threads}
      one = time_pipeline(_single_threaded(
          task.make_dataset(source, batch_size, seed), 1), batch_size,
                          warmup_batches, batches)
      every = time_pipeline(_single_threaded(
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
      log(_pipeline_line(row))
  return rows


def _pipeline_line(row) -> str:
  ref = (f', reference {row["reference"]["examples_per_cpu_s"]:.1f}/cpu-s '
         f'(x{row["speedup_vs_reference"]})' if 'reference' in row else '')
  return (f'{row["task"]:4s} {row["variant"]:5s} {row["input"]:6s}: 1 thread '
          f'{row["per_core_examples_per_s"]:.1f} ex/s '
          f'({row["per_core_examples_per_cpu_s"]:.1f}/cpu-s), '
          f'{row["threads_total"]} threads {row["total_examples_per_s"]:.1f} '
          f'ex/s{ref}')


def target_rates(forward_gmacs: Mapping[str, float], mfu: float,
                 peak: float) -> Dict[str, float]:
  """Training examples/s an accelerator reaches at `mfu` of `peak` TFLOP/s."""
  return {n: mfu * peak * 1e12 / (g * 1e9 * TRAINING_FLOPS_PER_MAC)
          for n, g in forward_gmacs.items()}


def paper_forward_gmacs() -> Dict[str, float]:
  """Forward G MACs per example of the paper's model, per task."""
  out = {}
  for name in tasks_lib.task_names():
    task = tasks_lib.get_task_class(name)()
    if task.paper_trunk_inputs is None:
      continue
    count, size = task.paper_trunk_inputs
    head = task.paper_head_gmacs(count)
    if size in PAPER_TRUNK_GMACS and head is not None:
      out[name] = count * PAPER_TRUNK_GMACS[size] + head
  return out


# Reports -------------------------------------------------------------------------


def _fmt(value, digits=3):
  """Numbers with `digits` significant digits (all digits of integer parts)."""
  if value is None:
    return '-'
  if isinstance(value, float):
    if value == 0 or abs(value) >= 10 ** (digits - 1):
      return f'{value:.0f}'
    return f'{value:.{digits}g}'
  return str(value)


def markdown(report: Mapping[str, object]) -> str:
  """The report as markdown: environment, steps table, pipelines table."""
  env = report['environment']
  lines = [f'# mtssl benchmark: {env["device"]}', '',
           f'- date: {env["date"]}',
           f'- device: {env["device"]}; CPU {env["cpu"]}, {env["cpu_cores"]} '
           f'cores, {env["memory_gib"]} GiB',
           f'- versions: Python {env["python"]}, TensorFlow '
           f'{env["tensorflow"]}, tf_keras {env["tf_keras"]}, NumPy '
           f'{env["numpy"]}, OpenCV {env["opencv"]}',
           f'- load average before / after: {env["load_average"]} / '
           f'{report.get("load_average_after")}',
           f'- command: `{report["command"]}`', '']
  steps = [r for r in report['results'] if r['kind'] == 'step']
  if steps:
    lines += ['## Training steps', '',
              'Forward G MACs per example counted from the model\'s graph '
              '(the paper model\'s reference count in brackets); '
              'training FLOPs = 6 x forward MACs. Constant device-resident '
              'batches; input not included.', '',
              '| task | trunk | batch | precision | XLA | atrous | step s | '
              'examples/s | fwd GMAC/ex [paper] | train GFLOP/ex | TFLOP/s | '
              'MFU | first step s |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in steps:
      if 'error' in r:
        lines.append(f'| {r["task"]} | {r["trunk"]} | {r.get("batch_size", "-")}'
                     f' | {r["precision"]} | {"on" if r["xla"] else "off"} | '
                     f'{"native" if r["native_atrous"] else "s2b"} | '
                     f'failed: {r["error"]} |||||||')
        continue
      spec = r.get('paper_model', {}).get('forward_gmacs')
      gmacs = _fmt(r['forward_gmacs'], 4) + (f' [{spec:.4g}]' if spec else '')
      mfu = f'{100 * r["mfu"]:.1f}%' if r.get('mfu') is not None else '-'
      lines.append(
          f'| {r["task"]} | {r["trunk"]} | {r["batch_size"]} | '
          f'{r["precision"]} | {"on" if r["xla"] else "off"} | '
          f'{"native" if r["native_atrous"] else "s2b"} | {_fmt(r["step_s"])}'
          f' | {_fmt(r["examples_per_s"])} | {gmacs} | '
          f'{_fmt(r["train_gflop_per_example"])} | '
          f'{_fmt(r["achieved_tflops"])} | {mfu} | '
          f'{_fmt(r.get("compile_s"))} |')
    lines.append('')
  pipes = [r for r in report['results'] if r['kind'] == 'pipeline']
  if pipes:
    lines += ['## Input pipelines', '',
              'Examples/s of each task\'s tf.data pipeline on images held in '
              'memory (`memory`: decoded; `jpeg`: decoded in the pipeline), '
              'on one thread and on all cores, per second of wall time and '
              'of process CPU time. Reference: the same preprocessing per '
              'image in NumPy/OpenCV on one thread '
              '(mtssl/reference_pipelines.py); speed-up: 1-thread '
              'examples per CPU-second over the reference\'s. Variant '
              '`plain`: the task\'s fast_preprocessing off. Cores for '
              'target: CPU cores '
              'the pipeline needs for the training rate of '
              f'{report.get("target", "-")}.', '',
              '| task | variant | input | batch | 1 thread ex/s | ex/CPU-s | '
              'all cores ex/s | reference ex/CPU-s | speed-up | '
              'target ex/s | cores for target |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in pipes:
      ref = r.get('reference', {}).get('examples_per_cpu_s')
      lines.append(
          f'| {r["task"]} | {r["variant"]} | {r["input"]} | {r["batch_size"]} | '
          f'{_fmt(r["per_core_examples_per_s"])} | '
          f'{_fmt(r["per_core_examples_per_cpu_s"])} | '
          f'{_fmt(r["total_examples_per_s"])} ({r["threads_total"]}) | '
          f'{_fmt(ref)} | '
          f'{_fmt(r.get("speedup_vs_reference"))} | '
          f'{_fmt(r.get("target_examples_per_s"))} | '
          f'{_fmt(r.get("cores_for_target"))} |')
    lines.append('')
  return '\n'.join(lines)


def write_report(report: Mapping[str, object], output_dir: str,
                 name: str) -> Dict[str, str]:
  paths = {'json': os.path.join(output_dir, f'{name}.json'),
           'markdown': os.path.join(output_dir, f'{name}.md')}
  io_utils.atomic_write_json(paths['json'], report)
  io_utils.atomic_write_text(paths['markdown'], markdown(report))
  return paths


def default_name() -> str:
  date = datetime.date.today().isoformat()
  gpus = accelerators()
  kind = gpus[0]['name'].replace('NVIDIA ', '').split()[0].lower() if gpus else 'cpu'
  return f'{date}-{kind}'


# Command line --------------------------------------------------------------------


def _parse_batch_sizes(values: Sequence[str], tasks: Sequence[str]):
  out = {}
  for value in values or ():
    if ':' in value:
      task, _, number = value.partition(':')
      if task not in tasks:
        raise BenchmarkError(f'--batch_size: {task!r} is not among the tasks '
                             f'{",".join(tasks)}.')
      targets = [task]
    else:
      number, targets = value, list(tasks)
    try:
      size = int(number)
    except ValueError:
      raise BenchmarkError(f'--batch_size: {value!r} is not a number or '
                           f'task:number.') from None
    if size <= 0:
      raise BenchmarkError(f'--batch_size: {value!r} must be positive.')
    out.update({t: size for t in targets})
  return out


def _parse_bools(values: Sequence[str], flag: str):
  out = []
  for value in values:
    low = value.strip().lower()
    if low in ('true', '1', 'on', 'yes'):
      out.append(True)
    elif low in ('false', '0', 'off', 'no'):
      out.append(False)
    else:
      raise BenchmarkError(f'--{flag}: {value!r} is not true or false.')
  if not out:
    raise BenchmarkError(f'--{flag} is empty.')
  return out


def main(argv):
  # absl flags are defined and read here only.
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values = flags.FLAGS
  if len(argv) > 1:
    print(f'error: unexpected arguments {argv[1:]}', file=sys.stderr)
    return 2
  try:
    return _main(flag_values, argv)
  except (BenchmarkError, configs.ConfigError, sources.DataSourceError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2


def _main(fv, argv):
  what = set(fv.what)
  if 'all' in what:
    what = {'steps', 'pipelines'}
  if not what or what - {'steps', 'pipelines'}:
    raise BenchmarkError(f'--what: choose steps, pipelines or all, got '
                         f'{",".join(fv.what)}.')
  for precision in fv.precisions:
    if precision not in POLICIES:
      raise BenchmarkError(f'--precisions: unknown precision {precision!r}; '
                           f'choose from {", ".join(POLICIES)}.')
  try:
    overrides = json.loads(fv.task_overrides) if fv.task_overrides else {}
  except json.JSONDecodeError as e:
    raise BenchmarkError(f'--task_overrides is not JSON: {e}') from None
  if not isinstance(overrides, dict):
    raise BenchmarkError('--task_overrides must be a JSON object '
                         '{task: {field: value}}.')
  tasks = fv.tasks or None
  preset_tasks = list(configs.PRESETS[fv.config](tasks).tasks) if (
      fv.config in configs.PRESETS) else []
  settings = settings_from_preset(
      fv.config, tasks, fv.trunk,
      _parse_batch_sizes(fv.batch_size, preset_tasks), overrides)
  peak_device = device_name()
  report = {'environment': environment(),
            'command': ' '.join(['python -m mtssl.benchmark'] + [
                a for a in argv[1:]] + _flag_arguments(fv)),
            'settings': {'config': fv.config, 'trunk': settings.trunk,
                         'output_stride': settings.output_stride,
                         'tasks': {n: dataclasses.asdict(c) for n, c in
                                   settings.task_configs.items()}},
            'results': []}
  rows = report['results']
  if 'steps' in what:
    xla_values = _parse_bools(fv.xla, 'xla')
    native_values = _parse_bools(fv.native_atrous, 'native_atrous')
    for precision in fv.precisions:
      peak = fv.peak_tflops or peak_tflops(peak_device, precision)
      rows += benchmark_steps(settings, [precision], xla_values, native_values,
                              fv.warmup_steps, fv.steps, fv.multi_task, peak)
  if 'pipelines' in what:
    counted = {r['task']: r['forward_gmacs'] for r in rows
               if r.get('kind') == 'step' and 'forward_gmacs' in r
               and r['task'] != 'multi'}
    if settings.trunk != 'resnet_v2_101' or not counted:
      counted = paper_forward_gmacs()
    peak = fv.target_peak_tflops
    report['target'] = (f'{fv.target_mfu:.0%} MFU of {peak:g} TFLOP/s '
                        f'(the paper\'s model, H100 bf16 dense)')
    rows += benchmark_pipelines(
        {n: settings.task_configs[n] for n in settings.task_names},
        batch_size=fv.pipeline_batch_size, batches=fv.pipeline_batches,
        warmup_batches=2, num_images=fv.pipeline_images,
        image_size=tuple(int(x) for x in fv.pipeline_image_size),
        encodings=fv.pipeline_inputs, variants=fv.pipeline_variants,
        target_rates=target_rates({n: counted[n] for n in settings.task_names
                                   if n in counted}, fv.target_mfu, peak),
        seed=settings.seed)
  report['load_average_after'] = [round(x, 2) for x in os.getloadavg()]
  paths = write_report(report, fv.output_dir, fv.name or default_name())
  print(f'Wrote {paths["json"]} and {paths["markdown"]}')
  return 0


def _flag_arguments(fv) -> List[str]:
  out = []
  for name in FLAG_NAMES:
    flag = fv[name]
    if flag.present:
      value = flag.value
      if isinstance(value, list):
        value = ','.join(map(str, value))
      out.append(f'--{name}={value}')
  return out


FLAG_NAMES = (
    'what', 'config', 'tasks', 'trunk', 'precisions', 'xla', 'native_atrous',
    'batch_size', 'warmup_steps', 'steps', 'multi_task', 'task_overrides',
    'peak_tflops', 'pipeline_batch_size', 'pipeline_batches',
    'pipeline_images', 'pipeline_image_size', 'pipeline_inputs',
    'pipeline_variants', 'target_mfu', 'target_peak_tflops', 'output_dir',
    'name')


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_list('what', ['all'], 'steps, pipelines or all')
  flags.DEFINE_enum('config', 'paper', sorted(configs.PRESETS),
                    'preset (mtssl/configs.py) the model comes from')
  flags.DEFINE_list('tasks', None, 'tasks (default: the preset\'s)')
  flags.DEFINE_string('trunk', None, 'trunk (default: the preset\'s)')
  flags.DEFINE_list('precisions', ['fp32', 'bf16', 'fp16'],
                    'fp32, bf16, fp16 (mixed precision, fp16 loss-scaled)')
  flags.DEFINE_list('xla', ['false', 'true'], 'XLA off and/or on')
  flags.DEFINE_list('native_atrous', ['false'],
                    'dilated convolutions as single Conv2D ops (false, true)')
  flags.DEFINE_list('batch_size', None, 'batch size for every task (16) or '
                    'per task (rp:16,col:32); default: the preset\'s')
  flags.DEFINE_integer('warmup_steps', 2, 'untimed steps (the first compiles)')
  flags.DEFINE_integer('steps', 10, 'timed steps')
  flags.DEFINE_bool('multi_task', True, 'also time round-robin cycles over '
                    'all tasks')
  flags.DEFINE_string('task_overrides', None, 'JSON {task: {field: value}} '
                      'applied to the preset\'s task configs')
  flags.DEFINE_float('peak_tflops', None, 'device peak for MFU (default: '
                     'known accelerators; none on CPU)')
  flags.DEFINE_integer('pipeline_batch_size', 32, 'pipeline batch size')
  flags.DEFINE_integer('pipeline_batches', 8, 'timed pipeline batches')
  flags.DEFINE_integer('pipeline_images', 16, 'distinct images in memory')
  flags.DEFINE_list('pipeline_image_size', ['375', '500'],
                    'height,width of the images of rp, col and ex')
  flags.DEFINE_list('pipeline_inputs', ['memory', 'jpeg'],
                    'memory (decoded) and/or jpeg (decoded in the pipeline)')
  flags.DEFINE_list('pipeline_variants', ['fast', 'plain'],
                    'fast (the task configs as given) and/or plain '
                    '(fast_preprocessing off)')
  flags.DEFINE_float('target_mfu', 0.35, 'MFU of the training rate the '
                     'pipelines are compared with')
  flags.DEFINE_float('target_peak_tflops', H100_BF16_PEAK_TFLOPS,
                     'peak of the accelerator the pipelines must feed')
  flags.DEFINE_string('output_dir', 'benchmarks/results', 'where the JSON '
                      'and markdown go')
  flags.DEFINE_string('name', None, 'file name without extension (default: '
                      '<date>-<device>)')


def run():
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
