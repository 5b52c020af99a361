"""Procedural video with a moving camera and independently moving objects.

The built-in data of the motion-segmentation task and the test bed of
mtssl.motion.labels: every frame comes with the exact `mask` of the pixels
that move independently of the camera. Frame t of clip (seed, index) is a
closed-form function of t. Design: BUILD.md, "Motion segmentation".

Typical use:

    clip = render_clip(seed=0, index=3, num_frames=12)  # .frames, .masks
"""

import dataclasses
from typing import Optional, Tuple

import cv2
import numpy as np

from mtssl.utils import io_utils
from mtssl.data import synthetic

# Classes whose objects move (the independently moving foreground) and
# classes that only ever stand still (scenery).
MOVING_CLASSES = (0, 4, 6, 7)   # balls, rings, stars, crosses
STATIC_CLASSES = tuple(c for c in range(synthetic.NUM_CLASSES)
                       if c not in MOVING_CLASSES)
CAMERA_MOTIONS = ('pan_zoom', 'pan', 'zoom', 'static')
CANVAS_MARGIN = 1.5     # canvas size / frame size
MAX_MOVERS = 3
# Speeds in pixels per frame at a frame width of 320 (scaled with the width).
CAMERA_SPEED = (1.5, 4.0)
MOVER_SPEED = (1.5, 4.0)
MAX_LOG_ZOOM_SWING = 0.12


@dataclasses.dataclass
class Mover:
  surface: np.ndarray   # float32 [h, w, 3] RGB
  alpha: np.ndarray     # float32 [h, w], 1 inside the shape
  start: np.ndarray     # float64 [2] canvas (x, y) of the top-left corner at t=0
  velocity: np.ndarray  # float64 [2] canvas pixels per frame
  cls: int


@dataclasses.dataclass
class Clip:
  frames: np.ndarray    # uint8 [T, H, W, 3] RGB
  masks: np.ndarray     # bool [T, H, W]: independently moving pixels
  cameras: np.ndarray   # float32 [T, 2, 3]: affine map canvas -> frame


def _bounce(x, lo, hi):
  """Position x folded into [lo, hi] as if reflected at the ends."""
  span = np.maximum(hi - lo, 1e-6)
  y = np.mod(x - lo, 2 * span)
  return lo + np.where(y <= span, y, 2 * span - y)


