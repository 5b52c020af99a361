"""The motion-segmentation task: inputs, head, loss, metrics, learning."""

import os

import cv2
import numpy as np
import tensorflow as tf
import tf_keras

from mtssl.models import multitask as model_lib
from mtssl.training import optimizers
from mtssl.backbones import resnet_v2
from mtssl.data import motion_sources
from mtssl.data import problems as problems_lib
from mtssl.data import service
from mtssl.data import sources
from mtssl.data import synthetic_video
from mtssl.motion import labels as labels_lib
from mtssl.data import motion_records as records
from mtssl.tasks import base
from mtssl.tasks import ms
from mtssl.training import step as step_lib


def _small_task(**overrides):
  config = dict(frame_height=64, frame_width=80, head_widths=(64, 64),
                batch_size=4)
  config.update(overrides)
  return base.make_task('ms', **config)


def _batches(task, source, seed, start, count, batch_size=4):
  it = iter(task.make_dataset(source, batch_size, seed, start))
  return [next(it) for _ in range(count)]


def _record(seed, index, video='v.mp4'):
  frame, mask = synthetic_video.render_frame(seed, index, 0, 240, 320)
  jpeg = cv2.imencode('.jpg', cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))[1]
  label = labels_lib.downsample_mask(mask, 8)
  return records.serialize_example(jpeg.tobytes(), label, 240, 320, video,
                                   index, float(label.mean()))


