"""The machine a benchmark runs on: devices, CPU, versions, peak TFLOP/s, memory."""

import datetime
import os
import platform
import resource
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tf_keras

# Dense peak TFLOP/s by device-name substring (first match wins): bf16/fp16
# tensor cores, TF32 tensor cores (what fp32 convolutions and matmuls use
# when TensorFlow's TF32 execution is on, its default on Ampere and later),
# and plain fp32. NVIDIA datasheets (the H200 has the H100 SXM's compute).
PEAK_TFLOPS = (
    ('H100 PCIe', {'bf16': 756.0, 'fp16': 756.0, 'tf32': 378.0, 'fp32': 51.2}),
    ('H100 NVL', {'bf16': 835.0, 'fp16': 835.0, 'tf32': 418.0, 'fp32': 60.0}),
    ('H100', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),
    ('H200', {'bf16': 989.4, 'fp16': 989.4, 'tf32': 494.7, 'fp32': 66.9}),
    ('A100', {'bf16': 312.0, 'fp16': 312.0, 'tf32': 156.0, 'fp32': 19.5}),
)
H100_BF16_PEAK_TFLOPS = 989.4


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def accelerators() -> List[Dict[str, str]]:
  """Name and details of every GPU TensorFlow sees."""
  out = []
  for gpu in tf.config.list_physical_devices('GPU'):
    details = tf.config.experimental.get_device_details(gpu)
    out.append({'device': gpu.name,
                'name': details.get('device_name', gpu.name),
                'compute_capability': '.'.join(
                    map(str, details.get('compute_capability', ())))})
  return out


def has_gpu() -> bool:
  return bool(tf.config.list_physical_devices('GPU'))


def compute_device() -> str:
  """The device the step benchmark places its batches on."""
  return '/GPU:0' if has_gpu() else '/CPU:0'


def cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def device_name() -> str:
  gpus = accelerators()
  if gpus:
    return gpus[0]['name']
  return f'CPU: {cpu_model()} ({cpu_cores()} cores)'


def environment() -> Dict[str, object]:
  import cv2  # pylint: disable=g-import-not-at-top
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'device': device_name(),
      'accelerators': accelerators(),
      'cpu': cpu_model(),
      'cpu_cores': cpu_cores(),
      'memory_gib': round(os.sysconf('SC_PAGE_SIZE') *
                          os.sysconf('SC_PHYS_PAGES') / 2 ** 30, 1),
      'load_average': load_average(),
      'python': platform.python_version(),
      'platform': platform.platform(),
      'tensorflow': tf.__version__,
      'tf_keras': tf_keras.__version__,
      'numpy': np.__version__,
      'opencv': cv2.__version__,
      'tf32_enabled': bool(
          tf.config.experimental.tensor_float_32_execution_enabled()),
  }


def load_average() -> List[float]:
  return [round(x, 2) for x in os.getloadavg()]


def peak_tflops(name: str, precision: str,
                tf32: Optional[bool] = None) -> Optional[float]:
  """Dense peak of a known accelerator for a precision, else None."""
  if tf32 is None:
    tf32 = tf.config.experimental.tensor_float_32_execution_enabled()
  for key, peaks in PEAK_TFLOPS:
    if key.lower() in name.lower():
      if precision == 'fp32':
        return peaks['tf32'] if tf32 else peaks['fp32']
      return peaks[precision]
  return None


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def default_name() -> str:
  """<date>-<device kind>, e.g. 2026-11-22-cpu or 2026-11-30-h200."""
  date = datetime.date.today().isoformat()
  gpus = accelerators()
  kind = (gpus[0]['name'].replace('NVIDIA ', '').split()[0].lower() if gpus
          else 'cpu')
  return f'{date}-{kind}'


# Device memory -----------------------------------------------------------------

GPU_MEMORY_DEVICE = 'GPU:0'


def reset_peak_memory() -> None:
  """Restarts the first GPU's peak-memory count; nothing on a CPU."""
  if has_gpu():
    tf.config.experimental.reset_memory_stats(GPU_MEMORY_DEVICE)


def peak_memory_mib() -> Optional[float]:
  """Peak bytes allocated on the first GPU since the last reset, in MiB;
  None without a GPU."""
  if not has_gpu():
    return None
  info = tf.config.experimental.get_memory_info(GPU_MEMORY_DEVICE)
  return round(info['peak'] / 2 ** 20, 1)
