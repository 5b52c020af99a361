"""Extraction runs: a folder of videos -> motion-label TFRecord shards, resumable.

The library behind tools/extract_motion_labels.py: videos go to worker
processes (mtssl.motion.videos), the main process writes shards
(mtssl.data.motion_records) and completion records. Output layout and
resume: README, "Extracting labels"; design: BUILD.md, "Extraction tool".
"""

import collections
import concurrent.futures
import dataclasses
import glob
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mtssl.utils import io_utils
from mtssl.data import motion_records as records
from mtssl.motion import videos as videos_lib

FORMAT_VERSION = 1
STATE_FILE = 'extraction.json'
SUMMARY_FILE = 'summary.json'
PROGRESS_DIR = 'progress'
BATCH_PATTERN = 'batch-{:05d}.json'


class ExtractionError(ValueError):
  """A run that cannot start (bad input or output directory, settings)."""


@dataclasses.dataclass
class Progress:
  """What the run has done so far (this invocation)."""
  videos_total: int            # videos to process in this invocation
  videos_resumed: int          # finished by an earlier invocation
  videos_done: int = 0
  videos_skipped: int = 0
  frames_decoded: int = 0
  frames_rejected: int = 0
  examples: int = 0
  shards: int = 0
  seconds: float = 0.0

  @property
  def frames_per_second(self) -> float:
    return self.frames_decoded / self.seconds if self.seconds > 0 else 0.0

  def line(self) -> str:
    eta = ''
    if 0 < self.videos_done < self.videos_total:
      remaining = self.seconds / self.videos_done * (
          self.videos_total - self.videos_done)
      eta = f' | eta {int(remaining) // 60}m{int(remaining) % 60:02d}s'
    return (f'[{self.videos_done}/{self.videos_total} videos, '
            f'{self.videos_skipped} skipped] {self.frames_decoded} frames '
            f'({self.frames_per_second:.1f} fps) | {self.examples} examples, '
            f'{self.frames_rejected} frames rejected | {self.shards} shards'
            f'{eta}')


# Worker side: mtssl.motion.videos.init_worker / work, which import no
# TensorFlow, so that a spawned worker process starts in a fraction of a
# second.


def _pool(workers: int, options):
  return concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=multiprocessing.get_context('spawn'),
      initializer=videos_lib.init_worker, initargs=(options,))


def _crashed(key: str) -> videos_lib.VideoResult:
  return videos_lib.VideoResult(
      key, reason=videos_lib.FAILED,
      message='the worker process died while processing this video')


def _results_in_order(tasks: Sequence[Tuple[str, str]], options,
                      workers: int, work: Callable = videos_lib.work
                      ) -> Iterator[videos_lib.VideoResult]:
  """VideoResults in task order, computed by `workers` processes."""
  if workers <= 1:
    videos_lib.init_worker(options)
    for task in tasks:
      yield work(task)
    return
  position = 0
  while position < len(tasks):
    executor = _pool(workers, options)
    in_flight = collections.deque()
    broken = False
    try:
      while position < len(tasks) or in_flight:
        while position < len(tasks) and len(in_flight) < 2 * workers:
          try:
            future = executor.submit(work, tasks[position])
          except BrokenProcessPool:
            # A worker died since the last result; the task is resubmitted.
            broken = True
            break
          in_flight.append((tasks[position], future))
          position += 1
        if broken:
          break
        _, future = in_flight[0]
        try:
          result = future.result()
        except BrokenProcessPool:
          broken = True
          break
        in_flight.popleft()
        yield result
    finally:
      executor.shutdown(wait=not broken, cancel_futures=True)
    if broken:
      # Retry every video that was in flight alone, to find the culprit.
      for task, _ in in_flight:
        solo = _pool(1, options)
        try:
          yield solo.submit(work, task).result()
        except BrokenProcessPool:
          yield _crashed(task[1])
        finally:
          solo.shutdown(wait=True, cancel_futures=True)


# Main side ---------------------------------------------------------------------


def _settings(input_dir: str, options: videos_lib.ExtractOptions) -> dict:
  return {'format_version': FORMAT_VERSION,
          'input_dir': os.path.abspath(input_dir),
          'options': options.to_json()}


def _clear_outputs(output_dir: str):
  for pattern in ('shard-*.tfrecord', '.shard-*.tmp-*', STATE_FILE,
                  SUMMARY_FILE):
    for path in glob.glob(os.path.join(output_dir, pattern)):
      os.remove(path)
  shutil.rmtree(os.path.join(output_dir, PROGRESS_DIR), ignore_errors=True)


