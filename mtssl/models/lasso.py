"""`UnitLasso`: a lasso combination of block-3 units (paper section 3.2, eq. 1).

A task's representation is sum_m alpha_m Unit_m with ||alpha||_2 = 1 and an
L1 penalty on alpha. Choices: BUILD.md, "Lasso".

Typical use:

    lasso = UnitLasso(trunk.unit_names('block3'), l1_weight=1e-3)
    representation = lasso(trunk(images))   # the end points dict
"""

from typing import Dict, Sequence

import tensorflow as tf
import tf_keras


class UnitLasso(tf_keras.layers.Layer):
  """sum_m alpha_m * unit_m with ||alpha||_2 = 1 and an L1 penalty on alpha."""

  def __init__(self, unit_names: Sequence[str], l1_weight: float = 0.0,
               **kwargs):
    super().__init__(**kwargs)
    if not unit_names:
      raise ValueError('UnitLasso needs at least one unit.')
    if l1_weight < 0:
      raise ValueError(f'l1_weight must be >= 0, got {l1_weight}.')
    self.unit_names = list(unit_names)
    self.l1_weight = float(l1_weight)
    initial = [0.0] * (len(self.unit_names) - 1) + [1.0]
    self.v = self.add_weight(
        name='v', shape=[len(self.unit_names)],
        initializer=tf_keras.initializers.Constant(initial), trainable=True,
        dtype=tf.float32)

  @property
  def alpha(self) -> tf.Tensor:
    return self.v / tf.maximum(tf.norm(self.v), 1e-12)

  def call(self, end_points: Dict[str, tf.Tensor]):
    missing = [n for n in self.unit_names if n not in end_points]
    if missing:
      raise ValueError(f'{self.name}: the trunk has no end point(s) {missing}.')
    alpha = self.alpha
    if self.l1_weight:
      self.add_loss(self.l1_weight * tf.reduce_sum(tf.abs(alpha)))
    units = [end_points[n] for n in self.unit_names]
    shapes = {tuple(u.shape[1:]) for u in units}
    if len(shapes) > 1:
      raise ValueError(
          f'{self.name}: the units have different shapes {sorted(shapes)}; the '
          f'lasso needs every unit at one resolution. At the nominal stride '
          f'the last unit of a block is strided: use output_stride 8 or 16.')
    alpha = tf.cast(alpha, units[0].dtype)
    return tf.add_n([alpha[m] * u for m, u in enumerate(units)])

  def get_config(self):
    config = super().get_config()
    config.update(unit_names=self.unit_names, l1_weight=self.l1_weight)
    return config
