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


def batch_norms(*modules) -> list:
  """The tf_keras batch-norm layers of `modules` (and their sublayers)."""
  out = []
  for module in modules:
    for layer in [module] + list(module.submodules):
      if (isinstance(layer, tf_keras.layers.BatchNormalization)
          and all(layer is not l for l in out)):
        out.append(layer)
  return out


FINITE_CHECKS = ('fused', 'per_gradient')
MOVING_STATISTICS = ('snapshot', 'deferred')
GUARDS = ('cond', 'select')


def all_finite(tensors) -> tf.Tensor:
  """True iff every element of every (floating) tensor is finite: one
  reduction over the elements of all tensors of a dtype, concatenated."""
  groups = {}
  for t in tensors:
    groups.setdefault(t.dtype, []).append(tf.reshape(t, [-1]))
  finite = tf.constant(True)
  for flat in groups.values():
    finite = tf.logical_and(
        finite, tf.reduce_all(tf.math.is_finite(tf.concat(flat, 0))))
  return finite


class _DeferredMovingStatistics:
  """While active, the batch-norm layers record their moving-statistics
  updates (variable -> new value) instead of assigning them."""

  def __init__(self, layers, variables):
    self.layers = list(layers)
    self.variables = list(variables)
    self.new_values = {}

  def __enter__(self):
    for layer in self.layers:
      object.__setattr__(layer, '_assign_moving_average', self._moving_average)
      object.__setattr__(layer, '_assign_new_value', self._new_value)
    return self

  def __exit__(self, *exc):
    for layer in self.layers:
      for name in ('_assign_moving_average', '_assign_new_value'):
        if name in layer.__dict__:
          object.__delattr__(layer, name)
    return False

  def _record(self, variable, value):
    key = variable.ref()
    if key in self.new_values:
      raise ValueError(f'{variable.name}: updated twice in one forward pass.')
    self.new_values[key] = value
    return value

  def _moving_average(self, variable, value, momentum, inputs_size):
    # tf_keras' BatchNormalization._assign_moving_average, with the
    # assign_sub written as the subtraction it performs.
    decay = tf.convert_to_tensor(1.0 - momentum, name='decay')
    if decay.dtype != variable.dtype.base_dtype:
      decay = tf.cast(decay, variable.dtype.base_dtype)
    delta = (variable - tf.cast(value, variable.dtype)) * decay
    if inputs_size is not None:
      delta = tf.where(inputs_size > 0, delta, tf.zeros_like(delta))
    return self._record(variable, variable.read_value() - delta)

  def _new_value(self, variable, value):
    return self._record(variable, tf.cast(value, variable.dtype))

  def updates(self):
    """[new value] in the order of `variables`; every one must be updated."""
    missing = [v.name for v in self.variables
               if v.ref() not in self.new_values]
    if missing:
      raise ValueError('deferred moving statistics: the forward pass did not '
                       f'update {", ".join(missing)}.')
    if len(self.new_values) != len(self.variables):
      raise ValueError('deferred moving statistics: the forward pass updated '
                       f'{len(self.new_values)} statistics, expected '
                       f'{len(self.variables)}.')
    return [self.new_values[v.ref()] for v in self.variables]


