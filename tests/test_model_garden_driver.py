"""A stock Model Garden experiment on the trunk, end to end through its tools.

`fasterrcnn_resnetfpn_coco` names the `mtssl_resnet_v2` backbone, starts
from the variables of an `mtssl.export` SavedModel, trains and evaluates
with Model Garden's driver (`train_lib.run_experiment`), and is exported with
Model Garden's detection export module; the exported SavedModel is loaded
and run on an image.
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import tf_keras
from official.core import exp_factory
from official.core import task_factory
from official.core import train_lib
from official.modeling import hyperparams
from official.vision.serving import detection as detection_serving
from official.vision.serving import export_saved_model_lib

from mtssl.deploy import saved_model
from mtssl.deploy import model_garden
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import synthetic
from tests.test_model_garden import _detection_record

TRUNK = 'resnet_v2_small'
IMAGE_SIZE = 64
TRAIN_STEPS = 2
LEARNING_RATE = 0.01


def _pretrained_trunk(seed):
  """The trunk's own initialization with non-trivial batch-norm statistics."""
  tf_keras.utils.set_random_seed(seed)
  trunk = resnet_v2.trunk_from_name(TRUNK).build_for_input()
  rng = np.random.default_rng(seed)
  for var in trunk.variables:
    if 'moving_variance' in var.name or 'gamma' in var.name:
      var.assign(rng.uniform(0.5, 1.5, var.shape).astype(np.float32))
    elif 'moving_mean' in var.name or 'beta' in var.name:
      var.assign(rng.uniform(-0.2, 0.2, var.shape).astype(np.float32))
  return trunk


def _stock_fasterrcnn(init_checkpoint, record):
  """Model Garden's own experiment, shrunk for a CPU test."""
  config = exp_factory.get_exp_config('fasterrcnn_resnetfpn_coco')
  config.override({
      'runtime': {'mixed_precision_dtype': 'float32'},
      'task': {
          'init_checkpoint': init_checkpoint,
          'init_checkpoint_modules': 'backbone',
          'annotation_file': None,  # COCO ground truth from the eval data.
          'model': {
              'num_classes': synthetic.NUM_CLASSES + 1,
              'input_size': [IMAGE_SIZE, IMAGE_SIZE, 3],
              'backbone': {'type': 'mtssl_resnet_v2',
                           'mtssl_resnet_v2': {'trunk': TRUNK,
                                               'output_stride': 16}},
              'decoder': {'fpn': {'num_filters': 16}},
              'rpn_head': {'num_filters': 16, 'num_convs': 1},
              'detection_head': {'num_filters': 16, 'num_convs': 0,
                                 'num_fcs': 1, 'fc_dims': 32},
              'roi_generator': {'pre_nms_top_k': 256, 'num_proposals': 64,
                                'test_pre_nms_top_k': 256,
                                'test_num_proposals': 32},
              'roi_sampler': {'num_sampled_rois': 32},
              # A detector trained for a few steps scores below the default
              # 0.05 threshold; keep every box so the served output is
              # compared on real detections.
              # Batched NMS is one op; the default (v2) traces an NMS loop
              # per class, which took most of this test's time on CPU.
              'detection_generator': {'pre_nms_top_k': 100,
                                      'pre_nms_score_threshold': 0.0,
                                      'max_num_detections': 10,
                                      'nms_version': 'batched'},
          },
          'train_data': {'input_path': record, 'global_batch_size': 2,
                         'shuffle_buffer_size': 2},
          'validation_data': {'input_path': record, 'global_batch_size': 2},
      },
      'trainer': {
          'train_steps': TRAIN_STEPS, 'steps_per_loop': TRAIN_STEPS,
          'summary_interval': TRAIN_STEPS, 'checkpoint_interval': TRAIN_STEPS,
          'validation_interval': TRAIN_STEPS, 'validation_steps': 1,
          'optimizer_config': {
              'learning_rate': {'type': 'constant',
                                'constant': {'learning_rate': LEARNING_RATE}},
              'warmup': {'type': None}},
      },
  }, is_strict=True)
  config.validate()
  return config


class StockExperimentTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.trunk = _pretrained_trunk(7)
    checkpoint = slim_checkpoint.write_trunk_checkpoint(
        cls.trunk, os.path.join(cls.tmp, 'trunk', 'ckpt'))
    # What `python -m mtssl.export --output_stride=16` writes.
    exported = saved_model.export_saved_model(
        saved_model.load_trunk(checkpoint, TRUNK, output_stride=16),
        os.path.join(cls.tmp, 'serving'), image_size=(IMAGE_SIZE, IMAGE_SIZE),
        checkpoint=checkpoint)
    cls.init_checkpoint = os.path.join(exported.path, 'variables', 'variables')
    cls.record = os.path.join(cls.tmp, 'scenes.tfrecord')
    _detection_record(cls.record, IMAGE_SIZE, 4)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_stock_config_names_the_backbone(self):
    config = exp_factory.get_exp_config('fasterrcnn_resnetfpn_coco')
    self.assertIsInstance(config.task.model.backbone, model_garden.Backbone)
    yaml_path = os.path.join(self.tmp, 'backbone.yaml')
    with open(yaml_path, 'w') as f:
      f.write('task:\n  model:\n    backbone:\n      type: mtssl_resnet_v2\n'
              '      mtssl_resnet_v2:\n        trunk: resnet_v2_small\n')
    config = hyperparams.override_params_dict(config, yaml_path,
                                              is_strict=True)
    config.validate()
    self.assertEqual(config.task.model.backbone.get(),
                     model_garden.MtsslResNetV2(trunk=TRUNK))

  def test_train_eval_export_serve(self):
    config = _stock_fasterrcnn(self.init_checkpoint, self.record)
    model_dir = os.path.join(self.tmp, 'detector')
    task = task_factory.get_task(config.task, logging_dir=model_dir)
    model, eval_logs = train_lib.run_experiment(
        distribution_strategy=tf.distribute.get_strategy(), task=task,
        mode='train', params=config, model_dir=model_dir, run_post_eval=True)
    self.assertIsInstance(model.backbone, model_garden.ModelGardenResNetV2)
    # Model Garden's FPN spans levels 2-6: the trunk gives 2-4, the FPN adds
    # 5 and 6.
    self.assertEqual(sorted(model.backbone.output_specs), ['2', '3', '4'])
    self.assertEqual(sorted(model.decoder.output_specs),
                     ['2', '3', '4', '5', '6'])

    # Trained from the export: the SGD steps moved the trunk off the exported
    # values, by far less than the distance between the export and a fresh
    # initialization. Measured on kernels (4 steps): change at most 6e-4 of
    # that distance (conv1: 3.1e-4 against 0.52); bound 1e-2.
    fresh = resnet_v2.trunk_from_name(TRUNK).build_for_input()
    self.assertLen(model.backbone.variables, len(self.trunk.variables))
    moved = []
    for got, want, other in zip(model.backbone.variables,
                                self.trunk.variables, fresh.variables):
      change = np.abs(got.numpy() - want.numpy()).max()
      moved.append(change > 0)
      if 'kernel' in got.name:
        distance = np.abs(other.numpy() - want.numpy()).max()
        self.assertLess(change, 1e-2 * distance, got.name)
    # Measured: every variable moved (conv biases by about 1e-6).
    self.assertGreater(np.mean(moved), 0.75)
    self.assertEqual(os.path.basename(tf.train.latest_checkpoint(model_dir)),
                     f'ckpt-{TRAIN_STEPS}')
    # Model Garden's COCO evaluation ran on the validation data.
    self.assertBetween(eval_logs['AP'], 0.0, 1.0)

    export_dir = os.path.join(self.tmp, 'detector_export')
    module = detection_serving.DetectionModule(
        params=config, batch_size=1, input_image_size=[IMAGE_SIZE, IMAGE_SIZE],
        input_type='image_tensor')
    export_saved_model_lib.export_inference_graph(
        input_type='image_tensor', batch_size=1,
        input_image_size=[IMAGE_SIZE, IMAGE_SIZE], params=config,
        checkpoint_path=model_dir, export_dir=export_dir,
        export_module=module)
    self.assertIn('mtssl_resnet_v2', tf.io.gfile.GFile(
        os.path.join(export_dir, 'params.yaml')).read())

    image = synthetic.render_scene(5, 0, IMAGE_SIZE, IMAGE_SIZE).image
    images = tf.constant(image[None], tf.uint8)
    loaded = tf.saved_model.load(export_dir)
    served = loaded.signatures['serving_default'](inputs=images)
    # The same module around the in-memory fine-tuned model.
    expected = detection_serving.DetectionModule(
        params=config, batch_size=1, input_image_size=[IMAGE_SIZE, IMAGE_SIZE],
        input_type='image_tensor', model=model).serve(images)
    num = int(served['num_detections'][0])
    self.assertGreater(num, 0)
    self.assertEqual(num, int(expected['num_detections'][0]))
    self.assertEqual(served['detection_boxes'].shape, (1, 10, 4))
    # Graph against eager: measured 3e-6 on scores, 1.2e-5 pixels on boxes.
    self.assertAllClose(served['detection_scores'][:, :num],
                        expected['detection_scores'][:, :num], atol=1e-4)
    self.assertAllClose(served['detection_boxes'][:, :num],
                        expected['detection_boxes'][:, :num], atol=1e-3)
    self.assertAllEqual(served['detection_classes'][:, :num],
                        expected['detection_classes'][:, :num])


if __name__ == '__main__':
  tf.test.main()
