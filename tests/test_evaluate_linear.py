"""The linear (ImageNet-frozen) protocol: pooling, learning, resume, bad input."""

import glob
import json
import os

import numpy as np
import tensorflow as tf

from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import data as data_lib
from mtssl.evaluation import factory
from mtssl.evaluation import linear
from mtssl.evaluation import runner
from mtssl.evaluation import trunks
from tests import eval_fixtures


def tiny_config(model_dir, **overrides):
  """A CPU-sized linear run on the built-in scenes."""
  options = dict(
      model_dir=model_dir, trunk='resnet_v2_tiny', output_stride=8,
      image_size=40, resize_size=48, train_steps=10, batch_size=8,
      eval_batch_size=50, synthetic_train_examples=64,
      synthetic_eval_examples=50, log_every=5, checkpoint_every=1000)
  options.update(overrides)
  return evaluation_config.make_config('linear', **options)


class LinearEndToEndTest(tf.test.TestCase):

  def test_learns_above_chance_and_writes_outputs(self):
    model_dir = self.get_temp_dir() + '/linear'
    config = tiny_config(
        model_dir, image_size=56, resize_size=64, train_steps=150,
        batch_size=32, eval_batch_size=100, synthetic_train_examples=600,
        synthetic_eval_examples=300, log_every=50)
    report = factory.make_evaluation(config).run()
    metrics = report['metrics']
    self.assertEqual(metrics['num_examples'], 300)
    self.assertEqual(report['chance'], {'top1': 10.0, 'top5': 50.0})
    # Measured (tiny random-init trunk, 150 steps, 300 held-out scenes):
    # top-1 32.0 / top-5 82.3 at seed 0 (the seed used here), 31.3 / 78.0
    # at seed 1, 32.0 / 79.0 at seed 2; chance 10 / 50.
    self.assertGreater(metrics['top1'], 20.0)
    self.assertGreater(metrics['top5'], 65.0)
    self.assertEqual(report['table_row'],
                     f'| Random init | {metrics["top1"]:.2f} | '
                     f'{metrics["top5"]:.2f} |')
    with open(os.path.join(model_dir, 'linear_metrics.json')) as f:
      saved = json.load(f)
    self.assertEqual(saved['metrics']['top5'], metrics['top5'])
    self.assertEqual(saved['trunk']['trunk'], 'resnet_v2_tiny')
    self.assertTrue(glob.glob(os.path.join(model_dir, 'train', 'events.*')))
    self.assertTrue(glob.glob(os.path.join(model_dir, 'eval', 'events.*')))
    history = [h['total_loss'] for h in saved['loss_history']]
    self.assertLess(history[-1], history[0])

  def test_resumed_run_continues_the_same_stream(self):
    base = self.get_temp_dir()
    whole = factory.make_evaluation(
        tiny_config(base + '/whole', train_steps=6)).run()
    factory.make_evaluation(
        tiny_config(base + '/parts', train_steps=3)).run()
    resumed = factory.make_evaluation(
        tiny_config(base + '/parts', train_steps=6)).run()
    self.assertEqual(resumed['steps'], 6)

    def head_weights(model_dir):
      reader = tf.train.load_checkpoint(model_dir + '/checkpoints')
      return {n: reader.get_tensor(n)
              for n, _ in tf.train.list_variables(model_dir + '/checkpoints')
              if n.startswith('head/') and 'OPTIMIZER' not in n}

    a, b = head_weights(base + '/whole'), head_weights(base + '/parts')
    self.assertNotEmpty(a)
    self.assertEqual(sorted(a), sorted(b))
    for name in a:
      self.assertAllClose(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    self.assertEqual(whole['metrics'], resumed['metrics'])
    # The same directory for a different model is refused, not half-loaded.
    with self.assertRaisesRegex(runner.EvaluationError,
                                r'holds checkpoint .*ckpt-6 of another run'):
      factory.make_evaluation(tiny_config(
          base + '/parts', train_steps=8, lasso_l1=0.0)).run()

  def test_lasso_learns_unit_weights(self):
    report = factory.make_evaluation(tiny_config(
        self.get_temp_dir() + '/lasso', lasso_l1=1e-3,
        learning_rate=0.05)).run()
    alpha = np.array(report['protocol_config']['lasso_alpha'])
    self.assertLen(alpha, 3)  # resnet_v2_tiny has 3 block-3 units
    self.assertAllClose(np.sum(alpha**2), 1.0, atol=1e-5)
    self.assertNotAllClose(alpha, [0.0, 0.0, 1.0])  # moved from the init


class _BadLabels(data_lib.SyntheticLabeled):
  """Synthetic classification whose example 3 carries label 12."""

  def _render(self, stream, index):
    image, label = super()._render(stream, index)
    return image, np.int64(12 if index == 3 else label)


class LinearBadInputTest(tf.test.TestCase):

  def test_label_outside_class_range_is_named(self):
    trunk = trunks.make_trunk_provider(
        trunks.TrunkSpec('resnet_v2_tiny', 8)).build()
    source = _BadLabels('classification', 32, 32, eval_examples=8,
                        train_examples=8)
    protocol = linear.LinearProtocol(
        linear.LinearConfig(image_size=32, resize_size=32), trunk, source,
        source)
    config = runner.RunConfig(model_dir=self.get_temp_dir() + '/bad',
                              train_steps=4, batch_size=2)
    with self.assertRaisesRegex(
        runner.EvaluationError,
        r'^label 12 of example 3 is outside the class range \[0, 10\)$'):
      runner.run(protocol, config)

  def test_tfds_split_missing_or_label_outside_range(self):
    data_dir = eval_fixtures.prepare_tiny_tfds(self.get_temp_dir() + '/tfds')
    spec = f'tfds:{eval_fixtures.TINY_TFDS_NAME}'
    config = tiny_config(self.get_temp_dir() + '/t', data=spec,
                         tfds_data_dir=data_dir, train_steps=2,
                         batch_size=4)
    config.inputs.eval_data = spec + ':validation'
    with self.assertRaisesRegex(
        data_lib.DataSourceError,
        r"has no split 'validation'; it has \['test', 'train'\]"):
      factory.make_evaluation(config)
    config.protocol_config.num_classes = 2
    config.inputs.eval_data = None
    with self.assertRaisesRegex(data_lib.DataSourceError,
                                r'has 3 classes but --num_classes is 2'):
      factory.make_evaluation(config)
    # The default evaluation split ('test') holds a label -1.
    config.protocol_config.num_classes = None
    evaluation = factory.make_evaluation(config)
    self.assertEqual(evaluation.eval_source.name,
                     f'tfds:{eval_fixtures.TINY_TFDS_NAME}:test')
    with self.assertRaisesRegex(runner.EvaluationError,
                                r'label -1 of example \d is outside the class '
                                r'range \[0, 3\)'):
      evaluation.run()

  def test_folder_classes_and_skipped_files(self):
    root = self.get_temp_dir() + '/classes'
    for name, color in (('apple', 0), ('pear', 255)):
      os.makedirs(os.path.join(root, name))
      for i in range(2):
        image = np.full([8, 8, 3], color, np.uint8)
        tf.io.write_file(os.path.join(root, name, f'{i}.png'),
                         tf.io.encode_png(image))
    with open(os.path.join(root, 'pear', 'broken.jpg'), 'wb') as f:
      f.write(b'not a jpeg')
    source = data_lib.make_labeled_source('classification', 'folder:' + root)
    source.validate()
    self.assertEqual(source.class_names, ['apple', 'pear'])
    examples = list(source.eval())
    self.assertEqual([int(e['label']) for e in examples], [0, 0, 1, 1])
    for ex in examples:
      self.assertEqual(int(ex['image'][0, 0, 0]), 255 * int(ex['label']))
    self.assertEqual(source.counter.problems(), {'skipped_corrupt': 1})
    labels = [int(e['label']) for e in source.train(seed=0).take(10)]
    # An epoch visits the 5 files once; the broken one leaves a gap.
    self.assertEqual(sorted(labels[:4]), [0, 0, 1, 1])

  def test_folder_needs_class_folders_and_an_eval_split(self):
    root = self.get_temp_dir() + '/folder'
    os.makedirs(root + '/cat')
    os.makedirs(root + '/dog')
    with self.assertRaisesRegex(ValueError, 'give --eval_data'):
      factory.make_evaluation(tiny_config(
          self.get_temp_dir(), data='folder:' + root))
    with self.assertRaisesRegex(data_lib.DataSourceError,
                                r'class folder\(s\) cat, dog contain no image'):
      factory.make_evaluation(tiny_config(
          self.get_temp_dir(), data='folder:' + root,
          eval_data='folder:' + root))


if __name__ == '__main__':
  tf.test.main()
