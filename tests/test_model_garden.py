"""The trunk as a Model Garden backbone: configs, restore, a training step."""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras
from absl.testing import parameterized
from official.core import exp_factory
from official.core import task_factory
from official.modeling import hyperparams
from official.vision.ops import preprocess_ops

from mtssl.deploy import model_garden
from mtssl.ops import preprocessing
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import synthetic

TRUNK = 'resnet_v2_tiny'

_CLASSIFICATION_YAML = """
task:
  init_checkpoint: {checkpoint}
  init_checkpoint_modules: backbone
  model:
    num_classes: 3
    input_size: [64, 64, 3]
    backbone:
      type: mtssl_resnet_v2
      mtssl_resnet_v2:
        trunk: resnet_v2_tiny
        output_stride: 16
  losses:
    l2_weight_decay: 0.0001
"""


def _random_trunk(seed):
  trunk = resnet_v2.trunk_from_name(TRUNK).build_for_input()
  rng = np.random.default_rng(seed)
  for var in trunk.variables:
    low = 0.5 if 'moving_variance' in var.name else -0.2
    var.assign(rng.uniform(low, low + 1.0, var.shape).astype(np.float32))
  return trunk


def _detection_record(path, size, count):
  """Model Garden's tf.Example detection format, from synthetic scenes."""
  def floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))

  def ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

  def strings(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

  with tf.io.TFRecordWriter(path) as writer:
    for i in range(count):
      scene = synthetic.render_scene(5, i, size, size)
      boxes = scene.boxes.astype(np.float64) / size
      feature = {
          'image/encoded': strings([tf.io.encode_jpeg(scene.image).numpy()]),
          'image/source_id': strings([str(i).encode()]),
          'image/height': ints([size]),
          'image/width': ints([size]),
          'image/object/bbox/ymin': floats(boxes[:, 0]),
          'image/object/bbox/xmin': floats(boxes[:, 1]),
          'image/object/bbox/ymax': floats(boxes[:, 2]),
          'image/object/bbox/xmax': floats(boxes[:, 3]),
          'image/object/class/label': ints(scene.classes.astype(int) + 1),
          'image/object/is_crowd': ints([0] * len(scene.classes)),
          'image/object/area': floats(
              (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
              * size * size),
      }
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=feature)).SerializeToString())


class BackboneTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(
      (TRUNK, 16, {'3': 'block1', '4': 'block3'}),
      (TRUNK, 8, {'3': 'block3'}),
      (TRUNK, 0, {'3': 'block1', '4': 'block2', '5': 'block3'}),
      # block1 of two units: the first ends at stride 4 (level 2).
      ('resnet_v2_small', 16, {'2': 'block1/unit_1/bottleneck_v2',
                               '3': 'block1', '4': 'block3'}),
  )
  def test_endpoints_by_level(self, trunk, output_stride, expected):
    spec = tf_keras.layers.InputSpec(shape=[None, 64, 96, 3])
    backbone = model_garden.build_backbone(trunk, output_stride, spec)
    self.assertEqual(backbone.endpoint_names,
                     {k: f'{trunk}/{v}' for k, v in expected.items()})
    images = tf.random.stateless_normal([1, 64, 96, 3], [1, 2])
    endpoints = backbone(images)
    slim = resnet_v2.ResNetV2.call(backbone, model_garden.trunk_input(images))
    self.assertEqual(sorted(endpoints), sorted(expected))
    for level, block in expected.items():
      self.assertAllEqual(endpoints[level], slim[f'{trunk}/{block}'])
      self.assertEqual(backbone.output_specs[level].as_list(),
                       [None] + endpoints[level].shape[1:].as_list())
      stride = 2 ** int(level)
      self.assertEqual(endpoints[level].shape[1:3], (64 // stride, 96 // stride))

  def test_trunk_input_undoes_model_garden_normalization(self):
    rgb = tf.constant(np.random.default_rng(3).integers(
        0, 256, (2, 8, 8, 3)), tf.uint8)
    # What Model Garden's input pipelines and serving modules feed.
    normalized = preprocess_ops.normalize_image(rgb)
    self.assertAllClose(model_garden.trunk_input(normalized),
                        preprocessing.vgg_preprocess(rgb), atol=1e-3)

  def test_unknown_trunk(self):
    with self.assertRaisesRegex(ValueError, "Unknown mtssl_resnet_v2 trunk 'x'"):
      model_garden.build_backbone('x')


class ModelGardenTaskTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.trunk = _random_trunk(11)
    cls.checkpoint = slim_checkpoint.write_trunk_checkpoint(
        cls.trunk, os.path.join(cls.tmp, 'ckpt'))

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def assert_restored(self, backbone):
    self.assertIsInstance(backbone, model_garden.ModelGardenResNetV2)
    self.assertLen(backbone.variables, len(self.trunk.variables))
    for got, want in zip(backbone.variables, self.trunk.variables):
      self.assertAllEqual(got, want)

  def assert_trained(self, before, variables):
    unchanged = [v.name for b, v in zip(before, variables)
                 if np.array_equal(b, v.numpy())]
    # Every kernel, gamma and beta moved. A conv bias whose output reaches
    # the loss only through a batch norm on batch statistics has an
    # analytically zero gradient (the norm subtracts it again), so biases may
    # stay put.
    self.assertTrue(all(name.endswith('/bias:0') for name in unchanged),
                    unchanged)
    self.assertLess(len(unchanged), len(variables) // 4)

  def test_classification_config_restores_and_trains(self):
    yaml_path = os.path.join(self.tmp, 'classification.yaml')
    with open(yaml_path, 'w') as f:
      f.write(_CLASSIFICATION_YAML.format(checkpoint=self.checkpoint))
    config = exp_factory.get_exp_config('mtssl_image_classification')
    config = hyperparams.override_params_dict(config, yaml_path,
                                              is_strict=True)
    task = task_factory.get_task(config.task)
    model = task.build_model()
    # The task's l2_weight_decay reaches the trunk in Slim form.
    self.assertAllClose(model.backbone.weight_decay, 1e-4)
    task.initialize(model)  # Model Garden's init_checkpoint_modules: backbone.
    self.assert_restored(model.backbone)

    before = [v.numpy() for v in model.backbone.trainable_variables]
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-100, 100, (4, 64, 64, 3)), tf.float32)
    labels = tf.constant([0, 1, 2, 1])
    optimizer = tf_keras.optimizers.SGD(0.01)
    logs = task.train_step((images, labels), model, optimizer,
                           metrics=task.build_metrics(training=True))
    self.assertTrue(np.isfinite(logs['loss']))
    self.assert_trained(before, model.backbone.trainable_variables)

  def test_fasterrcnn_restores_and_trains(self):
    record = os.path.join(self.tmp, 'train.tfrecord')
    _detection_record(record, 96, 2)
    config = exp_factory.get_exp_config('mtssl_fasterrcnn')
    self.assertEqual(config.task.model.backbone.type, 'mtssl_resnet_v2')
    self.assertEqual(config.task.init_checkpoint_modules, 'backbone')
    config.override({'task': {
        'init_checkpoint': os.path.dirname(self.checkpoint),
        'annotation_file': None, 'use_coco_metrics': False,
        'model': {
            'num_classes': synthetic.NUM_CLASSES + 1,
            'input_size': [128, 128, 3],
            'backbone': {'mtssl_resnet_v2': {'trunk': TRUNK}},
            'decoder': {'fpn': {'num_filters': 16}},
            'rpn_head': {'num_filters': 16, 'num_convs': 1},
            'detection_head': {'num_filters': 16, 'num_convs': 0,
                               'num_fcs': 1, 'fc_dims': 32},
            'roi_sampler': {'num_sampled_rois': 32},
        },
        'train_data': {'input_path': record, 'global_batch_size': 2,
                       'shuffle_buffer_size': 2,
                       'parser': {'aug_scale_min': 1.0, 'aug_scale_max': 1.0}},
    }}, is_strict=True)
    task = task_factory.get_task(config.task)
    model = task.build_model()
    task.initialize(model)
    self.assert_restored(model.backbone)

    features, labels = next(iter(task.build_inputs(config.task.train_data)))
    before = [v.numpy() for v in model.backbone.trainable_variables]
    logs = task.train_step((features, labels), model,
                           tf_keras.optimizers.SGD(0.01),
                           metrics=task.build_metrics(training=True))
    self.assertTrue(np.isfinite(logs['loss']))
    self.assert_trained(before, model.backbone.trainable_variables)


if __name__ == '__main__':
  tf.test.main()
