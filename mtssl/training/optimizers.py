"""`TF1RMSProp`: TF1's RMSPropOptimizer as a tf_keras optimizer (the paper's).

Runs TF1's fused ResourceApplyRMSProp kernel with the mean-square slot
starting at ones; defaults decay 0.9, momentum 0, epsilon 1e-10. How it
differs from tf_keras' RMSprop: BUILD.md, "Optimizer".

Typical use:

    optimizer = TF1RMSProp(learning_rate=1e-3)
"""

import tensorflow as tf
import tf_keras
from tf_keras.optimizers import legacy as legacy_optimizers


class TF1RMSProp(legacy_optimizers.RMSprop):
  """`tf.compat.v1.train.RMSPropOptimizer(lr, decay, momentum, epsilon)`."""

  def __init__(self, learning_rate=0.001, decay=0.9, momentum=0.0,
               epsilon=1e-10, name='RMSProp', **kwargs):
    super().__init__(learning_rate=learning_rate, rho=decay, momentum=momentum,
                     epsilon=epsilon, centered=False, name=name, **kwargs)

  def _create_slots(self, var_list):
    for var in var_list:
      self.add_slot(var, 'rms', initializer='ones')
    for var in var_list:
      self.add_slot(var, 'momentum')

  def _resource_apply_dense(self, grad, var, apply_state=None):
    var_device, var_dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((var_device, var_dtype))
                    or self._fallback_apply_state(var_device, var_dtype))
    return tf.raw_ops.ResourceApplyRMSProp(
        var=var.handle, ms=self.get_slot(var, 'rms').handle,
        mom=self.get_slot(var, 'momentum').handle, lr=coefficients['lr_t'],
        rho=coefficients['rho'], momentum=coefficients['momentum'],
        epsilon=coefficients['epsilon'], grad=grad,
        use_locking=self._use_locking)

  def _resource_apply_sparse(self, grad, var, indices, apply_state=None):
    var_device, var_dtype = var.device, var.dtype.base_dtype
    coefficients = ((apply_state or {}).get((var_device, var_dtype))
                    or self._fallback_apply_state(var_device, var_dtype))
    return tf.raw_ops.ResourceSparseApplyRMSProp(
        var=var.handle, ms=self.get_slot(var, 'rms').handle,
        mom=self.get_slot(var, 'momentum').handle, lr=coefficients['lr_t'],
        rho=coefficients['rho'], momentum=coefficients['momentum'],
        epsilon=coefficients['epsilon'], grad=grad, indices=indices,
        use_locking=self._use_locking)

  def get_config(self):
    config = super().get_config()
    config['decay'] = config.pop('rho')
    config.pop('centered', None)
    return config


def rmsprop_update(var, ms, mom, grad, lr, rho, momentum, epsilon):
  """(new ms, new mom, new var) of one TF1 RMSProp step, as element-wise math.

  The operations and their order are those XLA lowers ResourceApplyRMSProp
  to, so under XLA the result is the kernel's bit for bit.
  """
  new_ms = tf.square(grad) * (1.0 - rho) + ms * rho
  new_mom = mom * momentum + (grad * lr) * tf.math.rsqrt(new_ms + epsilon)
  return new_ms, new_mom, var - new_mom


tf_keras.utils.get_custom_objects()['TF1RMSProp'] = TF1RMSProp
