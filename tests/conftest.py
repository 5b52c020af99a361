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


# The longest files, longest first (seconds of an xdist worker in a full run,
# 2-core machine, 2026-12-07): README's test command hands whole files to two
# workers in collection order (`--no-loadscope-reorder`), so starting these
# first leaves short files, not a long one, for the end of the run. The order
# changes wall time only.
LONG_FILES = (
    'test_distributed.py',      # 202 s
    'test_data_service.py',     # 94
    'test_model_garden_driver.py',  # 88
    'test_slurm.py',            # 83
    'test_resnet_v2_parity.py',  # 71
    'test_trainer.py',          # 64
    'test_ti_training.py',      # 62
    'test_ms.py',               # 40-89 beside the others
    'test_optimizations.py',    # 51
    'test_real_data.py',        # 45
    'test_paper_config.py',     # 43
    'test_checkpoint_faults.py',  # 40
    'test_export.py',           # 37
)


def _file_rank(item):
  name = os.path.basename(str(item.path))
  return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)


def pytest_collection_modifyitems(items):
  # tf.test.TestCase.test_session is a context manager, not a test.
  items[:] = sorted((item for item in items if item.name != 'test_session'),
                    key=_file_rank)
