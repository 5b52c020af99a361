r"""Extracts motion-segmentation labels from a folder of videos into TFRecords.

  python tools/extract_motion_labels.py --videos=/data/videos \
      --output_dir=/data/ms_labels

Every video below --videos (mp4, avi, webm, mkv, mov, ... anything OpenCV
reads) is decoded, its frames resized to 240x320, and every --frame_step-th
frame labelled with the pixels that move independently of the camera over
the next 10 frames (mtssl/motion/labels.py). Accepted frames are written as
`shard-NNNNN.tfrecord` (schema in mtssl/data/motion_records.py), which the ms
task reads with `--ms_data=tfrecord:/data/ms_labels`.

Videos are processed in parallel (--workers, all cores by default) with a
progress line. An interrupted run resumes where it stopped when started
again with the same arguments; shards are written atomically, so a killed
run never leaves a half-written shard. Unusable videos (corrupt, empty,
too short, still images) are skipped and counted; summary.json in the output
directory gives the counts of skipped videos and rejected frames by reason.

Exit status: 0 done, 2 the run could not start (the message says why).
"""

import json
import sys

from absl import app
from absl import flags

from mtssl.motion import labels
from mtssl.motion import videos

_VIDEOS = flags.DEFINE_string('videos', None, 'Folder of videos (searched '
                              'recursively).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None,
                                  'Where the shards and records go.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Worker processes; 0: one per '
                                'CPU core.', lower_bound=0)
_FRAME_STEP = flags.DEFINE_integer(
    'frame_step', 10, 'Label every N-th frame (10: one frame per tracking '
    'window).', lower_bound=1)
_MAX_EXAMPLES = flags.DEFINE_integer(
    'max_examples_per_video', 0, 'Stop a video after this many accepted '
    'frames; 0: no limit.', lower_bound=0)
_EXAMPLES_PER_SHARD = flags.DEFINE_integer(
    'examples_per_shard', 1000, 'Examples per shard (shards hold whole '
    'videos, so a shard may hold a few more).', lower_bound=1)
_IMAGE_FORMAT = flags.DEFINE_enum('image_format', 'jpeg', ['jpeg', 'png'],
                                  'How frames are stored.')
_HEIGHT = flags.DEFINE_integer('height', 240, 'Frame height (paper: 240).')
_WIDTH = flags.DEFINE_integer('width', 320, 'Frame width (paper: 320).')
_TRACK_LENGTH = flags.DEFINE_integer('track_length', 10,
                                     'Frames per track (paper: 10).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Delete an earlier extraction in --output_dir first '
    'instead of resuming it.')
flags.mark_flags_as_required(['videos', 'output_dir'])


def _printer():
  """Progress on stderr: one refreshed line on a terminal (at most 5 per
  second), else a line every 10 seconds; always the last one."""
  tty = sys.stderr.isatty()
  interval = 0.2 if tty else 10.0
  last = [-interval]

  def show(progress):
    final = progress.videos_done == progress.videos_total
    if not final and progress.seconds - last[0] < interval:
      return
    last[0] = progress.seconds
    if tty:
      print('\r' + progress.line(), end='', file=sys.stderr, flush=True)
    else:
      print(progress.line(), file=sys.stderr, flush=True)

  return show


def main(argv):
  # Imported here, not at the top: worker processes start by importing this
  # script, and the extraction library brings TensorFlow, which they do not
  # need.
  from mtssl.data import motion_extraction as extraction  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    options = videos.ExtractOptions(
        label=labels.LabelConfig(height=_HEIGHT.value, width=_WIDTH.value,
                                 track_length=_TRACK_LENGTH.value),
        frame_step=_FRAME_STEP.value,
        max_examples_per_video=_MAX_EXAMPLES.value,
        image_format=_IMAGE_FORMAT.value)
    options.validate()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    summary = extraction.run_extraction(
        _VIDEOS.value, _OUTPUT_DIR.value, options,
        workers=_WORKERS.value or None,
        examples_per_shard=_EXAMPLES_PER_SHARD.value,
        overwrite=_OVERWRITE.value, progress=_printer())
  except extraction.ExtractionError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if sys.stderr.isatty():
    print(file=sys.stderr)
  brief = {k: summary[k] for k in ('videos', 'frames', 'examples')}
  brief['shards'] = len(summary['shards'])
  print(json.dumps(brief, indent=2, sort_keys=True))
  return 0


if __name__ == '__main__':
  app.run(main)
