"""PASCAL VOC 2007 detection (paper section 5): Faster R-CNN on the trunk.

Holds `DetectionConfig`, the input pipeline and the registered `detection`
protocol; the model is mtssl.evaluation.detector. Composition and
choices: BUILD.md, "Detection protocol".

Typical use:

    python -m mtssl.evaluate detection --init_checkpoint=CKPT --model_dir=DIR
"""

import dataclasses
from typing import Optional, Tuple

import tensorflow as tf

from official.vision.losses import maskrcnn_losses
from official.vision.ops import anchor as anchor_lib
from official.vision.ops import preprocess_ops

from mtssl.configs import base
from mtssl.ops import preprocessing
from mtssl.backbones import slim_checkpoint
from mtssl.evaluation import augment
from mtssl.evaluation import label_checks
from mtssl.evaluation import detector as detector_lib
from mtssl.evaluation import metrics as metrics_lib
from mtssl.evaluation import registry
from mtssl.evaluation import runner

BATCH_NORM = ('train', 'frozen')


@dataclasses.dataclass
class DetectionConfig:
  """Settings of the detection protocol (flags --<field>)."""
  num_classes: Optional[int] = base.field(
      None, 'object classes (None: the training data\'s)')
  image_size: int = base.field(1024, 'side of the square input canvas (a '
                               'multiple of the output stride)')
  short_side: int = base.field(600, 'shorter side of the resized image')
  scale_min: float = base.field(0.8, 'multi-scale training: lowest factor')
  scale_max: float = base.field(1.44, 'multi-scale training: highest factor')
  flip: bool = base.field(True, 'random horizontal flip in training')
  max_instances: int = base.field(100, 'boxes per training image at most')
  anchor_sizes: Tuple[float, ...] = base.field(
      (64.0, 128.0, 256.0, 512.0), 'anchor sizes in pixels')
  aspect_ratios: Tuple[float, ...] = base.field(
      (0.5, 1.0, 2.0), 'anchor aspect ratios (width / height)')
  rpn_filters: int = base.field(512, 'filters of the RPN convolution')
  rpn_batch_size_per_im: int = base.field(256, 'anchors sampled per image '
                                          'for the RPN loss')
  rpn_fg_fraction: float = base.field(0.5, 'positive fraction of the RPN\'s '
                                      'sampled anchors at most')
  rpn_match_threshold: float = base.field(0.7, 'IoU from which an anchor is '
                                          'positive')
  rpn_unmatched_threshold: float = base.field(0.3, 'IoU below which an anchor '
                                              'is negative')
  pre_nms_top_k: int = base.field(6000, 'proposals before NMS')
  num_proposals: int = base.field(300, 'proposals kept after NMS')
  num_sampled_rois: int = base.field(64, 'ROIs sampled per training image')
  foreground_fraction: float = base.field(0.25, 'foreground fraction of the '
                                          'sampled ROIs')
  crop_size: int = base.field(14, 'ROIAlign output size (even; max-pooled '
                              'by 2)')
  block4_units: int = base.field(3, 'bottleneck units of the block-4 box head')
  block4_base_depth: Optional[int] = base.field(
      None, 'block-4 base depth (None: twice block 3\'s)')
  block4_checkpoint: Optional[str] = base.field(
      None, 'TF-Slim ResNet-v2 checkpoint to initialise block 4 from')
  detection_nms_iou: float = base.field(0.6, 'IoU of the per-class NMS of '
                                        'the detections')
  max_detections: int = base.field(100, 'detections per image')
  lasso_l1: Optional[float] = base.field(
      None, 'feed the detector a lasso combination of all block-3 units with '
      'this L1 weight; None: the block-3 output')
  batch_norm: Optional[str] = base.field(
      None, 'batch norm of the trunk and block 4 (None: frozen for a '
      'pre-trained trunk, train for a random one)', choices=BATCH_NORM)
  head_batch_norm_decay: float = base.field(
      0.99, 'moving-average decay of the new heads\' batch norms (the RPN '
      'head\'s is Model Garden\'s default)')
  weight_decay: float = base.field(1e-4, 'L2 weight decay (Slim form) of '
                                   'every trained layer')

  @property
  def train_batch_norm(self) -> bool:
    # None is resolved by mtssl.evaluation.factory; built directly: frozen.
    return self.batch_norm == 'train'

  def validate(self):
    problems = []
    if self.batch_norm not in BATCH_NORM + (None,):
      problems.append(f'batch_norm must be one of {BATCH_NORM}, got '
                      f'{self.batch_norm!r}')
    if self.image_size < 32:
      problems.append(f'image_size must be >= 32, got {self.image_size}')
    if not 0 < self.scale_min <= self.scale_max:
      problems.append(f'need 0 < scale_min <= scale_max, got '
                      f'{self.scale_min}, {self.scale_max}')
    if self.short_side < 1:
      problems.append(f'short_side must be positive, got {self.short_side}')
    if not self.anchor_sizes or min(self.anchor_sizes) <= 0:
      problems.append(f'anchor_sizes must be positive, got '
                      f'{self.anchor_sizes}')
    if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
      problems.append(f'aspect_ratios must be positive, got '
                      f'{self.aspect_ratios}')
    for name in ('max_instances', 'rpn_filters', 'rpn_batch_size_per_im',
                 'pre_nms_top_k', 'num_proposals', 'num_sampled_rois',
                 'block4_units', 'max_detections'):
      if getattr(self, name) < 1:
        problems.append(f'{name} must be positive, got {getattr(self, name)}')
    if not 0 <= self.head_batch_norm_decay < 1:
      problems.append(f'head_batch_norm_decay must be in [0, 1), got '
                      f'{self.head_batch_norm_decay}')
    if self.crop_size < 2 or self.crop_size % 2:
      problems.append(f'crop_size must be even and >= 2 (it is max-pooled '
                      f'by 2), got {self.crop_size}')
    if self.num_classes is not None and self.num_classes < 1:
      problems.append(f'num_classes must be >= 1, got {self.num_classes}')
    if self.lasso_l1 is not None and self.lasso_l1 < 0:
      problems.append(f'lasso_l1 must be >= 0, got {self.lasso_l1}')
    if problems:
      raise ValueError('; '.join(problems) + '.')


