"""Helpers that extraction tests run in worker processes (no TensorFlow here,
so spawned workers start fast)."""

import os

from mtssl.motion import videos


def crash_on_marker(task):
  """Worker function: kills its process for videos named '*crash*'."""
  path, key = task
  del path
  if 'crash' in key:
    os._exit(3)  # pylint: disable=protected-access
  return videos.VideoResult(key, frames_decoded=1)
