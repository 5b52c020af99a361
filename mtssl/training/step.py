"""One compiled training step of one task (paper section 4: one head per step).

`TaskTrainStep(model, name, optimizer)` runs, inside one tf.function (with
XLA when asked):

  forward (trunk [+ lasso] + the task's head, training mode)
  -> task loss + regularization (trunk and head weight decay, lasso L1)
  -> gradients over the task's variables (trunk, its head, its alpha)
  -> the task's own optimizer applies them, only if everything is finite.

A non-finite step changes nothing: weights and optimizer slots are not
updated, and the batch-norm moving statistics that the forward pass moved are
restored. The caller sees `finite == False` and decides when to give up.
Under fp16 mixed precision the optimizer is a LossScaleOptimizer, which skips
overflowing steps itself (and lowers its scale); a non-finite *loss* is still
reported as non-finite.
"""

from typing import Dict

import tensorflow as tf
import tf_keras

from mtssl import model as model_lib


def _is_loss_scale_optimizer(optimizer) -> bool:
  return isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)


def _moving_statistics(module):
  return [v for v in module.non_trainable_variables
          if 'moving_mean' in v.name or 'moving_variance' in v.name]


class TaskTrainStep:
  """Compiled train step for task `name`; call with (features, labels)."""

  def __init__(self, model: model_lib.MultiTaskModel, name: str, optimizer,
               jit_compile: bool = False):
    self.model = model
    self.name = name
    self.task = model.tasks[name]
    self.optimizer = optimizer
    if not model.trunk.built or not model.heads[name].built:
      raise ValueError(f'Build the model before making the {name} step '
                       f'(MultiTaskModel.build_all).')
    self.variables = model.task_variables(name)
    self.moving = (_moving_statistics(model.trunk)
                   + _moving_statistics(model.heads[name]))
    # Slots exist before tracing, so the conditional apply creates nothing.
    inner = optimizer.inner_optimizer if _is_loss_scale_optimizer(
        optimizer) else optimizer
    inner._create_all_weights(self.variables)  # pylint: disable=protected-access
    self.metrics = self.task.build_metrics()
    self._step = tf.function(self._train_step, jit_compile=jit_compile,
                             reduce_retracing=True)

  def compute_gradients(self, features, labels):
    """Forward pass, loss and gradients, without applying them (traceable).

    Returns a dict with 'loss', 'regularization', 'total', 'grads' (aligned
    with `self.variables`, None where a variable has no gradient),
    'finite' (whether the step may be applied: under fp16 loss scaling, the
    loss is finite; otherwise loss and gradients are), 'outputs' and
    'saved_moving' (the batch-norm moving statistics before this forward
    pass, for `restore_moving_statistics` when the step is dropped).
    """
    saved = [tf.identity(v) for v in self.moving]
    scaled = _is_loss_scale_optimizer(self.optimizer)
    with tf.GradientTape() as tape:
      outputs = self.model.task_outputs(self.name, features, training=True)
      loss = tf.cast(self.task.loss(labels, outputs), tf.float32)
      regularization = self.model.regularization_loss(self.name)
      total = loss + regularization
      objective = self.optimizer.get_scaled_loss(total) if scaled else total
    grads = tape.gradient(objective, self.variables)
    if scaled:
      grads = self.optimizer.get_unscaled_gradients(grads)
    grads_finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
    loss_finite = tf.math.is_finite(total)
    # The loss-scale optimizer skips overflowing gradients itself.
    finite = loss_finite if scaled else tf.logical_and(loss_finite, grads_finite)
    return {'loss': loss, 'regularization': regularization, 'total': total,
            'grads': grads, 'finite': finite, 'outputs': outputs,
            'saved_moving': saved}

  def restore_moving_statistics(self, saved):
    """Puts back the moving statistics a dropped step's forward pass moved."""
    for var, value in zip(self.moving, saved):
      var.assign(value)

  def _train_step(self, features, labels):
    result = self.compute_gradients(features, labels)
    grads, outputs = result['grads'], result['outputs']

    def apply():
      self.optimizer.apply_gradients(
          [(g, v) for g, v in zip(grads, self.variables) if g is not None])
      self.task.update_metrics(self.metrics, labels, outputs)
      return tf.constant(True)

    def skip():
      self.restore_moving_statistics(result['saved_moving'])
      return tf.constant(False)

    applied = tf.cond(result['finite'], apply, skip)
    return {'loss': result['loss'], 'regularization': result['regularization'],
            'total': result['total'], 'finite': applied, 'outputs': outputs}

  def __call__(self, features: Dict[str, tf.Tensor],
               labels: Dict[str, tf.Tensor]):
    return self._step(features, labels)

  def metric_results(self) -> Dict[str, float]:
    return {k: float(m.result()) for k, m in self.metrics.items()}

  def reset_metrics(self):
    for m in self.metrics.values():
      m.reset_state()
