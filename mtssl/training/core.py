"""What every training loop builds the same way.

The single-machine and cluster trainers, the evaluation protocols, the
benchmark and the tests take their precision policy, optimizers, multi-task
model and finite-guarded update from here.

Typical use:

  with core.precision_policy('bf16'):
    model = core.build_model('resnet_v2_101', 8, tasks, seed=0)
  update = core.GuardedUpdate(optimizer, variables,
                              core.moving_statistics(model.trunk, head))
"""

import contextlib
from typing import Callable, Dict, Mapping, Optional, Sequence

import tensorflow as tf
import tf_keras

from mtssl.backbones import resnet_v2
from mtssl.models import multitask
from mtssl.training import optimizers

# --mixed_precision value -> tf_keras policy name.
POLICIES = {'none': 'float32', 'bf16': 'mixed_bfloat16', 'fp16': 'mixed_float16'}


@contextlib.contextmanager
def precision_policy(mixed_precision: str):
  """The tf_keras global policy of `mixed_precision` while the block runs."""
  if mixed_precision not in POLICIES:
    raise ValueError(f'mixed_precision must be one of {", ".join(POLICIES)}, '
                     f'got {mixed_precision!r}.')
  previous = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy(POLICIES[mixed_precision])
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(previous)


def task_optimizer(name: str, learning_rate, mixed_precision: str = 'none',
                   decay: float = 0.9, momentum: float = 0.0,
                   epsilon: float = 1e-10):
  """Task `name`'s TF1 RMSProp (`RMSProp_<name>`), loss-scaled under fp16."""
  opt = optimizers.TF1RMSProp(learning_rate, decay=decay, momentum=momentum,
                              epsilon=epsilon, name=f'RMSProp_{name}')
  if mixed_precision == 'fp16':
    opt = tf_keras.mixed_precision.LossScaleOptimizer(opt)
  return opt


def inner_optimizer(optimizer):
  """The optimizer a LossScaleOptimizer wraps, or `optimizer` itself."""
  if isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer):
    return optimizer.inner_optimizer
  return optimizer


def build_model(trunk: str, output_stride: Optional[int], tasks: Mapping,
                native_atrous: bool = False, lasso_l1: Optional[float] = None,
                seed: Optional[int] = None) -> multitask.MultiTaskModel:
  """Trunk `trunk` + one head per task (variables are created lazily).

  With `seed`, the Python, NumPy and TensorFlow global seeds are set first, so
  two models built with one seed start from the same weights.
  """
  if seed is not None:
    tf_keras.utils.set_random_seed(seed)
  backbone = resnet_v2.trunk_from_name(trunk, output_stride,
                                       native_atrous=native_atrous)
  return multitask.MultiTaskModel(backbone, tasks, lasso_l1=lasso_l1)


def moving_statistics(*modules) -> list:
  """The batch-norm moving means and variances of `modules`, in order."""
  out = []
  for module in modules:
    out += [v for v in module.non_trainable_variables
            if 'moving_mean' in v.name or 'moving_variance' in v.name]
  return out


class GuardedUpdate:
  """Gradients of a loss, applied only when everything is finite.

  A dropped step changes nothing: no weight or optimizer slot moves, and the
  batch-norm moving statistics (`moving`) that the forward pass updated are
  put back. Under fp16 loss scaling, the LossScaleOptimizer skips overflowing
  gradients itself (and lowers its scale); only a non-finite loss drops the
  step here.
  """

  def __init__(self, optimizer, variables: Sequence[tf.Variable],
               moving: Sequence[tf.Variable] = ()):
    self.optimizer = optimizer
    self.variables = list(variables)
    self.moving = list(moving)
    self.loss_scaled = optimizer is not inner_optimizer(optimizer)
    # Slots exist before tracing, so the conditional apply creates nothing.
    inner_optimizer(optimizer)._create_all_weights(self.variables)  # pylint: disable=protected-access

  def gradients(self, loss_fn: Callable[[], Dict[str, tf.Tensor]]):
    """Runs `loss_fn` (returns a dict with the float32 objective 'total')
    under a tape. Returns {'losses', 'grads' (None where a variable has no
    gradient), 'finite', 'saved_moving'} (traceable)."""
    saved = [tf.identity(v) for v in self.moving]
    with tf.GradientTape() as tape:
      losses = loss_fn()
      total = losses['total']
      objective = (self.optimizer.get_scaled_loss(total) if self.loss_scaled
                   else total)
    grads = tape.gradient(objective, self.variables)
    if self.loss_scaled:
      grads = self.optimizer.get_unscaled_gradients(grads)
    finite = tf.math.is_finite(total)
    if not self.loss_scaled:
      for g in grads:
        if g is not None:
          finite = tf.logical_and(finite, tf.reduce_all(tf.math.is_finite(g)))
    return {'losses': losses, 'grads': grads, 'finite': finite,
            'saved_moving': saved}

  def restore_moving_statistics(self, saved):
    """Puts back the moving statistics a dropped step's forward pass moved."""
    for var, value in zip(self.moving, saved):
      var.assign(value)

  def apply(self, result, on_apply: Optional[Callable[[], None]] = None):
    """Applies `result`'s gradients when finite, else restores the moving
    statistics; `on_apply` runs only with an applied step. Returns a bool
    tensor: applied."""
    grads = result['grads']

    def apply_fn():
      self.optimizer.apply_gradients(
          [(g, v) for g, v in zip(grads, self.variables) if g is not None])
      if on_apply is not None:
        on_apply()
      return tf.constant(True)

    def skip_fn():
      self.restore_moving_statistics(result['saved_moving'])
      return tf.constant(False)

    return tf.cond(result['finite'], apply_fn, skip_fn)
