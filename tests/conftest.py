"""Test-wide settings, applied before any test imports TensorFlow's runtime."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import mtssl  # pylint: disable=unused-import,wrong-import-position  # TF settings first

import tensorflow as tf  # pylint: disable=wrong-import-position

# Two logical CPU devices, so that multi-replica strategies (MirroredStrategy)
# run in tests on a machine without accelerators.
_cpus = tf.config.list_physical_devices('CPU')
if _cpus and not tf.config.list_logical_devices('CPU')[1:]:
  try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  except RuntimeError:  # The runtime was already initialized.
    pass


def pytest_collection_modifyitems(items):
  # tf.test.TestCase.test_session is a context manager, not a test.
  items[:] = [item for item in items if item.name != 'test_session']