class MsTaskTest(tf.test.TestCase):

  def test_registered_with_paper_defaults(self):
    self.assertIn('ms', base.task_names())
    task = base.make_task('ms')
    self.assertIsInstance(task, ms.MotionSegmentationTask)
    self.assertEqual((task.config.frame_height, task.config.frame_width),
                     (240, 320))
    self.assertEqual(task.config.label_size, (30, 40))
    self.assertEqual(task.config.head_widths, (4096, 4096))
    with self.assertRaisesRegex(ValueError, 'multiple of label_stride'):
      base.make_task('ms', frame_height=100)
    with self.assertRaisesRegex(ValueError, 'head_widths'):
      base.make_task('ms', head_widths=(0,))

  def test_synthetic_pipeline_is_position_addressed(self):
    task = _small_task()
    source = task.make_source('synthetic')
    source.validate()
    a = _batches(task, source, seed=5, start=0, count=3)
    b = _batches(task, source, seed=5, start=8, count=1)
    features, labels = a[0]
    self.assertAllEqual(features['index'], [0, 1, 2, 3])
    self.assertEqual(features['image'].shape, (4, 64, 80, 3))
    self.assertEqual(features['image'].dtype, tf.float32)
    self.assertEqual(labels['mask'].shape, (4, 8, 10, 1))
    self.assertAllInSet(labels['mask'], [0.0, 1.0])
    self.assertGreater(float(tf.reduce_mean(labels['mask'])), 0.0)
    # Stream position 8 is the third batch, whatever the start.
    self.assertAllEqual(b[0][0]['index'], a[2][0]['index'])
    self.assertAllEqual(b[0][0]['image'], a[2][0]['image'])
    self.assertAllEqual(b[0][1]['mask'], a[2][1]['mask'])
    other = _batches(task, source, seed=6, start=0, count=1)
    self.assertNotAllEqual(other[0][0]['image'], features['image'])
    # The label is the exact motion mask of the frame, downsampled.
    frame, mask = synthetic_video.render_frame(5, 1, 0, 64, 80)
    self.assertAllClose(features['image'][1],
                        frame.astype(np.float32) - [123.68, 116.779, 103.939],
                        atol=1e-4)
    self.assertAllEqual(labels['mask'][1, ..., 0],
                        labels_lib.downsample_mask(mask, 8))

  def test_tfrecord_source_reads_every_record_once_per_epoch(self):
    root = os.path.join(self.get_temp_dir(), 'shards')
    good = [_record(1, i) for i in range(7)]
    bad_jpeg = records.serialize_example(b'\xff\xd8 not a jpeg \xff\xd9',
                                         np.zeros((30, 40), np.uint8), 240, 320,
                                         'v.mp4', 99, 0.0)
    bad_label = records.serialize_example(
        records.parse_example(good[0])['frame'], np.zeros((3, 4), np.uint8) + 7,
        240, 320, 'v.mp4', 98, 0.0)
    records.write_shard(os.path.join(root, 'shard-00000.tfrecord'), good[:4] + [b'junk'])
    records.write_shard(os.path.join(root, 'shard-00001.tfrecord'),
                 good[4:] + [bad_jpeg, bad_label])
    # A shard cut short (not one the extraction tool leaves): its complete
    # records are read, the rest counted.
    records.write_shard(os.path.join(root, 'shard-00002.tfrecord'), [])
    with open(os.path.join(root, 'shard-00002.tfrecord'), 'ab') as f:
      with open(os.path.join(root, 'shard-00000.tfrecord'), 'rb') as g:
        f.write(g.read()[:-100])  # good[0..2] complete, good[3] cut
    task = _small_task(frame_height=240, frame_width=320, batch_size=1)
    source = task.make_source(f'tfrecord:{root}')
    source.validate()
    index = source.index
    n = len(index)
    self.assertEqual(n, 5 + 5 + 3)
    self.assertIn(motion_sources.TRUNCATED_SHARD, source.counter.snapshot())

    def frame_indices(start, stop):
      out = []
      for k, frame, label in source.examples(seed=3, start=start):
        if int(k) >= stop:
          break
        self.assertEqual(frame.shape, (240, 320, 3))
        self.assertEqual(label.shape, (30, 40))
        out.append((int(k), frame.numpy().mean().round(3)))
      return out

    epoch = frame_indices(0, n)
    # 13 records: 3 bad ones skipped, 10 good ones, 7 distinct frames (the
    # cut shard repeats frames 0-2).
    self.assertLen(epoch, 10)
    self.assertLen({m for _, m in epoch}, 7)
    problems = source.counter.problems()
    self.assertEqual(problems[records.BAD_RECORD], 1)
    self.assertEqual(problems[records.BAD_FRAME], 1)
    self.assertEqual(problems[records.BAD_LABEL], 1)
    # Position-addressed: starting at k reproduces the stream from k.
    self.assertEqual(frame_indices(5, n), [e for e in epoch if e[0] >= 5])
    self.assertEqual(frame_indices(0, n), epoch)
    # The task's pipeline runs no Python (a tf.data service worker can run
    # it), and its batches carry the counts to the consumer.
    dataset = task.make_dataset(source, 1, seed=3)
    graph = dataset.take(1)._as_serialized_graph()  # pylint: disable=protected-access
    self.assertNotIn(b'PyFunc', graph.numpy())
    service.check_servable('ms', source)
    features, _ = next(iter(dataset))
    self.assertIn(problems_lib.PROBLEMS_KEY, features)

  def test_tfrecord_labels_are_resampled_to_the_task_size(self):
    root = os.path.join(self.get_temp_dir(), 'resample')
    records.write_shard(os.path.join(root, 'shard-00000.tfrecord'),
                 [_record(2, i) for i in range(4)])
    task = _small_task()  # 64x80 frames -> 8x10 labels
    features, labels = _batches(task, task.make_source(f'tfrecord:{root}'),
                                seed=0, start=0, count=1)[0]
    self.assertEqual(features['image'].shape, (4, 64, 80, 3))
    self.assertEqual(labels['mask'].shape, (4, 8, 10, 1))
    self.assertAllInSet(labels['mask'], [0.0, 1.0])

  def test_failed_shard_write_leaves_nothing(self):
    root = os.path.join(self.get_temp_dir(), 'failed_write')
    path = os.path.join(root, 'shard-00000.tfrecord')
    with self.assertRaises(TypeError):
      records.write_shard(path, [_record(0, 0), 12345])  # not bytes
    self.assertFalse(os.path.exists(root) and os.listdir(root))
    records.write_shard(path, [_record(0, 0)])
    self.assertEqual(os.listdir(root), ['shard-00000.tfrecord'])

  def test_bad_sources_are_named(self):
    task = _small_task()
    missing = os.path.join(self.get_temp_dir(), 'nothing_here')
    with self.assertRaisesRegex(sources.DataSourceError, 'nothing_here'):
      task.make_source(f'tfrecord:{missing}').validate()
    empty = os.path.join(self.get_temp_dir(), 'empty_shards')
    records.write_shard(os.path.join(empty, 'shard-00000.tfrecord'), [])
    with self.assertRaisesRegex(sources.DataSourceError, 'no complete record'):
      task.make_source(f'tfrecord:{empty}').validate()
    with self.assertRaisesRegex(sources.DataSourceError,
                                'extract_motion_labels'):
      task.make_source('folder:/videos')
    with self.assertRaisesRegex(sources.DataSourceError, 'motion source'):
      task.make_dataset(sources.SyntheticImageSource(64, 80), 4, seed=0)

  def test_loss_and_metrics(self):
    task = _small_task()
    logits = tf.constant([[[[2.0], [-1.0]], [[0.5], [-3.0]]]])  # [1, 2, 2, 1]
    mask = tf.constant([[[[1.0], [1.0]], [[0.0], [0.0]]]])
    x, z = logits.numpy(), mask.numpy()
    expected = np.mean(np.maximum(x, 0) - x * z + np.log1p(np.exp(-abs(x))))
    self.assertAllClose(task.loss({'mask': mask}, logits), expected)
    metrics = task.build_metrics()
    task.update_metrics(metrics, {'mask': mask}, logits)
    # Predicted moving: (0,0), (1,0); labelled: (0,0), (0,1).
    self.assertAllClose(metrics['accuracy'].result(), 0.5)
    self.assertAllClose(metrics['foreground_iou'].result(), 1 / 3)
    # Accumulates counts: a second batch with I=1, U=1 gives (1+1)/(3+1).
    task.update_metrics(metrics, {'mask': tf.ones([1, 1, 1, 1])},
                        tf.ones([1, 1, 1, 1]))
    self.assertAllClose(metrics['foreground_iou'].result(), 2 / 4)
    with self.assertRaisesRegex(ValueError, 'output stride'):
      task.loss({'mask': tf.zeros([1, 4, 4, 1])}, tf.zeros([1, 2, 2, 1]))

  def test_paper_head_at_stride_8(self):
    task = base.make_task('ms')
    # ResNet-v2-101's block 3 on a 240x320 frame (size pinned in
    # test_resnet_v2).
    features = tf.random.normal([1, 30, 40, 1024], seed=1)
    head = task.build_head()
    logits = head(features, training=False)
    self.assertEqual(logits.shape, (1, 30, 40, 1))
    self.assertEqual(logits.dtype, tf.float32)
    trainable = sum(int(np.prod(v.shape)) for v in head.trainable_variables)
    total = sum(int(np.prod(v.shape)) for v in head.variables)
    # conv 1x1 1024->4096 and 4096->4096 (no bias; batch norm gamma, beta),
    # conv 1x1 4096->1 with bias.
    self.assertEqual(trainable, 1024 * 4096 + 2 * 4096 + 4096 * 4096 +
                     2 * 4096 + 4096 + 1)  # 20,992,001
    self.assertEqual(total, trainable + 2 * 2 * 4096)  # + moving statistics
    plain = ms.MotionSegmentationHead(batch_norm=False)
    plain(features)
    self.assertEqual(sum(int(np.prod(v.shape)) for v in plain.variables),
                     1024 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 + 1)

  def test_image_summaries(self):
    task = _small_task()
    features, labels = _batches(task, task.make_source('synthetic'), 0, 0, 1)[0]
    images = task.image_summaries(features, labels, tf.zeros([4, 8, 10, 1]))
    image = images['ms/frame_prediction_label']
    self.assertEqual(image.shape, (4, 64, 240, 3))
    self.assertAllInRange(image, 0.0, 1.0)
    self.assertAllClose(image[:, :, 80:160], 0.5 * tf.ones([4, 64, 80, 3]))

  def test_learns_on_synthetic_video(self):
    tf_keras.utils.set_random_seed(0)
    task = _small_task(batch_size=8)
    it = iter(task.make_dataset(task.make_source('synthetic'), 8, seed=0))
    features, _ = next(it)
    trunk = resnet_v2.trunk_from_name('resnet_v2_tiny', output_stride=8)
    model = model_lib.MultiTaskModel(trunk, {'ms': task})
    model.build_all({'ms': features})
    step = step_lib.TaskTrainStep(model, 'ms', optimizers.TF1RMSProp(3e-3))
    losses, ious = [], []
    for i in range(120):
      losses.append(float(step(*next(it))['loss']))
      if i % 10 == 9:
        ious.append(step.metric_results()['foreground_iou'])
        step.reset_metrics()
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    # Measured (seed 0, 64x80 frames, resnet_v2_tiny, head 64-64, batch 8,
    # lr 3e-3): mean loss 0.895 over steps 1-10, 0.100 over steps 111-120;
    # foreground IoU 0.072 over steps 1-10, 0.674 over steps 111-120.
    self.assertLess(last, first / 3, msg=np.round(losses, 3))
    self.assertGreater(ious[-1], 0.4, msg=np.round(ious, 3))
    self.assertGreater(ious[-1], ious[0] + 0.25, msg=np.round(ious, 3))


if __name__ == '__main__':
  tf.test.main()
