"""Motion segmentation (Pathak et al. 2017; paper sections 2 and 3.4).

From one video frame, predict which pixels will move independently of the
camera (a per-pixel sigmoid at stride 8). Holds `MsConfig`, the pipeline on
mtssl.data.motion_sources, the 1x1 convolution head, loss and metrics
(`foreground_iou`). Choices: BUILD.md, "Motion segmentation".
"""

import dataclasses
from typing import Dict, Sequence, Tuple

import tensorflow as tf
import tf_keras

from mtssl.configs import base as config_base
from mtssl.ops import preprocessing
from mtssl.backbones import slim_layers
from mtssl.data import motion_sources
from mtssl.data import problems
from mtssl.data import sources
from mtssl.tasks import base
from mtssl.tasks import heads

# Forward G multiply-accumulates of the paper's motion-segmentation head per
# 240x320 frame, the reference count of the paper's model.
PAPER_HEAD_GMACS = 25.2


@dataclasses.dataclass
class MsConfig(base.TaskConfig):
  """Motion-segmentation settings; defaults are the paper's."""
  frame_height: int = config_base.field(240, 'frame height in pixels')
  frame_width: int = config_base.field(320, 'frame width in pixels')
  label_stride: int = config_base.field(
      8, 'the trunk\'s output stride: a label cell covers this many pixels '
      'per side')
  head_widths: Tuple[int, ...] = config_base.field(
      (4096, 4096), 'widths of the head\'s conv layers')
  head_batch_norm: bool = config_base.field(
      True, 'batch norm in the head (else conv + bias + ReLU)')

  def validate(self):
    super().validate()
    if self.frame_height % self.label_stride or (
        self.frame_width % self.label_stride):
      raise ValueError(
          f'ms: frame size {self.frame_height}x{self.frame_width} must be a '
          f'multiple of label_stride {self.label_stride}.')
    if min(self.frame_height, self.frame_width) < 16:
      raise ValueError(f'ms: frames must be at least 16x16, got '
                       f'{self.frame_height}x{self.frame_width}.')
    if not self.head_widths or any(int(w) <= 0 for w in self.head_widths):
      raise ValueError(f'ms: head_widths must be positive, got '
                       f'{self.head_widths}.')

  @property
  def label_size(self) -> Tuple[int, int]:
    return (self.frame_height // self.label_stride,
            self.frame_width // self.label_stride)


class MotionSegmentationHead(heads.ConvStackHead):
  """conv 1x1 (x len(widths)) -> conv 1x1, 1 logit; all stride 1."""

  def __init__(self, widths: Sequence[int] = (4096, 4096),
               batch_norm: bool = True,
               weight_decay: float = slim_layers.WEIGHT_DECAY, **kwargs):
    kwargs.setdefault('name', 'ms_head')
    super().__init__(widths, [1] * len(widths), 1, batch_norm=batch_norm,
                     weight_decay=weight_decay, **kwargs)


def _label_to_size(label, size):
  """uint8 [h, w] label -> float32 [H, W, 1] (area resampling, >= 1/2)."""
  label = tf.cast(label, tf.float32)[..., None]
  same = tf.reduce_all(tf.equal(tf.shape(label)[:2], tf.constant(size)))
  resized = tf.cond(
      same, lambda: label,
      lambda: tf.cast(tf.image.resize(label, size, method='area') >= 0.5,
                      tf.float32))
  resized.set_shape([size[0], size[1], 1])
  return resized


def _frame_to_size(frame, size):
  """uint8 [h, w, 3] -> float32 [H, W, 3] in [0, 255] (bilinear, antialiased)."""
  frame = tf.cast(frame, tf.float32)
  same = tf.reduce_all(tf.equal(tf.shape(frame)[:2], tf.constant(size)))
  resized = tf.cond(
      same, lambda: frame,
      lambda: tf.clip_by_value(
          tf.image.resize(frame, size, antialias=True), 0.0, 255.0))
  resized.set_shape([size[0], size[1], 3])
  return resized


@base.register
class MotionSegmentationTask(base.Task):
  """Motion segmentation: a frame in, a moving / not-moving logit per 8x8 cell."""

  name = 'ms'
  config_class = MsConfig
  cpu_overrides = {'head_widths': (256, 256)}
  paper_trunk_inputs = (1, (240, 320))
  gpu_overrides = {'batch_size': 16}
  head_fields = ('frame_height', 'frame_width', 'head_widths')
  input_kind = 'video'

  def paper_head_gmacs(self, trunk_images):
    del trunk_images
    return PAPER_HEAD_GMACS
  # The paper gives one epoch of its video set as ~400 K40 GPU-hours but
  # neither the set's size nor the batch size, so no per-step cost is claimed
  # here (the trainer measures it).

  # Inputs ------------------------------------------------------------------
  def make_source(self, spec: str, tfds_data_dir=None):
    del tfds_data_dir  # videos do not come from TFDS
    cfg = self.config
    return motion_sources.make_motion_source(
        spec, (cfg.frame_height, cfg.frame_width), cfg.label_stride)

  def make_dataset(self, source, batch_size, seed, start=0):
    if not isinstance(source, motion_sources.MotionSource):
      raise sources.DataSourceError(
          f'ms needs a motion source (frames with motion labels), got '
          f'{source!r}; make it with MotionSegmentationTask.make_source.')
    cfg = self.config
    frame_size = (cfg.frame_height, cfg.frame_width)
    label_size = cfg.label_size

    def _example(index, frame, label):
      image = _frame_to_size(frame, frame_size)
      features = {'index': index,
                  'image': preprocessing.vgg_preprocess(image)}
      return features, {'mask': _label_to_size(label, label_size)}

    if problems.is_graph_only(source):  # The counts travel with the batch.
      def _counted(index, frame, label, counts):
        features, labels = _example(index, frame, label)
        return dict(features, **{problems.PROBLEMS_KEY: counts}), labels

      ds = source.counted_examples(seed, start).map(
          tf.autograph.experimental.do_not_convert(_counted),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
      ds = source.examples(seed, start).map(
          tf.autograph.experimental.do_not_convert(_example),
          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(
        tf.data.AUTOTUNE)

  # Model -------------------------------------------------------------------
  def trunk_images(self, features):
    return features['image']

  def build_head(self):
    return MotionSegmentationHead(self.config.head_widths,
                                  batch_norm=self.config.head_batch_norm)

  def loss(self, labels, outputs):
    mask = labels['mask']
    if (outputs.shape.rank == 4 and mask.shape.rank == 4 and
        outputs.shape[1:3].is_fully_defined() and
        mask.shape[1:3].is_fully_defined() and
        outputs.shape[1:3] != mask.shape[1:3]):
      raise ValueError(
          f'ms: head output {outputs.shape} and label {mask.shape} differ in '
          f'size; the trunk must run at output stride '
          f'{self.config.label_stride}.')
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(mask, tf.float32), logits=tf.cast(outputs, tf.float32))
    return tf.reduce_mean(cross_entropy)

  # Metrics and summaries ---------------------------------------------------
  def build_metrics(self) -> Dict[str, tf_keras.metrics.Metric]:
    return {
        'loss': tf_keras.metrics.Mean('loss'),
        'accuracy': tf_keras.metrics.BinaryAccuracy('accuracy', threshold=0.0),
        'foreground_iou': tf_keras.metrics.BinaryIoU(
            target_class_ids=[1], threshold=0.0, name='foreground_iou'),
    }

  def update_metrics(self, metrics, labels, outputs):
    mask = tf.cast(labels['mask'], tf.float32)
    logits = tf.cast(outputs, tf.float32)
    metrics['loss'].update_state(self.loss(labels, outputs))
    metrics['accuracy'].update_state(mask, logits)
    metrics['foreground_iou'].update_state(mask, logits)

  def image_summaries(self, features, labels, outputs):
    """frame | predicted probability | label, side by side, [N, H, 3W, 3]."""
    frame = tf.clip_by_value(
        preprocessing.vgg_unpreprocess(features['image']) / 255.0, 0.0, 1.0)
    size = tf.shape(frame)[1:3]

    def show(mask):
      mask = tf.image.resize(tf.cast(mask, tf.float32), size,
                             method='nearest')
      return tf.tile(mask, [1, 1, 1, 3])

    predicted = show(tf.sigmoid(tf.cast(outputs, tf.float32)))
    return {'ms/frame_prediction_label': tf.concat(
        [frame, predicted, show(labels['mask'])], axis=2)}
