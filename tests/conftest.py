"""Test-wide settings, applied before any test imports TensorFlow's runtime."""

import gc
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_NUM_INTRAOP_THREADS', '1')  # see below
# XLA's CPU backend compiles at LLVM optimization level 0 in the suite: the
# same HLO programs, compiled for a third less CPU time (test_compiled_update
# and test_optimizations: 100 -> 66 CPU-s), and the steps the tests run are
# small. Runs and benchmarks keep XLA's default. `XLA_FLAGS= python -m
# pytest tests` runs the suite at the default level.
os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
import mtssl  # pylint: disable=unused-import,wrong-import-position  # TF settings first

import tensorflow as tf  # pylint: disable=wrong-import-position

# One intra-op thread in every process of the suite (the pytest workers and
# the processes they start inherit it), and one inter-op thread in the pytest
# workers: README's command runs two workers on two cores, beside the
# processes that the cluster and tool tests start, and TensorFlow's default
# pools, each as wide as the machine, make them contend (four training test
# files took 15 % less CPU and wall time). The intra-op count is the same
# everywhere because it picks oneDNN's kernels: a cluster test compares its
# workers' update with one computed here. Started processes keep their
# default inter-op pool: a localhost cluster's servers stall without it.
try:
  tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:  # The runtime was already initialized.
  pass
# Two logical CPU devices, so that multi-replica strategies (MirroredStrategy)
# run in tests on a machine without accelerators.
# (Asking for the logical devices would start the runtime, and the split
# would then be refused: ask for the configuration instead.)
_cpus = tf.config.list_physical_devices('CPU')
if _cpus and not tf.config.get_logical_device_configuration(_cpus[0]):
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


def pytest_collection_finish(session):
  del session
  # Python's cyclic collector walked TensorFlow's and the collected tests'
  # objects again and again (about 7 % of a test worker's CPU in a profile):
  # move what exists after collection out of its reach. Cycles made by the
  # tests are still collected as usual.
  gc.freeze()


def pytest_collection_modifyitems(items):
  # tf.test.TestCase.test_session is a context manager, not a test.
  items[:] = sorted((item for item in items if item.name != 'test_session'),
                    key=_file_rank)
