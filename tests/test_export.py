"""The TF Serving export: layout, outputs, warmup, bad input, reuse as a layer.

One tiny-trunk export (made through the command-line entry point) serves
every test; the processes that must run outside this one (a fresh Python
without mtssl, which also prints what `saved_model_cli show --all` prints,
and `saved_model_cli run`) start right after it, in parallel, and each test
waits for the one it checks.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras
from absl import flags
from tensorflow_serving.apis import prediction_log_pb2

from mtssl import export
from mtssl.deploy import saved_model
from mtssl.deploy import serving
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import sources
from mtssl.data import synthetic
from mtssl.ops.preprocessing import vgg_preprocess

TRUNK = 'resnet_v2_tiny'
SIZE = 64  # Serving size; the tiny trunk at stride 8 gives 8x8x128 features.
DEPTH = 128
MODEL = 'feat'
TOL = dict(atol=1e-5, rtol=1e-5)
# from_pixels and __call__ against the eager trunk: the saved graph sums in
# another order, so block3 differs by a few float32 ulps of its largest
# activations (|block3| up to 117 and 69 here). Measured in 15 runs each with
# 1, 2 (all cores) and 8 intra-op threads (5 of them with the two logical
# CPUs of conftest.py): bit-identical every time, max |difference| 3.05e-5
# (from_pixels) and 1.53e-5 (__call__), i.e. atol 1.69e-5 and 1.04e-5 needed
# at rtol 1e-5, both over TOL. 5e-5 is 3x the larger need.
GRAPH_TOL = dict(atol=5e-5, rtol=1e-5)

# Runs with a cwd and PYTHONPATH outside the repository. An installed copy
# of mtssl (pip install -e) would still be importable, so the script also
# blocks the name: the SavedModel must load and run with no mtssl code.
_FRESH_PROCESS = textwrap.dedent('''
    import json
    import os
    import sys
    sys.modules['mtssl'] = None
    try:
      import mtssl
      print('MTSSL_IMPORTABLE')
    except ImportError:
      print('MTSSL_NOT_IMPORTABLE')
    print('SYS_PATH=' + json.dumps([os.path.abspath(p or '.') for p in sys.path]))
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    with open(sys.argv[2], 'rb') as f:
      data = f.read()
    out = model.signatures['serving_default'](images=tf.constant([data]))
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
    # saved_model_cli's `show --all` (its flags are read by its main alone).
    from tensorflow.python.tools import saved_model_cli
    print('SHOW_ALL')
    saved_model_cli._show_all(sys.argv[1])
    ''')


def _run_export(argv):
  fv = flags.FlagValues()
  export.define_flags(fv)
  fv(['mtssl.export'] + argv)
  return export.main(['mtssl.export'], fv)


def _random_trunk(seed):
  """A tiny trunk with random weights and batch-norm statistics."""
  trunk = resnet_v2.trunk_from_name(TRUNK, output_stride=8).build_for_input()
  rng = np.random.default_rng(seed)
  for var in trunk.variables:
    if 'moving_variance' in var.name:
      value = rng.uniform(0.5, 1.5, var.shape)
    elif 'gamma' in var.name:
      value = rng.uniform(0.8, 1.2, var.shape)
    else:
      value = rng.normal(0.0, 0.1, var.shape)
    var.assign(value.astype(np.float32))
  return trunk


class ExportTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp()
    cls.base = os.path.join(cls.tmp, 'models')
    cls.checkpoint_dir = os.path.join(cls.tmp, 'ckpt')
    slim_checkpoint.write_trunk_checkpoint(_random_trunk(7), cls.checkpoint_dir)
    cls.status = _run_export([
        f'--checkpoint={cls.checkpoint_dir}', f'--trunk={TRUNK}',
        f'--export_base={cls.base}', f'--model_name={MODEL}',
        f'--image_size={SIZE}'])
    cls.export_dir = os.path.join(cls.base, MODEL, '1')
    cls.png = tf.io.encode_png(synthetic.synthetic_image(3, 0, SIZE, SIZE)).numpy()
    cls.png_path = os.path.join(cls.tmp, 'sample.png')
    with open(cls.png_path, 'wb') as f:
      f.write(cls.png)
    # saved_model_cli reads string inputs from an object array in a .npy.
    cls.png_npy = os.path.join(cls.tmp, 'sample.npy')
    np.save(cls.png_npy, np.array([cls.png], dtype=object))
    cls.procs = cls._start_outside_processes()
    cls.results = {}
    # The reference: the Keras trunk restored from the same checkpoint.
    cls.trunk = resnet_v2.trunk_from_name(TRUNK, output_stride=8)
    slim_checkpoint.restore_trunk(cls.trunk, cls.checkpoint_dir)
    cls.loaded = tf.saved_model.load(cls.export_dir)

  @classmethod
  def _start_outside_processes(cls):
    env = dict(os.environ)
    env.pop('PYTHONPATH', None)
    env['TF_CPP_MIN_LOG_LEVEL'] = '2'
    cli = shutil.which('saved_model_cli') or 'saved_model_cli'
    cls.cli_out = os.path.join(cls.tmp, 'cli_out')
    commands = {
        'fresh': [sys.executable, '-c', _FRESH_PROCESS, cls.export_dir,
                  cls.png_path, os.path.join(cls.tmp, 'fresh.npz')],
        'run': [cli, 'run', '--dir', cls.export_dir, '--tag_set', 'serve',
                '--signature_def', serving.SERVING_SIGNATURE, '--inputs',
                f'images={cls.png_npy}', '--outdir', cls.cli_out],
    }
    procs = {name: subprocess.Popen(cmd, cwd=cls.tmp, env=env, text=True,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
             for name, cmd in commands.items()}
    # The entry point itself, from the repository, refusing version 1.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs['entry'] = subprocess.Popen(
        [sys.executable, '-m', 'mtssl.export',
         f'--checkpoint={cls.checkpoint_dir}', f'--trunk={TRUNK}',
         f'--export_base={cls.base}', f'--model_name={MODEL}', '--version=1'],
        cwd=repo, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return procs

  @classmethod
  def _wait(cls, name):
    """(return code, stdout, stderr) of an outside process, once it ends."""
    if name not in cls.results:
      out, err = cls.procs[name].communicate(timeout=600)
      cls.results[name] = (cls.procs[name].returncode, out, err)
    return cls.results[name]

  @classmethod
  def tearDownClass(cls):
    for proc in cls.procs.values():
      if proc.poll() is None:
        proc.kill()
      proc.communicate()
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def reference(self, pixels):
    block3 = self.trunk(vgg_preprocess(pixels), training=False)[
        self.trunk.output_name]
    return block3.numpy()

  # Layout and metadata.

  def test_tf_serving_layout(self):
    self.assertEqual(self.status, 0)
    for path in ('saved_model.pb', 'variables/variables.index',
                 'assets.extra/tf_serving_warmup_requests',
                 'assets.extra/mtssl_export.json'):
      self.assertTrue(os.path.exists(os.path.join(self.export_dir, path)), path)
    with open(os.path.join(self.export_dir, 'assets.extra',
                           'mtssl_export.json')) as f:
      meta = json.load(f)
    self.assertEqual(meta['trunk'], TRUNK)
    self.assertEqual(meta['output_stride'], 8)
    self.assertEqual(meta['image_size'], [SIZE, SIZE])
    outputs = meta['signatures']['serving_default']['outputs']
    self.assertEqual(outputs['block3']['shape'], [None, 8, 8, DEPTH])
    self.assertEqual(outputs['pooled']['shape'], [None, 3, 3, DEPTH])
    self.assertTrue(meta['checkpoint'].endswith('backbone-1'))

  def test_next_version(self):
    model_dir = os.path.join(self.tmp, 'versions')
    self.assertEqual(saved_model.next_version(model_dir), 1)
    for name in ('3', '10', '.11.tmp-x', 'notes'):
      os.makedirs(os.path.join(model_dir, name))
    self.assertEqual(saved_model.next_version(model_dir), 11)

  # Outputs equal the Keras trunk's.

  def test_serving_default_matches_trunk(self):
    rgb = synthetic.synthetic_image(3, 1, SIZE, SIZE)
    rgba = np.concatenate(
        [synthetic.synthetic_image(3, 2, SIZE, SIZE),
         np.tile(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None],
                 [SIZE, 1, 1])], axis=-1)
    gray = synthetic.synthetic_image(3, 3, SIZE, SIZE)[..., :1]
    small = synthetic.synthetic_image(3, 4, 40, 90)
    encoded = [tf.io.encode_png(rgb).numpy(), tf.io.encode_png(rgba).numpy(),
               tf.io.encode_png(gray).numpy(),
               tf.io.encode_jpeg(small, quality=95).numpy()]
    # Expected pixels from independent decoders: PNG round trips exactly;
    # alpha is composited over white as the training data sources do; the
    # JPEG of another size is decoded and resized as documented.
    rgba_pixels, status = sources.decode_image_bytes(encoded[1])
    self.assertEqual(status, sources.ALPHA)
    jpeg = tf.cast(tf.io.decode_jpeg(encoded[3]), tf.float32)
    expected_pixels = np.stack([
        rgb.astype(np.float32), rgba_pixels.astype(np.float32),
        np.repeat(gray, 3, axis=-1).astype(np.float32),
        tf.image.resize(jpeg, [SIZE, SIZE], antialias=True).numpy()])
    out = self.loaded.signatures['serving_default'](images=tf.constant(encoded))
    expected = self.reference(expected_pixels)
    self.assertEqual(out['block3'].shape, (4, 8, 8, DEPTH))
    self.assertAllClose(out['block3'], expected, **TOL)
    # 8x8 map: bins [0, 3), [2, 6), [5, 8) on each axis.
    bins = [(0, 3), (2, 6), (5, 8)]
    pooled = np.stack([np.stack([expected[:, a:b, c:d].max(axis=(1, 2))
                                 for c, d in bins], axis=1)
                       for a, b in bins], axis=1)
    self.assertAllClose(out['pooled'], pooled, **TOL)

  def test_from_pixels_matches_trunk_at_any_size(self):
    pixels = np.random.default_rng(1).uniform(0, 255, (2, 40, 56, 3))
    pixels = pixels.astype(np.float32)
    out = self.loaded.signatures['from_pixels'](pixels=tf.constant(pixels))
    self.assertEqual(out['block3'].shape, (2, 5, 7, DEPTH))
    self.assertEqual(out['pooled'].shape, (2, 3, 3, DEPTH))
    self.assertAllClose(out['block3'], self.reference(pixels), **GRAPH_TOL)

  def test_variables_restore_into_a_trunk(self):
    trunk = resnet_v2.trunk_from_name(TRUNK).build_for_input()
    tf.train.Checkpoint(backbone=trunk).read(
        os.path.join(self.export_dir, 'variables', 'variables')
    ).assert_existing_objects_matched().expect_partial()
    for got, want in zip(trunk.variables, self.trunk.variables):
      self.assertAllEqual(got, want)

  # Warmup records.

  def test_warmup_records_parse_and_run(self):
    path = os.path.join(self.export_dir, 'assets.extra',
                        'tf_serving_warmup_requests')
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
            for r in tf.data.TFRecordDataset(path)]
    self.assertLen(logs, 3)
    signatures = [log.predict_log.request.model_spec.signature_name
                  for log in logs]
    self.assertEqual(signatures,
                     ['serving_default', 'serving_default', 'from_pixels'])
    batch_sizes = []
    for log in logs:
      request = log.predict_log.request
      self.assertEqual(request.model_spec.name, MODEL)
      inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
      if 'images' in inputs:
        for data in inputs['images']:
          self.assertIsNotNone(sources.decode_image_bytes(data)[0])
      out = self.loaded.signatures[request.model_spec.signature_name](
          **{k: tf.constant(v) for k, v in inputs.items()})
      self.assertEqual(out['block3'].shape[1:], (8, 8, DEPTH))
      self.assertTrue(np.all(np.isfinite(out['pooled'])))
      batch_sizes.append(out['block3'].shape[0])
    self.assertEqual(batch_sizes, [1, 2, 1])

  # Bad input at serving time.

  def test_non_image_bytes_named_by_index(self):
    serve = self.loaded.signatures['serving_default']
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r'images\[1\] is not an encoded JPEG, PNG.*'
                                r'\(11 bytes'):
      serve(images=tf.constant([self.png, b'hello world']))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r'images\[0\] is not .*\(0 bytes'):
      serve(images=tf.constant([b'']))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r'images\[0\] .*looks like base64'):
      serve(images=tf.constant([b'iVBORw0KGgoAAAANSUhEUg']))

  def test_empty_batches_rejected(self):
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                'images is an empty batch'):
      self.loaded.signatures['serving_default'](
          images=tf.constant([], tf.string))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                'pixels is an empty batch'):
      self.loaded.signatures['from_pixels'](pixels=tf.zeros([0, 8, 8, 3]))

  def test_bad_pixels_rejected(self):
    serve = self.loaded.signatures['from_pixels']
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                r'must be RGB in \[0, 255\]; got min 0, max 300'):
      serve(pixels=tf.concat([tf.zeros([1, 8, 8, 3]),
                              tf.fill([1, 8, 8, 3], 300.0)], 0))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError, 'NaN'):
      serve(pixels=tf.fill([1, 8, 8, 3], np.nan))
    with self.assertRaisesRegex(tf.errors.InvalidArgumentError,
                                'no pixels: height 0, width 8'):
      serve(pixels=tf.zeros([1, 0, 8, 3]))

  # Refusals of the command line.

  def test_refuses_existing_version_and_bad_flags(self):
    saved = os.path.join(self.export_dir, 'saved_model.pb')
    mtime = os.stat(saved).st_mtime_ns
    common = [f'--checkpoint={self.checkpoint_dir}', f'--trunk={TRUNK}',
              f'--export_base={self.base}', f'--model_name={MODEL}']
    cases = [
        (['--version=1'], 'already exists; pass --overwrite'),
        (['--trunk=resnet_v2_7'], "--trunk: Unknown trunk 'resnet_v2_7'"),
        (['--output_stride=12'], '--output_stride=12'),
        (['--image_size=big'], '--image_size must be'),
        (['--model_name=a/b'], "Model name 'a/b'"),
        (['--version=0'], '--version must be a positive'),
        ([f'--checkpoint={self.tmp}/none'], 'does not exist'),
    ]
    for extra, message in cases:
      with self.subTest(extra=extra):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
          status = _run_export(common + extra)
        self.assertEqual(status, 2)
        self.assertIn(message, err.getvalue())
        self.assertTrue(err.getvalue().startswith('error: '))
    self.assertEqual(os.stat(saved).st_mtime_ns, mtime)
    self.assertEqual(sorted(os.listdir(os.path.join(self.base, MODEL))), ['1'])

  def test_entry_point_refuses_an_existing_version(self):
    code, _, err = self._wait('entry')
    self.assertEqual(code, 2, err)
    self.assertNotIn('Traceback', err)
    self.assertEqual(err.strip().splitlines()[-1],
                     f'error: {self.export_dir} already exists; pass '
                     '--overwrite to replace it or choose another --version.')

  def test_overwrite_replaces_version_atomically(self):
    model_dir = os.path.join(self.base, 'copy')
    shutil.copytree(self.export_dir, os.path.join(model_dir, '1'))
    status = _run_export([
        f'--checkpoint={self.checkpoint_dir}', f'--trunk={TRUNK}',
        f'--export_base={self.base}', '--model_name=copy', '--version=1',
        '--overwrite', '--image_size=32,48', '--output_stride=16'])
    self.assertEqual(status, 0)
    # No temporary or old directory is left beside the version.
    self.assertEqual(os.listdir(model_dir), ['1'])
    with open(os.path.join(model_dir, '1', 'assets.extra',
                           'mtssl_export.json')) as f:
      meta = json.load(f)
    self.assertEqual(meta['image_size'], [32, 48])
    self.assertEqual(meta['output_stride'], 16)
    self.assertEqual(meta['signatures']['serving_default']['outputs']
                     ['block3']['shape'], [None, 2, 3, DEPTH])

  # Outside this process.

  def test_fresh_process_without_mtssl(self):
    code, out, err = self._wait('fresh')
    self.assertEqual(code, 0, err)
    self.assertIn('MTSSL_NOT_IMPORTABLE', out)
    sys_path = json.loads(out.split('SYS_PATH=')[1].splitlines()[0])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.assertNotIn(repo, sys_path)
    got = np.load(os.path.join(self.tmp, 'fresh.npz'))
    pixels = synthetic.synthetic_image(3, 0, SIZE, SIZE)[None]
    expected = self.reference(pixels.astype(np.float32))
    self.assertAllClose(got['block3'], expected, **TOL)
    self.assertEqual(got['pooled'].shape, (1, 3, 3, DEPTH))

  def test_saved_model_cli_show(self):
    code, out, err = self._wait('fresh')
    self.assertEqual(code, 0, err)
    out = out.split('SHOW_ALL', 1)[1]
    for text in ("signature_def['serving_default']",
                 "signature_def['from_pixels']",
                 "inputs['images'] tensor_info:", 'dtype: DT_STRING',
                 "inputs['pixels'] tensor_info:",
                 "outputs['block3'] tensor_info:",
                 f'shape: (-1, 8, 8, {DEPTH})',
                 f'shape: (-1, -1, -1, {DEPTH})',
                 "outputs['pooled'] tensor_info:",
                 f'shape: (-1, 3, 3, {DEPTH})'):
      self.assertIn(text, out)

  def test_saved_model_cli_run(self):
    code, _, err = self._wait('run')
    self.assertEqual(code, 0, err)
    pixels = synthetic.synthetic_image(3, 0, SIZE, SIZE)[None]
    expected = self.reference(pixels.astype(np.float32))
    self.assertAllClose(np.load(os.path.join(self.cli_out, 'block3.npy')),
                        expected, **TOL)
    self.assertEqual(np.load(os.path.join(self.cli_out, 'pooled.npy')).shape,
                     (1, 3, 3, DEPTH))

  # Reuse as a trainable layer.

  def test_hub_keras_layer_fine_tunes(self):
    layer = hub.KerasLayer(self.export_dir, trainable=True, output_key='pooled')
    inputs = tf_keras.Input([32, 32, 3])
    logits = tf_keras.layers.Dense(2)(tf_keras.layers.Flatten()(layer(inputs)))
    model = tf_keras.Model(inputs, logits)
    self.assertLen(layer.trainable_weights, len(self.trunk.trainable_variables))
    self.assertLen(layer.weights, len(self.trunk.variables))
    # The trunk's Slim weight decay comes along as the layer's loss.
    self.assertLen(model.losses, 1)
    self.assertAllClose(model.losses[0], tf.add_n(self.trunk.losses), rtol=1e-6)

    rng = np.random.default_rng(2)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    labels = np.array([0, 1, 0, 1])
    before = {id(v): v.numpy().copy() for v in layer.weights}
    optimizer = tf_keras.optimizers.SGD(0.01)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(tf_keras.losses.sparse_categorical_crossentropy(
          labels, model(images, training=True), from_logits=True))
      loss += tf.add_n(model.losses)
    grads = tape.gradient(loss, model.trainable_variables)
    self.assertNotIn(None, grads)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    unchanged = [v.name for v in layer.weights
                 if np.array_equal(v.numpy(), before[id(v)])]
    # Trainable variables moved with the gradient and batch norm in training
    # mode updated its moving statistics. A conv bias that reaches the loss
    # only through a batch norm on batch statistics (conv1's: max-pooling
    # passes it through and the next norm subtracts it again) has an
    # analytically zero gradient and may stay put.
    self.assertLess(len(unchanged), len(layer.weights) // 4)
    self.assertTrue(all(name.endswith('/bias:0') for name in unchanged),
                    unchanged)

  def test_call_has_inference_and_training_paths(self):
    pixels = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 3))
    pixels = pixels.astype(np.float32)
    out = self.loaded(tf.constant(pixels), training=False)
    self.assertAllClose(out['block3'], self.reference(pixels), **GRAPH_TOL)
    obj = self.loaded
    saved = [v.numpy() for v in obj.variables]
    try:
      with tf.GradientTape() as tape:
        train_out = obj(tf.constant(pixels), training=True)
        loss = tf.reduce_sum(train_out['pooled'])
      grads = tape.gradient(loss, obj.trainable_variables)
      moved = [v.name for v, value in zip(obj.variables, saved)
               if not np.array_equal(v.numpy(), value)]
    finally:  # Other tests use this object in inference mode.
      for var, value in zip(obj.variables, saved):
        var.assign(value)
    self.assertLen(grads, len(self.trunk.trainable_variables))
    self.assertNotIn(None, grads)
    # Batch statistics instead of moving averages, which training updates.
    self.assertNotAllClose(train_out['block3'], out['block3'])
    self.assertNotEmpty(moved)
    self.assertTrue(all('moving_' in name for name in moved), moved)


if __name__ == '__main__':
  tf.test.main()
