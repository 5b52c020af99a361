"""Builds the object graph of transitive invariance from a folder of videos.

Stage 1 (resumable) mines object tracks from motion labels; stage 2 embeds,
clusters and links them (mtssl.data.object_graph) and writes the graph
(mtssl.data.graph_records). tools/build_object_graph.py is this, with flags.

Typical use:

    summary = object_mining.build_from_videos(
        '/data/videos', '/data/ti_graph', MiningOptions(),
        GraphConfig(num_parents=50, min_parent_size=10),
        embed=object_mining.RpEmbedder('/runs/rp', 'resnet_v2_101'))
"""

import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np
import tensorflow as tf

from mtssl.utils import io_utils
from mtssl.ops import preprocessing
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import graph_records
from mtssl.data import object_graph
from mtssl.motion import labels as labels_lib
from mtssl.data import motion_records as records
from mtssl.motion import videos as videos_lib
from mtssl.tasks import heads

TOO_SHORT = 'video_too_short'
LOST_TRACK = 'lost_track'
WEAK_BOX = 'too_little_motion_in_box'
PROGRESS = 'progress.json'
TRACKERS = ('correlation', 'mil')
# Correlation tracker: search reach per frame (fraction of the box side),
# template interpolation rate (KCF's 0.075) and the lowest normalized
# correlation that still counts as found.
SEARCH_REACH = 0.25
TEMPLATE_RATE = 0.075
MIN_CORRELATION = 0.3


@dataclasses.dataclass
class MiningOptions:
  """Mining settings (frame size and track length: the paper's)."""
  frame_height: int = 240
  frame_width: int = 320
  track_length: int = 30
  frame_step: int = 15
  box_fraction: float = 0.5
  min_box_motion: float = 0.05
  patch_size: int = 96
  videos_per_batch: int = 8
  tracker: str = 'correlation'   # or 'mil' (OpenCV's TrackerMIL)

  def validate(self):
    if min(self.frame_height, self.frame_width) < 32:
      raise object_graph.GraphError(
          f'frames must be at least 32x32, got '
          f'{self.frame_height}x{self.frame_width}.')
    for name in ('track_length', 'frame_step', 'patch_size',
                 'videos_per_batch'):
      if getattr(self, name) <= 0:
        raise object_graph.GraphError(
            f'{name} must be positive, got {getattr(self, name)}.')
    if self.tracker not in TRACKERS:
      raise object_graph.GraphError(
          f'tracker must be one of {TRACKERS}, got {self.tracker!r}.')
    if not 0 < self.box_fraction <= 1:
      raise object_graph.GraphError(
          f'box_fraction must be in (0, 1], got {self.box_fraction}.')


def _add(counts, reason, n=1):
  counts[reason] = counts.get(reason, 0) + n


def _to_bgr(frame):
  return cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)


class Miner:
  """Mines tracks from the frames of one video at a time."""

  def __init__(self, options: MiningOptions,
               identify: Optional[Callable] = None):
    options.validate()
    self.options = options
    self.labeler = labels_lib.MotionLabeler(labels_lib.LabelConfig(
        height=options.frame_height, width=options.frame_width))
    # identify(video, frame_index, box) -> (identity, category): ground truth
    # where it is known (tests on synthetic video), else -1.
    self.identify = identify

  def _track(self, window, box, mask):
    if self.options.tracker == 'correlation':
      return correlation_track(window, box, mask)
    tracker = cv2.TrackerMIL_create()
    x0, y0, x1, y1 = box
    tracker.init(_to_bgr(window[0]), (x0, y0, x1 - x0, y1 - y0))
    h, w = window[0].shape[:2]
    found = None
    for frame in window[1:]:
      ok, found = tracker.update(_to_bgr(frame))
      if not ok:
        return None
    x, y, bw, bh = found
    cx, cy = x + bw / 2, y + bh / 2
    if not (0 <= cx < w and 0 <= cy < h):
      return None
    return (x, y, x + bw, y + bh)

  def _start(self, key, t0, window, counts):
    o = self.options
    result = self.labeler.label_clip(window[:self.labeler.config.track_length])
    if not result.accepted:
      _add(counts, result.reason)
      return None
    side = int(round(o.box_fraction * o.frame_height))
    (x0, y0), moving = object_graph.most_moving_box(result.mask, side)
    if moving < o.min_box_motion * side * side:
      _add(counts, WEAK_BOX)
      return None
    start_box = (x0, y0, x0 + side, y0 + side)
    end_box = self._track(window, start_box,
                          result.mask[y0:y0 + side, x0:x0 + side])
    if end_box is None:
      _add(counts, LOST_TRACK)
      return None
    ids = [(-1, -1), (-1, -1)]
    if self.identify is not None:
      ids = [self.identify(key, t0, start_box),
             self.identify(key, t0 + o.track_length, end_box)]
    _add(counts, 'tracks')
    return object_graph.Track(
        object_graph.crop_patch(window[0], start_box, o.patch_size),
        object_graph.crop_patch(window[-1], end_box, o.patch_size),
        key, t0, start_box, end_box, ids[0][0], ids[0][1], ids[1][0],
        ids[1][1])

  def mine(self, path: str, key: str, counts: Dict[str, int]
           ) -> List[object_graph.Track]:
    """Tracks of one video; problems are counted, never raised."""
    o = self.options
    need = o.track_length + 1
    window, tracks, n = [], [], 0
    try:
      for n, frame in enumerate(videos_lib.iter_frames(path), start=1):
        window.append(self.labeler.prepare(frame))
        if len(window) > need:
          window.pop(0)
        t0 = n - need
        if len(window) == need and t0 % o.frame_step == 0:
          track = self._start(key, t0, window, counts)
          if track is not None:
            tracks.append(track)
    except videos_lib.VideoSkipped as e:
      _add(counts, f'video_{e.reason}')
      return []
    if n < need:
      _add(counts, TOO_SHORT)
    _add(counts, 'videos')
    return tracks


