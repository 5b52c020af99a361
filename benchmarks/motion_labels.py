r"""Motion-label extraction: label quality and throughput on this machine.

  python benchmarks/motion_labels.py                # everything
  python benchmarks/motion_labels.py --parts=throughput --videos=2 --frames=40

Parts (--parts, comma-separated):

  quality     foreground IoU of the extracted 30x40 labels against the exact
              masks of the built-in synthetic video, per camera motion
              (--clips clips of stream --seed each, frame 0 of each clip).
  throughput  frames per second of the whole extraction (decode, resize,
              flow, tracking, labels, JPEG encoding; TFRecord writing for the
              parallel run): one process labelling every 10th frame (the
              tool's default) and every frame, then the tool's parallel run
              over all cores. Input: --videos synthetic videos of --frames
              frames at 240x320, written as mp4.
  flow        DIS (the extraction's flow) against Farneback (IDT's flow) on
              known pans of synthetic scenes: median end-point error and
              milliseconds per frame pair.

Prints one JSON object. Timings depend on the machine and its load; they are
reported, never asserted. `frames_per_cpu_second` (frames per second of CPU
time used, all threads) is the figure least affected by other jobs sharing
the machine.
"""

import json
import os
import resource
import tempfile
import time

from absl import app
from absl import flags

import cv2
import numpy as np

from mtssl.data import synthetic
from mtssl.data import synthetic_video
from mtssl.data import motion_extraction as extraction
from mtssl.motion import labels as labels_lib
from mtssl.motion import videos
# pylint: enable=wrong-import-position

_PARTS = flags.DEFINE_list('parts', ['quality', 'throughput', 'flow'],
                           'Which parts to run.')
_CLIPS = flags.DEFINE_integer('clips', 40, 'Clips per camera motion (quality).')
_SEED = flags.DEFINE_integer('seed', 0, 'Synthetic stream (quality).')
_VIDEOS = flags.DEFINE_integer('videos', 8, 'Videos (throughput).')
_FRAMES = flags.DEFINE_integer('frames', 100, 'Frames per video (throughput).')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Workers for the parallel run; '
                                '0: one per core.')


def quality(clips, seed):
  labeler = labels_lib.MotionLabeler()
  out = {}
  for camera in ('pan_zoom', 'pan', 'zoom', 'static'):
    ious, rejected = [], 0
    for index in range(clips):
      clip = synthetic_video.render_clip(seed, index, 10, camera=camera)
      result = labeler.label_clip(clip.frames)
      truth = labels_lib.downsample_mask(clip.masks[0], 8)
      ious.append(labels_lib.foreground_iou(result.label, truth))
      rejected += result.reason is not None
    out[camera] = {'mean_iou': round(float(np.mean(ious)), 3),
                   'median_iou': round(float(np.median(ious)), 3),
                   'min_iou': round(float(np.min(ious)), 3),
                   'rejected': rejected, 'clips': clips}
  empty = []
  for camera in ('static', 'pan', 'pan_zoom'):
    for index in range(clips // 4):
      clip = synthetic_video.render_clip(seed, index, 10, camera=camera,
                                         num_movers=0)
      empty.append(labeler.label_clip(clip.frames).foreground)
  out['no_movers_max_foreground'] = round(float(np.max(empty)), 4)
  return out


def _cpu_seconds_with_children():
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(num_videos, frames, workers):
  out = {'cpu_count': os.cpu_count(), 'videos': num_videos,
         'frames_per_video': frames}
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'videos')
    os.makedirs(root)
    for i in range(num_videos):
      clip = synthetic_video.render_clip(11, i, frames)
      synthetic_video.write_video(os.path.join(root, f'v{i}.mp4'), clip.frames)
    keys = videos.list_videos(root)
    for step in (10, 1):
      options = videos.ExtractOptions(frame_step=step)
      labeler = labels_lib.MotionLabeler(options.label)
      start, cpu_start = time.monotonic(), time.process_time()
      decoded = labelled = 0
      for key in keys:
        result = videos.process_video(os.path.join(root, key), key, options,
                                      labeler)
        decoded += result.frames_decoded
        labelled += len(result.examples) + sum(result.rejected.values())
      seconds = time.monotonic() - start
      cpu_seconds = time.process_time() - cpu_start
      out[f'one_process_frame_step_{step}'] = {
          'frames_per_second': round(decoded / seconds, 2),
          'labelled_frames_per_second': round(labelled / seconds, 2),
          'frames_per_cpu_second': round(decoded / cpu_seconds, 2),
          'seconds': round(seconds, 2)}
    before = _cpu_seconds_with_children()
    summary = extraction.run_extraction(
        root, os.path.join(tmp, 'out'), workers=workers or None)
    run = dict(summary['this_run'])
    # Main process and (finished) worker processes together.
    run['frames_per_cpu_second'] = round(
        run['frames_decoded'] / (_cpu_seconds_with_children() - before), 2)
    out['parallel_frame_step_10'] = run
  return out


def flow_comparison(pairs=10):
  dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
  dis.setPatchSize(8)
  dis.setPatchStride(4)
  methods = {
      'dis_medium_patch8': lambda a, b: dis.calc(a, b, None),
      'farneback': lambda a, b: cv2.calcOpticalFlowFarneback(
          a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0),
  }
  shift = np.array([3.0, 1.5], np.float32)
  errors = {k: [] for k in methods}
  times = {k: [] for k in methods}
  for i in range(pairs):
    gray0 = cv2.cvtColor(synthetic.synthetic_image(0, i, 240, 320),
                         cv2.COLOR_RGB2GRAY)
    move = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    gray1 = cv2.warpAffine(gray0, move, (320, 240),
                           borderMode=cv2.BORDER_REFLECT)
    for name, method in methods.items():
      start = time.monotonic()
      flow = method(gray0, gray1)
      times[name].append(time.monotonic() - start)
      inner = flow[20:-20, 20:-20] - shift
      errors[name].append(np.median(np.hypot(inner[..., 0], inner[..., 1])))
  return {name: {'median_end_point_error_px': round(float(np.mean(errors[name])), 3),
                 'ms_per_pair': round(1000 * float(np.mean(times[name])), 1)}
          for name in methods}


def main(argv):
  del argv
  report = {}
  parts = set(_PARTS.value)
  unknown = parts - {'quality', 'throughput', 'flow'}
  if unknown:
    raise app.UsageError(f'Unknown parts: {sorted(unknown)}')
  if 'quality' in parts:
    report['quality'] = quality(_CLIPS.value, _SEED.value)
  if 'throughput' in parts:
    report['throughput'] = throughput(_VIDEOS.value, _FRAMES.value,
                                      _WORKERS.value)
  if 'flow' in parts:
    report['flow'] = flow_comparison()
  print(json.dumps(report, indent=2))


if __name__ == '__main__':
  app.run(main)
