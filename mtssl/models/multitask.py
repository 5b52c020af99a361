"""The multi-task network: one shared trunk, one head (and lasso) per task.

Figure 1 of the paper. Only one head is active per step
(`task_outputs(name, ...)`); the trunk's variables are shared by all tasks and
each head's variables belong to its task alone. Nothing here is specific to a
task: tasks supply their trunk inputs, heads and losses (mtssl.tasks.base).

Checkpoint layout (`checkpoint_items`): `backbone` is the trunk, so that the
trunk restores on its own (`mtssl.backbones.slim_checkpoint.restore_trunk`,
Model Garden's `init_checkpoint_modules: backbone`); `heads` and `lasso` hold
one entry per task.
"""

from typing import Dict, Mapping, Optional

import tensorflow as tf
import tf_keras

from mtssl.models import lasso as lasso_lib
from mtssl.backbones import resnet_v2
from mtssl.tasks import base


class MultiTaskModel(tf_keras.Model):
  """Shared trunk + per-task heads, optionally with a per-task unit lasso.

  Args:
    trunk: the shared ResNetV2 trunk.
    tasks: {name: Task}.
    lasso_l1: None for the naive architecture (heads on the trunk output);
      a weight >= 0 to feed each head a lasso combination of the units of
      the trunk's last block, with that L1 weight.
  """

  def __init__(self, trunk: resnet_v2.ResNetV2, tasks: Mapping[str, base.Task],
               lasso_l1: Optional[float] = None, **kwargs):
    kwargs.setdefault('name', 'multitask')
    super().__init__(**kwargs)
    if not tasks:
      raise ValueError('MultiTaskModel needs at least one task.')
    self.trunk = trunk
    self.tasks = dict(tasks)
    self.heads = {name: task.build_head() for name, task in self.tasks.items()}
    self.lasso_l1 = lasso_l1
    if lasso_l1 is not None:
      last_block = trunk.block_specs[-1].scope
      units = trunk.unit_names(last_block)
      self.lasso = {name: lasso_lib.UnitLasso(units, lasso_l1,
                                              name=f'lasso_{name}')
                    for name in self.tasks}
    else:
      self.lasso = {}

  @property
  def task_names(self):
    return list(self.tasks)

  def representation(self, name: str, images, training=None):
    end_points = self.trunk(images, training=training)
    if name in self.lasso:
      return self.lasso[name](end_points)
    return end_points[self.trunk.output_name]

  def task_outputs(self, name: str, features: Dict[str, tf.Tensor],
                   training=None):
    """Runs task `name`'s forward pass: trunk (+ lasso) + its head."""
    task = self.tasks[name]
    images = task.trunk_images(features)
    representation = self.representation(name, images, training=training)
    return self.heads[name](representation, training=training)

  def task_variables(self, name: str):
    """Trainable variables one task's step updates: trunk, its head, its alpha."""
    variables = list(self.trunk.trainable_variables)
    variables += self.heads[name].trainable_variables
    if name in self.lasso:
      variables += self.lasso[name].trainable_variables
    return variables

  def regularization_loss(self, name: str) -> tf.Tensor:
    """Weight decay of the trunk and the head, plus the task's lasso L1."""
    losses = list(self.trunk.losses) + list(self.heads[name].losses)
    if name in self.lasso:
      losses += list(self.lasso[name].losses)
    if not losses:
      return tf.constant(0.0)
    return tf.add_n([tf.cast(l, tf.float32) for l in losses])

  def build_all(self, example_features: Mapping[str, Dict[str, tf.Tensor]]):
    """Creates every variable by running each task once (inference mode) on
    a batch of its pipeline."""
    for name, features in example_features.items():
      features, _ = self.tasks[name].device_inputs(features, {})
      self.task_outputs(name, features, training=False)

  @property
  def checkpoint_items(self):
    return {'backbone': self.trunk, 'heads': self.heads, 'lasso': self.lasso}

  def call(self, inputs, training=None):
    raise NotImplementedError(
        'MultiTaskModel runs one task at a time: use task_outputs(name, ...).')
