"""The object graph from a folder of videos: mining, tracking, embedding,
resumable building and bad input."""

import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from mtssl.ops import preprocessing
from mtssl.backbones import resnet_v2
from mtssl.data import graph_records
from mtssl.data import object_graph
from mtssl.tasks import ti_mining as object_mining
from mtssl.data import synthetic_video
from mtssl.tasks import rp
from tests import tool_runner

# Two start frames per 46-frame video (0 and 15), 30 frames tracked.
FRAMES = 46
SMALL_GRAPH = object_graph.GraphConfig(num_parents=1, min_parent_size=2,
                                       neighbours=3, child_size=2)


def _write_clips(folder, count, frames):
  os.makedirs(folder, exist_ok=True)
  for k in range(count):
    clip = synthetic_video.render_clip(7, k, frames, camera='pan_zoom')
    synthetic_video.write_video(os.path.join(folder, f'clip{k}.avi'),
                                clip.frames)


def _silent(line):
  del line


class MiningTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.videos = os.path.join(cls.dir, 'videos')
    _write_clips(cls.videos, 3, FRAMES)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def test_build_resume_and_read(self):
    out = os.path.join(self.get_temp_dir(), 'graph_run')
    summary = object_mining.build_from_videos(
        self.videos, out, object_mining.MiningOptions(), SMALL_GRAPH,
        object_graph.color_hog_features, log=_silent)
    self.assertEqual(summary['videos'], 3)
    self.assertGreaterEqual(summary['tracks'], 2)
    self.assertEqual(summary['nodes'], 2 * summary['tracks'])
    self.assertEqual(summary['transitive_edges'], 3 * summary['inter_edges'])
    with open(os.path.join(out, 'graph', 'summary.json')) as f:
      self.assertEqual(json.load(f), summary)
    graph, store = graph_records.read_graph(os.path.join(out, 'graph'))
    self.assertEqual(graph.num_nodes, summary['nodes'])
    self.assertEqual(store.patch(0).shape, (96, 96, 3))
    # A second run mines nothing again and builds the same graph.
    with open(os.path.join(out, 'mined', object_mining.PROGRESS)) as f:
      shards = json.load(f)['shards']
    again = object_mining.build_from_videos(
        self.videos, out, object_mining.MiningOptions(), SMALL_GRAPH,
        object_graph.color_hog_features, log=_silent)
    self.assertEqual(again, summary)
    with open(os.path.join(out, 'mined', object_mining.PROGRESS)) as f:
      self.assertEqual(json.load(f)['shards'], shards)
    with self.assertRaisesRegex(object_graph.GraphError, 'other settings'):
      object_mining.mine_folder(
          self.videos, os.path.join(out, 'mined'),
          object_mining.MiningOptions(frame_step=5), log=_silent)

  def test_correlation_tracker_follows_a_shift(self):
    rng = np.random.default_rng(0)
    base = (rng.uniform(0, 255, (80, 100, 3))).astype(np.uint8)
    window = [np.roll(base, (2 * t, 3 * t), axis=(0, 1)) for t in range(5)]
    box = object_mining.correlation_track(window, (30, 20, 60, 50))
    self.assertEqual(tuple(box), (42, 28, 72, 58))

  def test_no_videos_and_short_videos(self):
    empty = os.path.join(self.get_temp_dir(), 'empty')
    os.makedirs(empty)
    with self.assertRaisesRegex(object_graph.GraphError, 'No video files'):
      object_mining.build_from_videos(
          empty, os.path.join(self.get_temp_dir(), 'o1'),
          object_mining.MiningOptions(), SMALL_GRAPH,
          object_graph.color_hog_features, log=_silent)
    short = os.path.join(self.get_temp_dir(), 'short')
    _write_clips(short, 2, 10)
    out = os.path.join(self.get_temp_dir(), 'o2')
    with self.assertRaisesRegex(object_graph.GraphError, 'No tracks'):
      object_mining.build_from_videos(
          short, out, object_mining.MiningOptions(), SMALL_GRAPH,
          object_graph.color_hog_features, log=_silent)
    with open(os.path.join(out, 'mined', object_mining.PROGRESS)) as f:
      counts = json.load(f)['counts']
    self.assertEqual(counts[object_mining.TOO_SHORT], 2)

  def test_tool_reports_errors(self):
    empty = os.path.join(self.get_temp_dir(), 'none')
    os.makedirs(empty)
    status, _, stderr = tool_runner.run_tool(
        'build_object_graph.py', f'--videos={empty}',
        f'--output_dir={self.get_temp_dir()}/t')
    self.assertEqual(status, 2)
    self.assertIn('error: No video files', stderr)


class EmbedderTest(tf.test.TestCase):

  def test_rp_checkpoint_features(self):
    trunk = resnet_v2.trunk_from_name('resnet_v2_tiny', 8)
    head = rp.RelativePositionHead(unit_depths=(32, 16), unit_bottleneck=8,
                                      fc_bottleneck=8)
    x = tf.zeros([2, 96, 96, 3])
    head(trunk(x)[trunk.output_name])
    path = tf.train.Checkpoint(backbone=trunk, heads={'rp': head}).save(
        os.path.join(self.get_temp_dir(), 'ckpt'))
    embed = object_mining.RpEmbedder(path, 'resnet_v2_tiny')
    patches = np.random.default_rng(0).integers(0, 255, (3, 96, 96, 3),
                                                dtype=np.uint8)
    features = embed(patches)
    self.assertEqual(features.shape, (3, 3 * 3 * 16))
    expected = trunk(preprocessing.vgg_preprocess(tf.cast(patches, tf.float32)),
                     training=False)[trunk.output_name]
    expected = tf.reshape(head.patch_features(expected, training=False),
                          [3, -1])
    self.assertAllClose(features, expected, atol=1e-4)
    no_rp = tf.train.Checkpoint(backbone=trunk).save(
        os.path.join(self.get_temp_dir(), 'trunk_only'))
    with self.assertRaisesRegex(object_graph.GraphError, 'no relative'):
      object_mining.RpEmbedder(no_rp, 'resnet_v2_tiny')
    for missing in (no_rp + '-9', os.path.join(self.get_temp_dir(), 'no')):
      with self.assertRaisesRegex(object_graph.GraphError, 'No checkpoint'):
        object_mining.RpEmbedder(missing, 'resnet_v2_tiny')


if __name__ == '__main__':
  tf.test.main()
