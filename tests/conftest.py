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


# The files that take longest (over ~40 s each on the 2-core machine), in
# that order, run first: with pytest-xdist handing out whole files
# (`-n 2 --dist loadfile`, README's test command), the workers then finish
# close together instead of one starting a long file last.
LONGEST_FIRST = ('test_distributed.py', 'test_slurm.py',
                 'test_motion_labels.py', 'test_model_garden_driver.py',
                 'test_resnet_v2_parity.py', 'test_trainer.py',
                 'test_paper_config.py', 'test_evaluate_detection.py',
                 'test_export.py', 'test_slim_checkpoint.py', 'test_rp.py',
                 'test_real_data.py', 'test_evaluate_depth.py',
                 'test_checkpoint_faults.py', 'test_data_service.py')


def _rank(item):
  name = os.path.basename(str(item.path))
  return (LONGEST_FIRST.index(name) if name in LONGEST_FIRST
          else len(LONGEST_FIRST))


def pytest_collection_modifyitems(items):
  # tf.test.TestCase.test_session is a context manager, not a test.
  items[:] = sorted((item for item in items if item.name != 'test_session'),
                    key=_rank)