def _check_settings(output_dir: str, settings: dict):
  path = os.path.join(output_dir, STATE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous != settings:
      changed = sorted(_differences(previous, settings))
      raise ExtractionError(
          f'{output_dir!r} holds an extraction made with other settings '
          f'(differs in: {", ".join(changed) or "format"}). Use another '
          f'output directory, or --overwrite to start it afresh.')
  else:
    io_utils.atomic_write_json(path, settings)


def _differences(a, b, prefix=''):
  if isinstance(a, dict) and isinstance(b, dict):
    for key in set(a) | set(b):
      yield from _differences(a.get(key), b.get(key), f'{prefix}{key}.')
  elif a != b:
    yield prefix.rstrip('.')


def load_batches(output_dir: str) -> List[dict]:
  """The completion records of an output directory, in batch order."""
  batches = []
  pattern = os.path.join(output_dir, PROGRESS_DIR, 'batch-*.json')
  for path in sorted(glob.glob(pattern)):
    with open(path) as f:
      batch = json.load(f)
    batch['id'] = int(os.path.basename(path)[6:11])
    batches.append(batch)
  return batches


def _clean_partial_work(output_dir: str, batches: List[dict]):
  """Deletes shards no completion record names, and temporary files."""
  named = {b['shard'] for b in batches if b.get('shard')}
  for path in glob.glob(os.path.join(output_dir, 'shard-*.tfrecord')):
    if os.path.basename(path) not in named:
      os.remove(path)
  for pattern in ('.shard-*.tmp-*', os.path.join(PROGRESS_DIR, '.batch-*')):
    for path in glob.glob(os.path.join(output_dir, pattern)):
      os.remove(path)


def summarize(batches: Sequence[dict]) -> dict:
  """Totals over completion records: videos, frames, reasons, examples."""
  skipped = collections.Counter()
  rejected = collections.Counter()
  frames = examples = done = 0
  for batch in batches:
    for record in batch['videos'].values():
      frames += record['frames_decoded']
      if record['reason']:
        skipped[record['reason']] += 1
      else:
        done += 1
        examples += record['examples']
        rejected.update(record['rejected'])
  return {
      'videos': {'total': done + sum(skipped.values()), 'processed': done,
                 'skipped': dict(sorted(skipped.items()))},
      'frames': {'decoded': frames, 'labelled': examples + sum(rejected.values()),
                 'accepted': examples, 'rejected': dict(sorted(rejected.items()))},
      'examples': examples,
      'shards': sorted(b['shard'] for b in batches if b.get('shard')),
  }


def run_extraction(input_dir: str, output_dir: str,
                   options: Optional[videos_lib.ExtractOptions] = None,
                   workers: Optional[int] = None,
                   examples_per_shard: int = 1000,
                   overwrite: bool = False,
                   max_pending_videos: int = 256,
                   progress: Optional[Callable[[Progress], None]] = None
                   ) -> dict:
  """Extracts motion labels from every video below `input_dir`.

  Returns the summary (also written to output_dir/summary.json). Raises
  ExtractionError when the run cannot start; bad videos never stop it.
  """
  options = options or videos_lib.ExtractOptions()
  options.validate()
  if examples_per_shard < 1:
    raise ExtractionError(
        f'examples_per_shard must be positive, got {examples_per_shard}.')
  if not os.path.isdir(input_dir):
    raise ExtractionError(f'Video folder {input_dir!r} does not exist or is '
                          f'not a directory.')
  keys = videos_lib.list_videos(input_dir)
  if not keys:
    raise ExtractionError(
        f'Video folder {input_dir!r} holds no video files '
        f'({", ".join(videos_lib.VIDEO_EXTENSIONS)}).')
  # TensorFlow (for writing TFRecords) only once the run can start.
  workers = max(1, workers or os.cpu_count() or 1)
  os.makedirs(os.path.join(output_dir, PROGRESS_DIR), exist_ok=True)
  if overwrite:
    _clear_outputs(output_dir)
    os.makedirs(os.path.join(output_dir, PROGRESS_DIR), exist_ok=True)
  _check_settings(output_dir, _settings(input_dir, options))
  batches = load_batches(output_dir)
  _clean_partial_work(output_dir, batches)
  finished = {key for b in batches for key in b['videos']}
  next_id = max((b['id'] for b in batches), default=-1) + 1
  todo = [(os.path.join(input_dir, k), k) for k in keys if k not in finished]

  state = Progress(videos_total=len(todo), videos_resumed=len(finished))
  start = time.monotonic()
  pending: Dict[str, dict] = {}
  buffer: List[bytes] = []

  def flush():
    nonlocal next_id
    if not pending:
      return
    shard = None
    if buffer:
      shard = records.SHARD_PATTERN.format(next_id)
      records.write_shard(os.path.join(output_dir, shard), buffer)
      state.shards += 1
    batch = {'shard': shard, 'examples': len(buffer), 'videos': dict(pending)}
    io_utils.atomic_write_json(
        os.path.join(output_dir, PROGRESS_DIR, BATCH_PATTERN.format(next_id)),
        batch)
    batch['id'] = next_id
    batches.append(batch)
    next_id += 1
    pending.clear()
    buffer.clear()

  height, width = options.label.height, options.label.width
  for result in _results_in_order(todo, options, workers):
    pending[result.key] = result.record()
    for ex in result.examples:
      buffer.append(records.serialize_example(
          ex.frame, _label_array(ex.label, options), height, width,
          result.key, ex.frame_index, ex.foreground))
    state.videos_done += 1
    state.videos_skipped += result.reason is not None
    state.frames_decoded += result.frames_decoded
    state.frames_rejected += sum(result.rejected.values())
    state.examples += len(result.examples)
    state.seconds = time.monotonic() - start
    if len(buffer) >= examples_per_shard or len(pending) >= max_pending_videos:
      flush()
    if progress is not None:
      progress(state)
  flush()
  state.seconds = time.monotonic() - start
  summary = summarize(batches)
  summary['this_run'] = {
      'videos': state.videos_done, 'videos_resumed': state.videos_resumed,
      'frames_decoded': state.frames_decoded,
      'seconds': round(state.seconds, 3),
      'frames_per_second': round(state.frames_per_second, 2),
      'workers': workers,
  }
  summary['settings'] = _settings(input_dir, options)
  io_utils.atomic_write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
  return summary


def _label_array(data: bytes, options) -> np.ndarray:
  h, w = options.label.label_size
  return np.frombuffer(data, np.uint8).reshape(h, w)
