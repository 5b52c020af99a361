"""Prefetching input batches onto the accelerator (an input-pipeline option).

`to_device(dataset)` ends a pipeline with
`tf.data.experimental.prefetch_to_device`, so that the host-to-device copy of
the next batches overlaps the current training step instead of starting when
the step asks for its batch. `device='auto'` picks the first GPU. On a machine
without one the dataset is returned unchanged: the task pipelines already end
in `prefetch(tf.data.AUTOTUNE)` and a CPU step reads host memory directly, so
there is nothing to overlap and the option is a no-op. The transformation
must be the last one of a pipeline; every task's batches are numeric
tensors, which is what it can copy (no strings).
"""

from typing import Optional

import tensorflow as tf


def accelerator_device() -> Optional[str]:
  """The first GPU's device name, or None on a machine without one."""
  gpus = tf.config.list_logical_devices('GPU')
  return gpus[0].name if gpus else None


def to_device(dataset: tf.data.Dataset, device: Optional[str] = 'auto',
              buffer_size: int = 2) -> tf.data.Dataset:
  """`dataset` prefetched onto `device` ('auto': the first GPU, if any).

  `device=None`, or 'auto' without a GPU, returns the dataset unchanged. An
  explicit device name (a GPU, or '/cpu:0' to exercise the transformation)
  always applies it.
  """
  if device == 'auto':
    device = accelerator_device()
  if device is None:
    return dataset
  if buffer_size <= 0:
    raise ValueError(f'buffer_size must be positive, got {buffer_size}.')
  return dataset.apply(tf.data.experimental.prefetch_to_device(
      device, buffer_size=buffer_size))