def correlation_track(window, box, mask=None):
  """The box (x0, y0, x1, y1) followed through `window` by normalized
  cross-correlation of a gray template in a window around its last place,
  the template interpolated towards each new find (as KCF updates its
  model); None when the best correlation falls under MIN_CORRELATION or the
  box leaves the frame. `mask` (bool, the box's size) restricts the template
  to the moving pixels, so the object rather than the background is
  followed."""
  x0, y0, x1, y1 = [int(round(v)) for v in box]
  side_x, side_y = x1 - x0, y1 - y0
  h, w = window[0].shape[:2]
  reach = max(int(SEARCH_REACH * max(side_x, side_y)), 2)
  gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)
          for f in window]
  template = gray[0][y0:y1, x0:x1].copy()
  weights = None if mask is None else mask.astype(np.float32)
  for frame in gray[1:]:
    sx0, sy0 = max(x0 - reach, 0), max(y0 - reach, 0)
    sx1, sy1 = min(x1 + reach, w), min(y1 + reach, h)
    if sx1 - sx0 < side_x or sy1 - sy0 < side_y:
      return None
    scores = cv2.matchTemplate(frame[sy0:sy1, sx0:sx1], template,
                               cv2.TM_CCOEFF_NORMED, mask=weights)
    scores[~np.isfinite(scores)] = -1
    _, best, _, (bx, by) = cv2.minMaxLoc(scores)
    if best < MIN_CORRELATION:
      return None
    x0, y0 = sx0 + bx, sy0 + by
    x1, y1 = x0 + side_x, y0 + side_y
    template = ((1 - TEMPLATE_RATE) * template +
                TEMPLATE_RATE * frame[y0:y1, x0:x1])
  return (x0, y0, x1, y1)


# Track shards ----------------------------------------------------------------
def _track_record(t: object_graph.Track) -> bytes:
  def ints(v):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(v)))

  def floats(v):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(v)))

  def data(b):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b]))

  return tf.train.Example(features=tf.train.Features(feature={
      'start': data(graph_records.encode_patch(t.start)),
      'end': data(graph_records.encode_patch(t.end)),
      'video': data(t.video.encode('utf-8')),
      'frame': ints([t.frame]),
      'boxes': floats(list(t.start_box) + list(t.end_box)),
      'truth': ints([t.identity, t.category, t.end_identity, t.end_category]),
  })).SerializeToString()


def _parse_track(data: bytes) -> object_graph.Track:
  f = tf.train.Example.FromString(data).features.feature
  boxes = list(f['boxes'].float_list.value)
  truth = list(f['truth'].int64_list.value)
  return object_graph.Track(
      graph_records.decode_patch(f['start'].bytes_list.value[0]),
      graph_records.decode_patch(f['end'].bytes_list.value[0]),
      f['video'].bytes_list.value[0].decode('utf-8'),
      int(f['frame'].int64_list.value[0]), boxes[:4], boxes[4:],
      truth[0], truth[1], truth[2], truth[3])


