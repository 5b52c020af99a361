"""FLOP accounting of the benchmark: MACs counted from the model's graph, the
paper model's reference counts, utilization and target rates."""

from typing import Dict, Mapping, Optional

import tensorflow as tf

from mtssl import tasks as tasks_lib
from mtssl.benchmarking import flops
from mtssl.models import multitask as model_lib

# Forward multiply-accumulates (G) of the paper's trunk (ResNet-v2-101 to
# block 3 at output stride 8) per input size, the reference count of the
# paper's model; each task states its head's (Task.paper_head_gmacs).
PAPER_TRUNK_GMACS = {(256, 256): 28.75, (96, 96): 4.04, (240, 320): 33.7}
TRAINING_FLOPS_PER_MAC = 2 * 3  # 2 FLOPs per MAC; forward + 2 backward products


def _specs(structure):
  return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype),
                               structure)


def forward_macs(model: model_lib.MultiTaskModel, name: str,
                 features) -> Dict[str, float]:
  """Forward MACs per example of task `name` (trunk, head, total)."""
  task = model.tasks[name]
  features, _ = task.device_inputs(features, {})
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
                      counted: Mapping[str, object]
                      ) -> Optional[Dict[str, float]]:
  """The paper model's reference forward G MACs per example, or None."""
  if trunk != 'resnet_v2_101' or output_stride != 8:
    return None
  size = tuple(counted['trunk_image_size'])
  if size not in PAPER_TRUNK_GMACS:
    return None
  images = counted['trunk_images_per_example']
  out = {'trunk_gmacs': PAPER_TRUNK_GMACS[size] * images}
  task = tasks_lib.get_task_class(name)(config)
  head = task.paper_head_gmacs(images) if task.has_paper_head() else None
  if head is not None:
    out['head_gmacs'] = head
    out['forward_gmacs'] = out['trunk_gmacs'] + out['head_gmacs']
  return out


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


def utilization(row, peak: Optional[float]) -> None:
  """Adds achieved TFLOP/s, the peak and MFU to a step row."""
  flop = row['train_gflop_per_example'] * row['examples_per_s'] / 1e3
  row['achieved_tflops'] = round(flop, 4)
  row['peak_tflops'] = peak
  row['mfu'] = round(flop / peak, 4) if peak else None


def target_rates(forward_gmacs: Mapping[str, float], mfu: float,
                 peak: float) -> Dict[str, float]:
  """Training examples/s an accelerator reaches at `mfu` of `peak` TFLOP/s."""
  return {n: mfu * peak * 1e12 / (g * 1e9 * TRAINING_FLOPS_PER_MAC)
          for n, g in forward_gmacs.items()}