class GuardedUpdate:
  """Gradients of a loss, applied only when everything is finite.

  A dropped step changes nothing: no weight or optimizer slot moves, and the
  batch-norm moving statistics (`moving`) keep their values. Under fp16 loss
  scaling, the LossScaleOptimizer skips overflowing gradients itself (and
  lowers its scale); only a non-finite loss drops the step here.

  Variants (same results; they differ in the compiled step's kernels):
    finite_check: 'fused' (one reduction over all gradients) or
      'per_gradient' (one reduction per gradient).
    moving_statistics: 'snapshot' (the forward pass assigns the statistics;
      a dropped step puts back a copy taken before it) or 'deferred' (the
      forward pass only computes them, an applied step assigns them; needs
      `batch_norm_layers`, the layers owning `moving`).
    guard: 'cond' (the optimizer's kernels inside a conditional) or 'select'
      (no conditional: TF1 RMSProp's update written as element-wise math and
      each variable, slot and statistic set to the new or the old value; only
      for TF1RMSProp without loss scaling).
  """

  def __init__(self, optimizer, variables: Sequence[tf.Variable],
               moving: Sequence[tf.Variable] = (),
               batch_norm_layers: Sequence = (),
               finite_check: str = 'fused',
               moving_statistics: str = 'snapshot', guard: str = 'cond'):
    for value, allowed, name in ((finite_check, FINITE_CHECKS, 'finite_check'),
                                 (moving_statistics, MOVING_STATISTICS,
                                  'moving_statistics'),
                                 (guard, GUARDS, 'guard')):
      if value not in allowed:
        raise ValueError(f'{name} must be one of {", ".join(allowed)}, '
                         f'got {value!r}.')
    self.optimizer = optimizer
    self.variables = list(variables)
    self.moving = list(moving)
    self.batch_norm_layers = list(batch_norm_layers)
    self.finite_check = finite_check
    self.moving_statistics = moving_statistics
    self.guard = guard
    self.loss_scaled = optimizer is not inner_optimizer(optimizer)
    if guard == 'select' and (
        self.loss_scaled or not isinstance(optimizer, optimizers.TF1RMSProp)):
      raise ValueError('guard=select needs a TF1RMSProp without loss scaling, '
                       f'got {type(optimizer).__name__}.')
    if moving_statistics == 'deferred':
      owned = {v.ref() for l in self.batch_norm_layers
               for v in (l.moving_mean, l.moving_variance)}
      if owned != {v.ref() for v in self.moving}:
        raise ValueError('moving_statistics=deferred: batch_norm_layers must '
                         'own exactly the moving statistics given.')
    # Slots exist before tracing, so the conditional apply creates nothing.
    inner_optimizer(optimizer)._create_all_weights(self.variables)  # pylint: disable=protected-access

  def gradients(self, loss_fn: Callable[[], Dict[str, tf.Tensor]],
                moving_statistics: Optional[str] = None):
    """Runs `loss_fn` (returns a dict with the float32 objective 'total')
    under a tape. Returns {'losses', 'grads' (None where a variable has no
    gradient), 'finite'} and 'saved_moving' (snapshot) or 'moving_updates'
    (deferred; `moving_statistics` overrides the instance's) (traceable)."""
    mode = moving_statistics or self.moving_statistics
    if mode not in MOVING_STATISTICS:
      raise ValueError(f'moving_statistics must be one of '
                       f'{", ".join(MOVING_STATISTICS)}, got {mode!r}.')
    if mode == 'deferred' and not self.batch_norm_layers and self.moving:
      raise ValueError('moving_statistics=deferred needs batch_norm_layers.')
    out = {}
    if mode == 'snapshot':
      with tf.name_scope('moving_statistics_snapshot'):
        out['saved_moving'] = [tf.identity(v) for v in self.moving]
      deferred = contextlib.nullcontext()
    else:
      deferred = _DeferredMovingStatistics(self.batch_norm_layers, self.moving)
    with tf.GradientTape() as tape:
      with deferred:
        losses = loss_fn()
      total = losses['total']
      objective = (self.optimizer.get_scaled_loss(total) if self.loss_scaled
                   else total)
    if mode == 'deferred':
      out['moving_updates'] = deferred.updates()
    grads = tape.gradient(objective, self.variables)
    if self.loss_scaled:
      grads = self.optimizer.get_unscaled_gradients(grads)
    with tf.name_scope('finite_check'):
      finite = tf.math.is_finite(total)
      if not self.loss_scaled:
        present = [g for g in grads if g is not None]
        if self.finite_check == 'fused':
          finite = tf.logical_and(finite, all_finite(present))
        else:
          for g in present:
            finite = tf.logical_and(finite,
                                    tf.reduce_all(tf.math.is_finite(g)))
    out.update({'losses': losses, 'grads': grads, 'finite': finite})
    return out

  def restore_moving_statistics(self, saved):
    """Puts back the moving statistics a dropped step's forward pass moved."""
    with tf.name_scope('moving_statistics_restore'):
      for var, value in zip(self.moving, saved):
        var.assign(value)

  def _assign_moving(self, result):
    with tf.name_scope('moving_statistics_assign'):
      for var, value in zip(self.moving, result['moving_updates']):
        var.assign(value)

  def apply(self, result, on_apply: Optional[Callable[[], None]] = None):
    """Applies `result`'s gradients when finite, else leaves (or puts back)
    the moving statistics; `on_apply` runs only with an applied step.
    Returns a bool tensor: applied."""
    if self.guard == 'select':
      return self._apply_select(result, on_apply)
    grads = result['grads']
    deferred = 'moving_updates' in result

    def apply_fn():
      self.optimizer.apply_gradients(
          [(g, v) for g, v in zip(grads, self.variables) if g is not None])
      if deferred:
        self._assign_moving(result)
      if on_apply is not None:
        on_apply()
      return tf.constant(True)

    def skip_fn():
      if not deferred:
        self.restore_moving_statistics(result['saved_moving'])
      return tf.constant(False)

    return tf.cond(result['finite'], apply_fn, skip_fn)

  def _apply_select(self, result, on_apply):
    """Branch-free apply: every state takes its new value where finite."""
    finite = result['finite']
    opt = self.optimizer
    pairs = [(g, v) for g, v in zip(result['grads'], self.variables)
             if g is not None]
    apply_state = opt._prepare([v for _, v in pairs])  # pylint: disable=protected-access
    with tf.name_scope(opt._name):  # pylint: disable=protected-access
      for g, v in pairs:
        c = apply_state[(v.device, v.dtype.base_dtype)]
        states = (opt.get_slot(v, 'rms'), opt.get_slot(v, 'momentum'), v)
        old = [s.read_value() for s in states]
        new = optimizers.rmsprop_update(
            old[2], old[0], old[1], tf.cast(g, v.dtype), c['lr_t'], c['rho'],
            c['momentum'], c['epsilon'])
        for state, before, after in zip(states, old, new):
          state.assign(tf.where(finite, after, before))
      opt.iterations.assign_add(tf.cast(finite, opt.iterations.dtype))
    with tf.name_scope('moving_statistics_assign'):
      for i, var in enumerate(self.moving):
        current = var.read_value()
        if 'moving_updates' in result:
          var.assign(tf.where(finite, result['moving_updates'][i], current))
        else:
          var.assign(tf.where(finite, current, result['saved_moving'][i]))
    if on_apply is not None:
      def apply_fn():
        on_apply()
        return tf.constant(True)
      tf.cond(finite, apply_fn, lambda: tf.constant(False))
    return tf.identity(finite)