def mine_folder(input_dir: str, mined_dir: str, options: MiningOptions,
                identify: Optional[Callable] = None,
                log: Callable[[str], None] = print) -> dict:
  """Stage 1: tracks of every video under input_dir, in shards in
  mined_dir; resumes from its progress file. Returns the progress."""
  keys = videos_lib.list_videos(input_dir)
  if not keys:
    raise object_graph.GraphError(f'No video files under {input_dir!r}.')
  os.makedirs(mined_dir, exist_ok=True)
  progress_path = os.path.join(mined_dir, PROGRESS)
  settings = dataclasses.asdict(options)
  progress = {'settings': settings, 'done': [], 'shards': [], 'counts': {}}
  if os.path.exists(progress_path):
    with open(progress_path) as f:
      progress = json.load(f)
    if progress['settings'] != settings:
      raise object_graph.GraphError(
          f'{mined_dir} was mined with other settings '
          f'({progress["settings"]}); use a new output directory.')
  done = set(progress['done'])
  todo = [k for k in keys if k not in done]
  miner = Miner(options, identify)
  for first in range(0, len(todo), options.videos_per_batch):
    batch = todo[first:first + options.videos_per_batch]
    counts = dict(progress['counts'])
    tracks = []
    for key in batch:
      tracks += miner.mine(os.path.join(input_dir, key), key, counts)
    shard = records.SHARD_PATTERN.format(len(progress['shards']))
    records.write_shard(os.path.join(mined_dir, shard),
                        [_track_record(t) for t in tracks])
    progress = dict(progress, done=progress['done'] + batch,
                    shards=progress['shards'] + [shard], counts=counts)
    io_utils.atomic_write_bytes(progress_path,
                                json.dumps(progress, indent=1).encode())
    log(f'mined {len(progress["done"])}/{len(keys)} videos, '
        f'{counts.get("tracks", 0)} tracks')
  return progress


def load_tracks(mined_dir: str, progress: dict) -> List[object_graph.Track]:
  tracks = []
  for shard in progress['shards']:
    path = os.path.join(mined_dir, shard)
    tracks += [_parse_track(d) for d in
               tf.data.TFRecordDataset(path).as_numpy_iterator()]
  return tracks


# Embedding -------------------------------------------------------------------
class RpEmbedder:
  """Flattened features of relative position's patch units on a checkpoint's
  trunk: the context-prediction features the paper clusters with."""

  def __init__(self, checkpoint: str, trunk: str, output_stride: int = 8,
               batch_size: int = 32):
    path = (tf.train.latest_checkpoint(checkpoint)
            if tf.io.gfile.isdir(checkpoint) else checkpoint)
    if not path or not tf.io.gfile.exists(path + '.index'):
      raise object_graph.GraphError(f'No checkpoint at {checkpoint!r}.')
    shapes = tf.train.load_checkpoint(path).get_variable_to_shape_map()
    depths, bottleneck = [], None
    while True:
      key = (f'heads/rp/units/{len(depths)}/conv3/conv/kernel/'
             '.ATTRIBUTES/VARIABLE_VALUE')
      if key not in shapes:
        break
      depths.append(shapes[key][-1])
      bottleneck = shapes[key][-2]
    if not depths:
      raise object_graph.GraphError(
          f'{path} holds no relative-position head (heads/rp/units); train '
          f'rp first or pass a run that includes it.')
    self.trunk = resnet_v2.trunk_from_name(trunk, output_stride)
    slim_checkpoint.restore_trunk(self.trunk, path)
    self.holder = tf.Module()
    self.holder.units = heads.patch_units(tuple(depths), bottleneck)
    self.batch_size = batch_size
    self._features(np.zeros((1, 96, 96, 3), np.uint8))
    status = tf.train.Checkpoint(heads={'rp': self.holder}).read(path)
    status.expect_partial().assert_existing_objects_matched()

  def _features(self, patches):
    x = preprocessing.vgg_preprocess(tf.cast(patches, tf.float32))
    x = self.trunk(x, training=False)[self.trunk.output_name]
    for unit in self.holder.units:
      x = unit(x, training=False)
    return tf.reshape(x, [tf.shape(x)[0], -1]).numpy()

  def __call__(self, patches: np.ndarray) -> np.ndarray:
    return np.concatenate([self._features(patches[i:i + self.batch_size])
                           for i in range(0, len(patches), self.batch_size)])


def build_from_videos(input_dir: str, output_dir: str,
                      options: MiningOptions,
                      graph_config: object_graph.GraphConfig,
                      embed: Callable[[np.ndarray], np.ndarray],
                      identify: Optional[Callable] = None,
                      log: Callable[[str], None] = print) -> dict:
  """Both stages; the graph goes to output_dir/graph. Returns the summary."""
  mined_dir = os.path.join(output_dir, 'mined')
  progress = mine_folder(input_dir, mined_dir, options, identify, log)
  tracks = load_tracks(mined_dir, progress)
  counts = dict(progress['counts'])
  graph = object_graph.build_graph(tracks, embed, graph_config, counts)
  summary = graph.summary()
  precision = object_graph.edge_precision(graph)
  if precision:
    summary['precision'] = precision
  graph_records.write_graph(graph, os.path.join(output_dir, 'graph'), summary,
                            overwrite=True)
  return summary