class VideoScene:
  """The fixed part of clip (seed, index): scenery, camera path and movers.

  `frame(t)` renders frame t (any real t >= 0); see the module docstring.
  """

  def __init__(self, seed: int, index: int, height: int = 240,
               width: int = 320, camera: Optional[str] = None,
               num_movers: Optional[int] = None):
    if height < 16 or width < 16:
      raise ValueError(f'Synthetic video needs at least 16x16 frames, got '
                       f'{height}x{width}.')
    if camera is not None and camera not in CAMERA_MOTIONS:
      raise ValueError(f'camera must be one of {CAMERA_MOTIONS}, got '
                       f'{camera!r}.')
    if num_movers is not None and not 0 <= num_movers <= 8:
      raise ValueError(f'num_movers must be in [0, 8], got {num_movers}.')
    self.seed, self.index = int(seed), int(index)
    self.height, self.width = height, width
    # Stream 1 keeps clips independent of the still scene (seed, index).
    rng = synthetic._rng(seed, index, stream=1)  # pylint: disable=protected-access
    scale = width / 320.0
    if camera is None:
      camera = CAMERA_MOTIONS[int(rng.choice(4, p=[0.55, 0.2, 0.1, 0.15]))]
    if num_movers is None:
      num_movers = int(rng.integers(1, MAX_MOVERS + 1))
    self.camera = camera
    self.canvas = self._scenery(rng)
    ch, cw = self.canvas.shape[:2]
    self._camera_path(rng, camera, scale, ch, cw)
    self.movers = [self._mover(rng, scale) for _ in range(num_movers)]

  # Set-up -----------------------------------------------------------------
  def _scenery(self, rng) -> np.ndarray:
    ch = int(round(self.height * CANVAS_MARGIN))
    cw = int(round(self.width * CANVAS_MARGIN))
    horizon = rng.uniform(0.25, 0.5) * ch
    image, depth = synthetic._sky_and_ground(rng, ch, cw, horizon)  # pylint: disable=protected-access
    instances = np.zeros((ch, cw), np.int32)
    n = int(rng.integers(2, 7))
    bottoms = np.sort(rng.uniform(horizon + 0.06 * ch, 1.05 * ch, n))
    centers = rng.uniform(-0.05 * cw, 1.05 * cw, n)
    for i, (by, cx) in enumerate(zip(bottoms, centers)):
      cls = int(rng.choice(STATIC_CLASSES))
      synthetic._draw_object(rng, image, depth, instances, cls, i + 1, by, cx,  # pylint: disable=protected-access
                             horizon, ch, cw)
    return cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8))

  def _camera_path(self, rng, camera, scale, ch, cw):
    pans = camera in ('pan', 'pan_zoom')
    zooms = camera in ('zoom', 'pan_zoom')
    swing = rng.uniform(0.05, MAX_LOG_ZOOM_SWING) if zooms else 0.0
    # The most zoomed-out view (zoom >= 1) must fit in the canvas.
    self._log_zoom_mid = np.log(rng.uniform(1.0, 1.1)) + swing
    self._log_zoom_amp = swing
    self._zoom_freq = rng.uniform(0.03, 0.06)
    self._zoom_phase = rng.uniform(0, 2 * np.pi)
    min_zoom = np.exp(self._log_zoom_mid - swing)
    room = np.array([cw - self.width / min_zoom, ch - self.height / min_zoom]) / 2
    room = np.maximum(room - 2.0, 0.0)
    self._center_mid = np.array([cw, ch], np.float64) / 2
    if pans:
      direction = rng.uniform(0, 2 * np.pi)
      amp = room * rng.uniform(0.6, 1.0, 2)
      speed = rng.uniform(*CAMERA_SPEED) * scale
      # Peak speed of amp * sin(freq * t) is amp * freq (canvas pixels/frame).
      components = np.abs([np.cos(direction), np.sin(direction)]) * speed
      self._pan_amp = amp
      self._pan_freq = np.where(amp > 1e-6, components / np.maximum(amp, 1e-6),
                                0.0)
      self._pan_phase = rng.uniform(0, 2 * np.pi, 2)
    else:
      self._pan_amp = np.zeros(2)
      self._pan_freq = np.zeros(2)
      self._pan_phase = np.zeros(2)

  def _mover(self, rng, scale) -> Mover:
    cls = int(rng.choice(MOVING_CLASSES))
    shape, _, _, _, aspect, _ = synthetic.CLASS_STYLES[cls]
    h = max(int(round(rng.uniform(0.18, 0.4) * self.height)), 6)
    w = max(int(round(h / aspect * rng.uniform(0.85, 1.15))), 6)
    surface = synthetic._object_surface(rng, cls, h, w)  # pylint: disable=protected-access
    grain = synthetic.smooth_noise(rng, h, w, max(w / 8.0, 2.0), octaves=2)
    surface = np.clip(surface * (0.65 + 0.7 * grain[..., None]), 0, 255)
    alpha = synthetic._shape_mask(shape, h, w).astype(np.float32)  # pylint: disable=protected-access
    # Starts inside the first frame's view, moves in a random direction.
    m0 = self.camera_matrix(0.0)
    inv = cv2.invertAffineTransform(m0)
    fx, fy = rng.uniform(0.05, 0.95) * self.width, rng.uniform(0.05, 0.95) * self.height
    cx, cy = inv @ np.array([fx, fy, 1.0])
    start = np.array([cx - w / 2, cy - h / 2])
    angle = rng.uniform(0, 2 * np.pi)
    velocity = rng.uniform(*MOVER_SPEED) * scale * np.array(
        [np.cos(angle), np.sin(angle)])
    return Mover(surface.astype(np.float32), alpha, start, velocity, cls)

  # Rendering --------------------------------------------------------------
  def camera_matrix(self, t: float) -> np.ndarray:
    """The 2x3 affine map from canvas to frame t coordinates."""
    zoom = np.exp(self._log_zoom_mid + self._log_zoom_amp *
                  np.sin(self._zoom_freq * t + self._zoom_phase))
    center = self._center_mid + self._pan_amp * np.sin(
        self._pan_freq * t + self._pan_phase)
    return np.array([[zoom, 0.0, self.width / 2 - zoom * center[0]],
                     [0.0, zoom, self.height / 2 - zoom * center[1]]])

  def mover_position(self, mover: Mover, t: float) -> np.ndarray:
    """Canvas (x, y) of a mover's top-left corner at time t."""
    ch, cw = self.canvas.shape[:2]
    h, w = mover.alpha.shape
    lo = np.array([-w / 2, -h / 2])
    hi = np.array([cw - w / 2, ch - h / 2])
    return _bounce(mover.start + mover.velocity * t, lo, hi)

  def instance_map(self, t: float) -> np.ndarray:
    """int32 [H, W]: 1 + the index of the mover covering more than half of
    each pixel (the last drawn on top), 0 elsewhere. Object identities for
    ground truth: mover i of clip (seed, index) is one instance, of class
    `movers[i].cls`."""
    size = (self.width, self.height)
    cam = self.camera_matrix(t)
    out = np.zeros((self.height, self.width), np.int32)
    for i, mover in enumerate(self.movers):
      x, y = self.mover_position(mover, t)
      m = cam @ np.array([[1.0, 0.0, x], [0.0, 1.0, y], [0.0, 0.0, 1.0]])
      alpha = cv2.warpAffine(mover.alpha, m, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
      out[alpha > 0.5] = i + 1
    return out

  def frame(self, t: float) -> Tuple[np.ndarray, np.ndarray]:
    """Frame t: (uint8 RGB [H, W, 3], bool [H, W] independently moving)."""
    size = (self.width, self.height)
    cam = self.camera_matrix(t)
    image = cv2.warpAffine(self.canvas, cam, size, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT)
    coverage = np.zeros((self.height, self.width), np.float32)
    for mover in self.movers:
      x, y = self.mover_position(mover, t)
      # Sprite -> canvas (translation) -> frame (camera).
      m = cam @ np.array([[1.0, 0.0, x], [0.0, 1.0, y], [0.0, 0.0, 1.0]])
      alpha = cv2.warpAffine(mover.alpha, m, size, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
      if not alpha.any():
        continue
      surface = cv2.warpAffine(mover.surface, m, size, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
      a = alpha[..., None]
      image = image * (1 - a) + surface * a
      coverage = np.maximum(coverage, alpha)
    noise_rng = np.random.default_rng(
        [self.seed & 0xFFFFFFFF, self.index, 2, int(round(t * 1000))])
    image = image + noise_rng.normal(0, noise_rng.uniform(1, 3), image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image, coverage > 0.5

  def clip(self, num_frames: int, start: int = 0) -> Clip:
    frames, masks, cams = [], [], []
    for t in range(start, start + num_frames):
      image, mask = self.frame(t)
      frames.append(image)
      masks.append(mask)
      cams.append(self.camera_matrix(t))
    return Clip(np.stack(frames), np.stack(masks),
                np.stack(cams).astype(np.float32))


def render_clip(seed: int, index: int, num_frames: int = 12,
                height: int = 240, width: int = 320,
                camera: Optional[str] = None,
                num_movers: Optional[int] = None) -> Clip:
  """Frames 0..num_frames-1 of clip `index` of stream `seed`."""
  if num_frames < 1:
    raise ValueError(f'num_frames must be positive, got {num_frames}.')
  return VideoScene(seed, index, height, width, camera, num_movers).clip(
      num_frames)


def render_frame(seed: int, index: int, t: int = 0, height: int = 240,
                 width: int = 320, camera: Optional[str] = None,
                 num_movers: Optional[int] = None):
  """Frame t of clip `index`: (uint8 RGB [H, W, 3], bool mask [H, W])."""
  return VideoScene(seed, index, height, width, camera, num_movers).frame(t)


def write_video(path: str, frames: np.ndarray, fps: float = 25.0,
                fourcc: Optional[str] = None) -> None:
  """Writes uint8 RGB frames [T, H, W, 3] to a video file with OpenCV.

  The codec follows the extension unless `fourcc` is given: .avi and .mkv
  MJPG, .mp4 mp4v, .webm VP80. Raises IOError when OpenCV cannot write it.
  """
  codecs = {'.avi': 'MJPG', '.mkv': 'MJPG', '.mp4': 'mp4v', '.webm': 'VP80'}
  ext = '.' + path.rsplit('.', 1)[-1].lower() if '.' in path else ''
  code = fourcc or codecs.get(ext)
  if code is None:
    raise ValueError(f'No default codec for {path!r}; pass fourcc.')
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f'frames must be uint8 [T, H, W, 3], got '
                     f'{frames.dtype} {frames.shape}.')
  h, w = frames.shape[1:3]

  def write(name):
    writer = cv2.VideoWriter(name, cv2.VideoWriter_fourcc(*code), fps, (w, h))
    try:
      if not writer.isOpened():
        raise IOError(f'OpenCV cannot write {path!r} with codec {code}.')
      for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
      writer.release()

  # OpenCV picks the container from the extension: the scratch file keeps it.
  io_utils.atomic_write_with(path, write, suffix=ext)