# ---------------------------------------------------------------------------
# The protocol.
# ---------------------------------------------------------------------------


@registry.register_protocol('detection')
class DetectionProtocol(runner.Protocol):
  """Faster R-CNN fine-tuning, VOC07 mAP (section 5, PASCAL VOC 2007)."""

  config_class = DetectionConfig
  data_kind = 'detection'
  # Our choice (BUILD.md): RMSProp 1e-4, batch 2, 100k steps, / 10 after 80k.
  run_defaults = dict(train_steps=100000, batch_size=2, eval_batch_size=4,
                      optimizer='rmsprop', learning_rate=1e-4,
                      lr_decay_steps=80000, lr_decay_rate=0.1)
  trunk_defaults = dict(output_stride=16)
  paper_columns = ('Tables 1-4: PASCAL (mAP at IoU 0.5); section 6.2: mAP at '
                   'IoU 0.75')
  headline = 'mAP@50'
  table_header = '| Pre-training | PASCAL mAP@0.5 | PASCAL mAP@0.75 |'
  # Built by build().
  model = None
  labeler = None
  _anchors = None

  def validate(self):
    super().validate()
    c = self.config
    level = detector_lib.feature_level(self.trunk.effective_output_stride)
    if c.image_size % 2**level:
      raise ValueError(f'image_size {c.image_size} must be a multiple of the '
                       f'output stride {2**level}.')
    self.resolve_num_classes()
    if c.block4_checkpoint and not tf.io.gfile.exists(
        c.block4_checkpoint + '.index') and not tf.io.gfile.isdir(
            c.block4_checkpoint):
      raise ValueError(f'block4_checkpoint {c.block4_checkpoint!r} does not '
                       f'exist.')

  # Data -------------------------------------------------------------------
  def _scaled(self, ex, scale):
    """Resizes image and boxes by `scale`; returns (image, boxes, size)."""
    size = tf.cast(tf.shape(ex['image'])[:2], tf.float32)
    new_size = tf.maximum(tf.cast(tf.round(size * scale), tf.int32), 1)
    image = tf.image.resize(tf.cast(ex['image'], tf.float32), new_size,
                            antialias=True)
    return image, new_size

  def _base_scale(self, ex):
    c = self.config
    size = tf.cast(tf.shape(ex['image'])[:2], tf.float32)
    return tf.minimum(c.short_side / tf.reduce_min(size),
                      c.image_size / tf.reduce_max(size))

  def _canvas(self, image):
    c = self.config
    image = preprocessing.vgg_preprocess(image)
    image = tf.image.pad_to_bounding_box(image, 0, 0, c.image_size,
                                         c.image_size)
    image.set_shape([c.image_size, c.image_size, 3])
    return image

  def train_dataset(self, seed, start, batch_size):
    c = self.config
    counter = self.train_source.counter

    def _example(ex):
      key = augment.example_seed(seed, ex['index'])
      classes = label_checks.assert_class_range(
          ex['classes'], c.num_classes, ex['index'], 'object class')
      jitter = tf.random.stateless_uniform([], augment.fold(key, 1),
                                           c.scale_min, c.scale_max)
      scale = self._base_scale(ex) * jitter
      image, new_size = self._scaled(ex, scale)
      boxes = ex['boxes']
      if c.flip:
        flip = augment.random_flip(key)
        image = tf.where(flip, image[:, ::-1], image)
        width = tf.cast(tf.shape(ex['image'])[1], tf.float32)
        flipped = tf.stack([boxes[:, 0], width - boxes[:, 3], boxes[:, 2],
                            width - boxes[:, 1]], axis=1)
        boxes = tf.where(flip, flipped, boxes)
      room = tf.maximum(new_size - c.image_size, 0)
      offset = tf.cast(
          tf.math.floor(tf.random.stateless_uniform([2], augment.fold(key, 2))
                        * tf.cast(room + 1, tf.float32)), tf.int32)
      offset = tf.minimum(offset, room)
      crop = tf.minimum(new_size, c.image_size)
      image = tf.slice(image, tf.concat([offset, [0]], 0),
                       tf.concat([crop, [3]], 0))
      boxes = preprocess_ops.resize_and_crop_boxes(
          boxes, tf.stack([scale, scale]), crop, tf.cast(offset, tf.float32))
      # Non-difficult boxes that still cover some of the crop.
      keep = (~ex['difficult'] & (boxes[:, 2] > boxes[:, 0])
              & (boxes[:, 3] > boxes[:, 1]))
      boxes = tf.boolean_mask(boxes, keep)
      classes = tf.boolean_mask(classes, keep)
      num = tf.shape(classes)[0]
      boxes = counter.note(num > c.max_instances, 'truncated_to_max_instances',
                           boxes)
      return {
          'index': ex['index'],
          'image': self._canvas(image),
          'image_shape': tf.cast(crop, tf.float32),
          'gt_boxes': preprocess_ops.clip_or_pad_to_fixed_size(
              boxes, c.max_instances, -1),
          'gt_classes': preprocess_ops.clip_or_pad_to_fixed_size(
              tf.cast(classes, tf.int32) + 1, c.max_instances, -1),
      }, num > 0

    ds = self.train_source.train(seed, start).map(
        _example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda ex, ok: counter.keep(ok, 'no_training_objects'))
    ds = ds.map(lambda ex, ok: ex)
    return ds.batch(batch_size, drop_remainder=True).prefetch(2)

  def eval_dataset(self, batch_size):
    c = self.config

    def _example(ex):
      classes = label_checks.assert_class_range(
          ex['classes'], c.num_classes, ex['index'], 'object class')
      scale = self._base_scale(ex)
      image, new_size = self._scaled(ex, scale)
      return {
          'index': ex['index'],
          'image': self._canvas(image),
          'image_shape': tf.cast(new_size, tf.float32),
          'scale': scale,
          'original_size': tf.shape(ex['image'])[:2],
          'boxes': ex['boxes'],
          'classes': classes,
          'difficult': ex['difficult'],
      }

    ds = self.eval_source.eval().map(
        _example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.padded_batch(batch_size, padding_values={
        'index': tf.constant(0, tf.int64), 'image': 0.0, 'image_shape': 0.0,
        'scale': 0.0, 'original_size': 0, 'boxes': -1.0,
        'classes': tf.constant(-1, tf.int64), 'difficult': False,
    }).prefetch(2)

  # Model ------------------------------------------------------------------
  def build(self, batch):
    c = self.config
    self.model = detector_lib.build_detector(self.trunk, c.num_classes, c)
    level = detector_lib.feature_level(self.trunk.effective_output_stride)
    self._anchors = detector_lib.make_anchors(c.image_size, level,
                                              c.anchor_sizes, c.aspect_ratios)
    self.labeler = anchor_lib.RpnAnchorLabeler(
        match_threshold=c.rpn_match_threshold,
        unmatched_threshold=c.rpn_unmatched_threshold,
        rpn_batch_size_per_im=c.rpn_batch_size_per_im,
        rpn_fg_fraction=c.rpn_fg_fraction)
    self.predict(batch)
    if c.block4_checkpoint:
      try:
        slim_checkpoint.load_slim_checkpoint(
            self.model.detection_head[0].block4, c.block4_checkpoint)
      except slim_checkpoint.SlimCheckpointError as e:
        raise runner.EvaluationError(
            f'block4_checkpoint {c.block4_checkpoint!r}: {e}') from None

  def _batched_anchors(self, batch_size):
    return {k: tf.tile(v[None], [batch_size, 1, 1, 1])
            for k, v in self._anchors.items()}

  @property
  def checkpoint_items(self):
    return {'backbone': self.trunk, 'detector': self.model}

  def trainable_variables(self):
    return list(self.model.trainable_variables)

  def _rpn_targets(self, gt_boxes, gt_classes):
    scores, boxes = [], []
    for b in range(gt_boxes.shape[0]):
      keep = gt_classes[b] > 0
      score_t, box_t = self.labeler.label_anchors(
          self._anchors, tf.boolean_mask(gt_boxes[b], keep),
          tf.boolean_mask(gt_classes[b], keep)[:, None])
      scores.append(score_t)
      boxes.append(box_t)
    stack = lambda items: {k: tf.stack([i[k] for i in items])
                           for k in items[0]}
    return stack(scores), stack(boxes)

  def losses(self, batch):
    c = self.config
    images = batch['image']
    batch_size = images.shape[0]
    outputs = self.model(
        images, batch['image_shape'],
        anchor_boxes=self._batched_anchors(batch_size),
        gt_boxes=batch['gt_boxes'], gt_classes=batch['gt_classes'],
        training=True)
    score_targets, box_targets = self._rpn_targets(batch['gt_boxes'],
                                                   batch['gt_classes'])
    rpn_score = maskrcnn_losses.RpnScoreLoss(c.rpn_batch_size_per_im)(
        outputs['rpn_scores'], score_targets)
    rpn_box = maskrcnn_losses.RpnBoxLoss(1.0 / 9.0)(outputs['rpn_boxes'],
                                                    box_targets)
    frcnn_class = maskrcnn_losses.FastrcnnClassLoss()(
        outputs['class_outputs'], outputs['class_targets'])
    frcnn_box = maskrcnn_losses.FastrcnnBoxLoss(1.0)(
        outputs['box_outputs'], outputs['class_targets'],
        outputs['box_targets'])
    reg_terms = list(self.model.rpn_head.losses)
    reg_terms += list(self.model.detection_head[0].losses)
    reg_terms += list(self.model.backbone.lasso.losses
                      if self.model.backbone.lasso is not None else [])
    reg_terms += list(self.trunk.losses)
    reg = tf.add_n([tf.constant(0.0)] + [tf.cast(r, tf.float32)
                                         for r in reg_terms])
    model_loss = rpn_score + rpn_box + frcnn_class + frcnn_box
    return {'rpn_score': rpn_score, 'rpn_box': rpn_box,
            'frcnn_class': frcnn_class, 'frcnn_box': frcnn_box,
            'regularization': reg, 'total': model_loss + reg}

  def predict(self, batch):
    images = batch['image']
    outputs = self.model(images, batch['image_shape'],
                         anchor_boxes=self._batched_anchors(tf.shape(images)[0]),
                         training=False)
    return {'boxes': outputs['detection_boxes'],
            'scores': outputs['detection_scores'],
            'classes': outputs['detection_classes'],
            'num': outputs['num_detections']}

  # Metrics ----------------------------------------------------------------
  def new_accumulator(self):
    return metrics_lib.DetectionAccumulator(
        self.config.num_classes, (0.5, 0.75), use_07_metric=True,
        class_names=self.eval_source.class_names)

  def accumulate(self, accumulator, batch, outputs):
    for i, image_id in enumerate(batch['index']):
      keep = batch['classes'][i] >= 0
      accumulator.add_ground_truth(int(image_id), batch['boxes'][i][keep],
                                   batch['classes'][i][keep],
                                   batch['difficult'][i][keep])
      n = int(outputs['num'][i])
      boxes = outputs['boxes'][i][:n] / batch['scale'][i]
      accumulator.add_detections(int(image_id), boxes, outputs['scores'][i][:n],
                                 outputs['classes'][i][:n] - 1)

  def chance(self):
    """mAP of `max_detections` uniformly random boxes per image."""
    ground_truth, sizes = [], []
    for ex in self.eval_source.eval():
      ground_truth.append((ex['boxes'].numpy(), ex['classes'].numpy(),
                           ex['difficult'].numpy()))
      sizes.append(tuple(ex['image'].shape[:2]))
    out = metrics_lib.random_detection_baseline(
        ground_truth, self.config.num_classes, sizes,
        self.config.max_detections, seed=0)
    return {k: v for k, v in out.items() if not k.startswith('AP@')}

  def table_row(self, label, metrics):
    return f'| {label} | {metrics["mAP@50"]:.2f} | {metrics["mAP@75"]:.2f} |'

  def lasso_layer(self):
    return None if self.model is None else self.model.backbone.lasso
