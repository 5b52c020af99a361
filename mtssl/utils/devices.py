"""TensorFlow's device initialisation without its GPU-probe error line on
machines that have no NVIDIA driver.

TensorFlow's CUDA build logs `failed call to cuInit` at ERROR level on every
machine without a GPU, a level TF_CPP_MIN_LOG_LEVEL=2 does not hide. The
first device listing runs with the C++ stderr captured; every captured line is
written back except that one, and that one too when an NVIDIA driver is
present (then it reports a real problem).
"""

import os
import sys
import tempfile

PROBE_ERROR = 'failed call to cuInit'
DRIVER_NODE = '/dev/nvidiactl'


def initialize_quietly():
  """Initializes TensorFlow's devices; returns the physical devices."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if os.path.exists(DRIVER_NODE):
    return tf.config.list_physical_devices()
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      devices = tf.config.list_physical_devices()
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    captured.seek(0)
    text = captured.read().decode('utf-8', 'replace')
  kept = [line for line in text.splitlines(keepends=True)
          if PROBE_ERROR not in line]
  if kept:
    sys.stderr.write(''.join(kept))
    sys.stderr.flush()
  return devices
