"""The built-in synthetic video: determinism, camera model, exact motion masks."""

import os

import cv2
import numpy as np
from absl.testing import parameterized
import tensorflow as tf

from mtssl.data import synthetic
from mtssl.data import synthetic_video as sv

H, W = 96, 128


def _noise_level(a, b, where):
  """Mean absolute difference of two uint8 images over a boolean region."""
  diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).mean(axis=-1)
  return float(diff[where].mean())


def _interior(shape, margin):
  inside = np.zeros(shape, bool)
  inside[margin:-margin, margin:-margin] = True
  return inside


class SyntheticVideoTest(tf.test.TestCase, parameterized.TestCase):

  def test_deterministic_and_frames_render_independently(self):
    a = sv.render_clip(3, 7, 5, H, W)
    b = sv.render_clip(3, 7, 5, H, W)
    self.assertAllEqual(a.frames, b.frames)
    self.assertAllEqual(a.masks, b.masks)
    frame, mask = sv.render_frame(3, 7, 4, H, W)
    self.assertAllEqual(frame, a.frames[4])
    self.assertAllEqual(mask, a.masks[4])
    other = sv.render_clip(3, 8, 1, H, W)
    self.assertNotAllEqual(other.frames[0], a.frames[0])
    self.assertEqual(a.frames.dtype, np.uint8)
    self.assertEqual(a.frames.shape, (5, H, W, 3))
    self.assertEqual(a.masks.dtype, bool)

  def test_still_scenes_are_unchanged(self):
    # Video clips draw from their own random stream; render_scene still
    # gives the same scene for (seed, index).
    scene = synthetic.render_scene(0, 0, 64, 64)
    sv.render_clip(0, 0, 2, 64, 64)
    self.assertAllEqual(scene.image, synthetic.render_scene(0, 0, 64, 64).image)

  def test_static_camera_without_movers_changes_only_by_noise(self):
    clip = sv.render_clip(1, 2, 4, H, W, camera='static', num_movers=0)
    self.assertFalse(clip.masks.any())
    everywhere = np.ones((H, W), bool)
    for t in range(3):
      # Sensor noise sigma <= 3 per frame: mean |difference| about 2.
      self.assertLess(_noise_level(clip.frames[t], clip.frames[t + 1],
                                   everywhere), 4.0)

  @parameterized.parameters('pan', 'zoom', 'pan_zoom')
  def test_camera_motion_is_the_recorded_affine_map(self, camera):
    clip = sv.render_clip(2, 5, 3, H, W, camera=camera, num_movers=0)
    for t in range(2):
      # frame t+1 = frame t warped by cam[t+1] o cam[t]^-1 (up to noise).
      inverse = np.vstack([cv2.invertAffineTransform(clip.cameras[t]),
                           [0, 0, 1]])
      step = clip.cameras[t + 1].astype(np.float64) @ inverse
      predicted = cv2.warpAffine(clip.frames[t], step, (W, H),
                                 flags=cv2.INTER_LINEAR)
      self.assertLess(_noise_level(predicted, clip.frames[t + 1],
                                   _interior((H, W), 6)), 5.0)
    # The view moves (at least 1.5 px/frame at width 320, so 0.6 here).
    moved = np.abs(clip.cameras[1] - clip.cameras[0]).max()
    self.assertGreater(moved, 0.1 if camera == 'zoom' else 0.5)

  def test_mask_marks_exactly_what_the_camera_does_not_explain(self):
    clip = sv.render_clip(4, 1, 2, H, W, camera='static', num_movers=2)
    moving = clip.masks[0] | clip.masks[1]
    self.assertTrue(clip.masks[0].any())
    near = cv2.dilate(moving.astype(np.uint8), np.ones((5, 5), np.uint8))
    outside = ~near.astype(bool)
    self.assertLess(_noise_level(clip.frames[0], clip.frames[1], outside), 4.0)
    # Movers move at least 1.5 px per frame: their pixels change.
    changed = np.abs(clip.frames[0].astype(np.float32) -
                     clip.frames[1].astype(np.float32)).max(axis=-1) > 12
    self.assertGreater(changed[clip.masks[0]].mean(), 0.2)
    self.assertLess(changed[outside].mean(), 0.01)

  def test_movers_are_moving_classes_and_stay_in_the_canvas(self):
    for index in range(6):
      scene = sv.VideoScene(0, index, H, W)
      self.assertIn(scene.camera, sv.CAMERA_MOTIONS)
      self.assertBetween(len(scene.movers), 1, sv.MAX_MOVERS)
      for mover in scene.movers:
        self.assertIn(mover.cls, sv.MOVING_CLASSES)
        ch, cw = scene.canvas.shape[:2]
        h, w = mover.alpha.shape
        for t in (0, 50, 1000):
          x, y = scene.mover_position(mover, t)
          self.assertBetween(x, -w / 2 - 1e-6, cw - w / 2 + 1e-6)
          self.assertBetween(y, -h / 2 - 1e-6, ch - h / 2 + 1e-6)
      # The view stays inside the canvas at any time.
      for t in (0, 37, 500):
        inverse = cv2.invertAffineTransform(scene.camera_matrix(t))
        corners = np.array([[0, 0, 1], [W, H, 1]], np.float64) @ inverse.T
        self.assertGreaterEqual(corners.min(), -1e-6)
        self.assertLessEqual(corners[:, 0].max(), scene.canvas.shape[1])
        self.assertLessEqual(corners[:, 1].max(), scene.canvas.shape[0])

  def test_instance_map_names_the_movers_of_the_mask(self):
    scene = sv.VideoScene(3, 1, H, W, camera='pan_zoom', num_movers=3)
    for t in (0, 30):
      _, mask = scene.frame(t)
      instances = scene.instance_map(t)
      # Covered pixels are those of the motion mask, each named by a mover.
      self.assertAllEqual(instances > 0, mask)
      self.assertLessEqual(instances.max(), len(scene.movers))
    # A mover drawn on its own covers exactly its own pixels.
    alone = sv.VideoScene(3, 1, H, W, camera='pan_zoom', num_movers=3)
    alone.movers = alone.movers[:1]
    self.assertAllEqual(alone.instance_map(0) == 1, alone.frame(0)[1])

  def test_rejects_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'camera'):
      sv.VideoScene(0, 0, H, W, camera='dolly')
    with self.assertRaisesRegex(ValueError, '16x16'):
      sv.VideoScene(0, 0, 8, 8)
    with self.assertRaisesRegex(ValueError, 'num_frames'):
      sv.render_clip(0, 0, 0)

  @parameterized.parameters('.mp4', '.avi', '.mkv', '.webm')
  def test_write_video_round_trip(self, ext):
    clip = sv.render_clip(0, 3, 6, H, W)
    path = os.path.join(self.get_temp_dir(), 'clip' + ext)
    sv.write_video(path, clip.frames)
    self.assertEqual(sorted(os.listdir(self.get_temp_dir())).count('clip' + ext), 1)
    self.assertFalse([n for n in os.listdir(self.get_temp_dir())
                      if n.startswith('.')])
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
      ok, frame = capture.read()
      if not ok:
        break
      frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    self.assertLen(frames, 6)
    # Lossy codecs: close, not equal.
    self.assertLess(_noise_level(frames[2], clip.frames[2],
                                 np.ones((H, W), bool)), 12.0)

  def test_write_video_rejects_bad_frames(self):
    path = os.path.join(self.get_temp_dir(), 'bad.mp4')
    with self.assertRaisesRegex(ValueError, 'uint8'):
      sv.write_video(path, np.zeros((2, H, W), np.uint8))
    with self.assertRaisesRegex(ValueError, 'codec'):
      sv.write_video(os.path.join(self.get_temp_dir(), 'bad.xyz'),
                     np.zeros((2, H, W, 3), np.uint8))
    self.assertFalse(os.path.exists(path))


if __name__ == '__main__':
  tf.test.main()
