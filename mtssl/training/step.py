"""One compiled training step of one task (paper section 4: one head per step).

Forward pass of the trunk (+ lasso) and the task's head in training mode, the
task loss plus regularization (weight decay, lasso L1), gradients over the
task's variables (trunk, its head, its alpha), and the task's own optimizer
applying them through `core.GuardedUpdate` (only when everything is finite).
"""

from typing import Dict

import tensorflow as tf

from mtssl.models import multitask
from mtssl.training import core


class TaskTrainStep:
  """Compiled train step for task `name`; call with (features, labels)."""

  def __init__(self, model: multitask.MultiTaskModel, name: str, optimizer,
               jit_compile: bool = False, finite_check: str = 'fused',
               moving_statistics: str = 'snapshot', guard: str = 'cond'):
    """`finite_check`, `moving_statistics`, `guard`: core.GuardedUpdate's
    variants (the step's own update; `compute_gradients` snapshots)."""
    self.model = model
    self.name = name
    self.task = model.tasks[name]
    self.optimizer = optimizer
    if not model.trunk.built or not model.heads[name].built:
      raise ValueError(f'Build the model before making the {name} step '
                       f'(MultiTaskModel.build_all).')
    self.update = core.GuardedUpdate(
        optimizer, model.task_variables(name),
        core.moving_statistics(model.trunk, model.heads[name]),
        batch_norm_layers=core.batch_norms(model.trunk, model.heads[name]),
        finite_check=finite_check, moving_statistics=moving_statistics,
        guard=guard)
    self.variables = self.update.variables
    self.metrics = self.task.build_metrics()
    self._step = tf.function(self._train_step, jit_compile=jit_compile,
                             reduce_retracing=True, autograph=False)

  def compute_gradients(self, features, labels,
                        moving_statistics: str = 'snapshot'):
    """Forward pass, loss and gradients, without applying them (traceable).

    Returns a dict with 'loss', 'regularization', 'total', 'outputs' and
    `core.GuardedUpdate.gradients`'s 'grads', 'finite', and 'saved_moving'
    (the moving statistics are updated; `restore_moving_statistics` puts them
    back) or, with moving_statistics='deferred', 'moving_updates'.
    """

    def loss_fn():
      outputs = self.model.task_outputs(self.name, features, training=True)
      loss = tf.cast(self.task.loss(labels, outputs), tf.float32)
      regularization = self.model.regularization_loss(self.name)
      return {'loss': loss, 'regularization': regularization,
              'total': loss + regularization, 'outputs': outputs}

    result = self.update.gradients(loss_fn, moving_statistics)
    result.update(result.pop('losses'))
    return result

  def restore_moving_statistics(self, saved):
    self.update.restore_moving_statistics(saved)

  def _train_step(self, features, labels):
    features, labels = self.task.device_inputs(features, labels)
    result = self.compute_gradients(features, labels,
                                    self.update.moving_statistics)
    outputs = result['outputs']
    applied = self.update.apply(
        result, lambda: self.task.update_metrics(self.metrics, labels, outputs))
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
