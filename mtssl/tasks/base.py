"""The self-supervised task interface (`Task`) and the task registry.

A task is one unit: source, input pipeline, `trunk_images`, head, loss,
metrics and the class attributes the presets and the benchmark read. A new
task is a module with a `Task` subclass registered with `@register`.
Pipelines are deterministic under (seed, stream position) and resume at
`start`.

Typical use:

    task = make_task('rp', batch_size=8)
    source = task.make_source('synthetic')
    dataset = task.make_dataset(source, batch_size=8, seed=0, start=0)
"""

import abc
import contextlib
import dataclasses
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

import tensorflow as tf
import tf_keras

from mtssl.configs import base as config_base
from mtssl.data import sources

_REGISTRY: Dict[str, Type['Task']] = {}


@dataclasses.dataclass
class TaskConfig:
  """Settings every task has; tasks subclass it with their own fields."""
  # The paper's per-GPU batch sizes are in flags/.
  batch_size: int = config_base.field(8, 'examples per batch')

  def validate(self):
    if self.batch_size <= 0:
      raise ValueError(f'batch_size must be positive, got {self.batch_size}.')


class Task(abc.ABC):
  """One self-supervised task: inputs, head, loss, metrics."""

  name: ClassVar[str]
  config_class: ClassVar[Type[TaskConfig]] = TaskConfig
  # What the presets, the compute accounting and the benchmark know of a task.
  # K40 GPU-hours per ImageNet epoch (paper section 6.1); None: not given.
  paper_epoch_gpu_hours: ClassVar[Optional[float]] = None
  # Config values of the CPU preset (narrow heads; input sizes stay).
  cpu_overrides: ClassVar[Dict[str, Any]] = {}
  # Config fields that size the head: at their defaults, the paper's head.
  head_fields: ClassVar[Tuple[str, ...]] = ()
  # Trunk inputs per example of the paper's setting: (count, (height, width)).
  paper_trunk_inputs: ClassVar[Optional[Tuple[int, Tuple[int, int]]]] = None
  # Config values of the paper preset on a GPU: the batch whose compiled bf16
  # step was measured on an H200 (BUILD.md, "GPU preset") and preprocessing
  # in the compiled step where the task offers it.
  gpu_overrides: ClassVar[Dict[str, Any]] = {}
  # 'image' (an ImageSource) or 'video' (frames with motion labels).
  input_kind: ClassVar[str] = 'image'

  def __init__(self, config: Optional[TaskConfig] = None):
    self.config = config if config is not None else self.config_class()
    if not isinstance(self.config, self.config_class):
      raise TypeError(f'{self.name}: expected a {self.config_class.__name__}, '
                      f'got {type(self.config).__name__}.')
    self.config.validate()

  # Inputs ---------------------------------------------------------------
  def make_source(self, spec: str, tfds_data_dir: Optional[str] = None):
    """The data source for a specification string; image tasks share this."""
    return sources.make_image_source(spec, tfds_data_dir=tfds_data_dir)

  @abc.abstractmethod
  def make_dataset(self, source, batch_size: int, seed: int,
                   start: int = 0) -> tf.data.Dataset:
    """Batched (features, labels) dicts; see the module docstring."""

  def device_inputs(self, features: Dict[str, tf.Tensor],
                    labels: Dict[str, tf.Tensor]):
    """Completes a batch inside the compiled training step: the
    preprocessing that a task's `device_preprocessing` setting moves off the
    host. Every consumer of `make_dataset`'s batches calls it before the
    model; without such a setting it returns the batch unchanged."""
    return features, labels

  # Model ----------------------------------------------------------------
  @abc.abstractmethod
  def trunk_images(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
    """The images to run through the trunk, [N, H, W, 3] float32."""

  @abc.abstractmethod
  def build_head(self) -> tf_keras.Model:
    """A new head for this task (a subclassed tf_keras Model)."""

  @abc.abstractmethod
  def loss(self, labels: Dict[str, tf.Tensor], outputs: Any) -> tf.Tensor:
    """Mean loss over the batch, a float32 scalar."""

  # Metrics and summaries -----------------------------------------------
  def build_metrics(self) -> Dict[str, tf_keras.metrics.Metric]:
    return {}

  def update_metrics(self, metrics: Dict[str, tf_keras.metrics.Metric],
                     labels: Dict[str, tf.Tensor], outputs: Any) -> None:
    del metrics, labels, outputs

  def image_summaries(self, features: Dict[str, tf.Tensor],
                      labels: Dict[str, tf.Tensor],
                      outputs: Any) -> Dict[str, tf.Tensor]:
    """Images to show in TensorBoard ([N, H, W, 3] float in [0, 1])."""
    del features, labels, outputs
    return {}

  def initialize_head(self, head, checkpoint_prefix: str) -> Optional[str]:
    """Starts `head` from another task's head in a checkpoint that has none of
    this task's; returns what was restored (for the log), or None."""
    del head, checkpoint_prefix
    return None

  def paper_head_gmacs(self, trunk_images: int) -> Optional[float]:
    """Forward G multiply-accumulates of the paper's head per example, fed
    `trunk_images` trunk outputs; None where the figure is unknown."""
    del trunk_images
    return None

  def has_paper_head(self) -> bool:
    """Whether the config's head-sizing fields are the paper's (defaults)."""
    defaults = self.config_class()
    return bool(self.head_fields) and all(
        getattr(self.config, f) == getattr(defaults, f)
        for f in self.head_fields)

  def examples_in(self, features: Dict[str, tf.Tensor]) -> tf.Tensor:
    """Number of examples in a batch (what examples/s counts)."""
    return tf.shape(features['index'])[0]


def register(cls: Type[Task]) -> Type[Task]:
  """Class decorator adding a task to the registry under `cls.name`."""
  name = getattr(cls, 'name', None)
  if not name:
    raise ValueError(f'{cls.__name__} has no task name.')
  if name in _REGISTRY and _REGISTRY[name] is not cls:
    raise ValueError(f'Task name {name!r} is already registered by '
                     f'{_REGISTRY[name].__name__}.')
  _REGISTRY[name] = cls
  return cls


@contextlib.contextmanager
def temporary_tasks(*classes: Type[Task]):
  """Registers `classes` for the duration of the block only (for tests)."""
  added = []
  try:
    for cls in classes:
      if cls.name in _REGISTRY:
        raise ValueError(f'Task name {cls.name!r} is already registered.')
      added.append(register(cls).name)
    yield
  finally:
    for name in added:
      _REGISTRY.pop(name, None)


def task_names():
  return sorted(_REGISTRY)


def get_task_class(name: str) -> Type[Task]:
  if name not in _REGISTRY:
    raise ValueError(f'Unknown task {name!r}; known tasks: '
                     f'{", ".join(task_names()) or "none"}.')
  return _REGISTRY[name]


def make_task(name: str, **config_overrides) -> Task:
  cls = get_task_class(name)
  return cls(cls.config_class(**config_overrides))
