"""Motion-segmentation labels from video frames (paper section 2), no TensorFlow.

`MotionLabeler` restates the camera-motion part of Improved Dense
Trajectories: DIS flow, a RANSAC homography per frame pair, dense tracks over
`track_length` frames, foreground = pixels whose camera-compensated motion
stays above threshold, downsampled by 8; unusable frames are rejected with a
reason. Choices against IDT and measured IoU: BUILD.md, "Motion segmentation".
"""

import collections
import dataclasses
from typing import Deque, Iterable, Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

# Rejection reasons.
SCENE_CUT = 'scene_cut'
TOO_LITTLE_TEXTURE = 'too_little_texture'
UNSTABLE_CAMERA = 'unstable_camera'
TOO_LITTLE_MOTION = 'too_little_motion'
TOO_MUCH_MOTION = 'too_much_motion'
REJECTION_REASONS = (SCENE_CUT, TOO_LITTLE_TEXTURE, UNSTABLE_CAMERA,
                     TOO_LITTLE_MOTION, TOO_MUCH_MOTION)

_REFERENCE_WIDTH = 320.0  # pixel thresholds below are for this frame width
_FLOW_PRESETS = {
    'ultrafast': cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
    'fast': cv2.DISOPTICAL_FLOW_PRESET_FAST,
    'medium': cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
}


@dataclasses.dataclass(frozen=True)
class LabelConfig:
  """Label-extraction settings (defaults: the paper's sizes, our thresholds)."""
  height: int = 240                 # frame size the labels are made at
  width: int = 320
  track_length: int = 10            # frames per track (paper: 10)
  label_stride: int = 8             # label downsampling (paper: 8)
  flow_preset: str = 'medium'       # DIS preset ...
  flow_patch_size: int = 8          # ... with these patches
  flow_patch_stride: int = 4
  consistency_threshold: float = 1.0  # px forward-backward error ending a track
  camera_grid: int = 4              # px between camera-fit samples
  ransac_threshold: float = 1.0     # px
  min_inlier_fraction: float = 0.3
  texture_threshold: float = 0.3    # min eigenvalue, blurred gray, 5x5 window
  min_texture_fraction: float = 0.02
  min_track_steps: int = 3
  motion_threshold: float = 1.0     # px per frame, camera-compensated
  fill_sigma: float = 3.0           # px
  min_support: float = 0.1          # tracked-pixel density needed to vote
  boundary_erosion: int = 4         # px: half a flow patch
  cut_threshold: float = 0.5        # Bhattacharyya distance of H-S histograms
  min_foreground: float = 0.01      # label fraction
  max_foreground: float = 0.5

  def validate(self):
    if self.height % self.label_stride or self.width % self.label_stride:
      raise ValueError(
          f'Frame size {self.height}x{self.width} is not a multiple of the '
          f'label stride {self.label_stride}.')
    if min(self.height, self.width) < 32:
      raise ValueError(f'Frames must be at least 32x32, got '
                       f'{self.height}x{self.width}.')
    if self.track_length < 2:
      raise ValueError(f'track_length must be at least 2, got '
                       f'{self.track_length}.')
    if self.min_track_steps > self.track_length - 1:
      raise ValueError(f'min_track_steps {self.min_track_steps} exceeds the '
                       f'{self.track_length - 1} steps of a track.')
    if self.flow_preset not in _FLOW_PRESETS:
      raise ValueError(f'flow_preset must be one of {sorted(_FLOW_PRESETS)}, '
                       f'got {self.flow_preset!r}.')
    if not 0 <= self.min_foreground <= self.max_foreground <= 1:
      raise ValueError('Need 0 <= min_foreground <= max_foreground <= 1, got '
                       f'{self.min_foreground}, {self.max_foreground}.')

  @property
  def label_size(self) -> Tuple[int, int]:
    return self.height // self.label_stride, self.width // self.label_stride

  @property
  def pixel_scale(self) -> float:
    return self.width / _REFERENCE_WIDTH


@dataclasses.dataclass
class PairMotion:
  """Motion between frame k and frame k+1 (k's pixel grid)."""
  fields: np.ndarray          # float32 [H, W, 5]: flow x, y, residual x, y,
                              #   forward-backward error (inf: no match)
  textured: np.ndarray        # bool [H, W]: frame k's trackable pixels
  homography: Optional[np.ndarray]  # 3x3 camera motion k -> k+1
  inlier_fraction: float
  problem: Optional[str]      # a rejection reason, or None


@dataclasses.dataclass
class LabelResult:
  """The motion label of one frame."""
  mask: np.ndarray            # bool [H, W] foreground at frame resolution
  label: np.ndarray           # uint8 [H/stride, W/stride], 1 = moving
  foreground: float           # fraction of label cells that are 1
  reason: Optional[str]       # rejection reason, None when accepted
  score: np.ndarray           # float32 [H, W] compensated px/frame (0: none)

  @property
  def accepted(self) -> bool:
    return self.reason is None


def downsample_mask(mask: np.ndarray, stride: int) -> np.ndarray:
  """uint8 [H/stride, W/stride]: 1 where at least half of a cell is set."""
  mask = np.asarray(mask)
  h, w = mask.shape
  if h % stride or w % stride:
    raise ValueError(f'Mask {h}x{w} is not a multiple of stride {stride}.')
  cells = mask.reshape(h // stride, stride, w // stride, stride)
  fraction = cells.astype(np.float32).mean(axis=(1, 3))
  return (fraction >= 0.5).astype(np.uint8)


def foreground_iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two masks (1.0 when both are empty)."""
  a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _hue_saturation_histogram(frame_rgb: np.ndarray) -> np.ndarray:
  hsv = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2HSV)
  return cv2.calcHist([hsv], [0, 1], None, [30, 32], [0, 180, 0, 256])


class MotionLabeler:
  """Computes motion labels; holds the flow engine and per-size buffers.

  Not thread-safe (one per thread or process).
  """

  def __init__(self, config: Optional[LabelConfig] = None):
    self.config = config or LabelConfig()
    self.config.validate()
    cfg = self.config
    self._flow = cv2.DISOpticalFlow_create(_FLOW_PRESETS[cfg.flow_preset])
    self._flow.setPatchSize(cfg.flow_patch_size)
    self._flow.setPatchStride(cfg.flow_patch_stride)
    yy, xx = np.mgrid[0:cfg.height, 0:cfg.width].astype(np.float32)
    self._xx, self._yy = xx, yy
    self._grid = np.zeros((cfg.height, cfg.width), bool)
    self._grid[cfg.camera_grid // 2::cfg.camera_grid,
               cfg.camera_grid // 2::cfg.camera_grid] = True
    k = 2 * cfg.boundary_erosion + 1
    self._erode_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))

  # Frames -------------------------------------------------------------------
  def prepare(self, frame: np.ndarray) -> np.ndarray:
    """Any uint8 RGB frame -> the configured size (area-resampled)."""
    cfg = self.config
    if frame.shape[:2] != (cfg.height, cfg.width):
      frame = cv2.resize(frame, (cfg.width, cfg.height),
                         interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(frame)

  def _check_frame(self, frame):
    cfg = self.config
    if (frame.dtype != np.uint8 or frame.shape != (cfg.height, cfg.width, 3)):
      raise ValueError(f'Expected a uint8 RGB frame {cfg.height}x{cfg.width}x3,'
                       f' got {frame.dtype} {frame.shape}; use prepare().')

  # Motion between two frames -------------------------------------------------
  def pair_motion(self, frame0: np.ndarray, frame1: np.ndarray,
                  hist0: Optional[np.ndarray] = None,
                  hist1: Optional[np.ndarray] = None) -> PairMotion:
    """Flow, camera homography and residual motion from frame0 to frame1."""
    cfg = self.config
    self._check_frame(frame0)
    self._check_frame(frame1)
    gray0 = cv2.cvtColor(frame0, cv2.COLOR_RGB2GRAY)
    gray1 = cv2.cvtColor(frame1, cv2.COLOR_RGB2GRAY)
    smooth = cv2.GaussianBlur(gray0.astype(np.float32), (0, 0), 1.0)
    textured = cv2.cornerMinEigenVal(smooth, 5, 3) > cfg.texture_threshold

    hist0 = _hue_saturation_histogram(frame0) if hist0 is None else hist0
    hist1 = _hue_saturation_histogram(frame1) if hist1 is None else hist1
    fields = np.zeros((cfg.height, cfg.width, 5), np.float32)
    fields[..., 4] = np.inf
    cut = cv2.compareHist(hist0, hist1, cv2.HISTCMP_BHATTACHARYYA)
    if cut > cfg.cut_threshold:
      return PairMotion(fields, textured, None, 0.0, SCENE_CUT)

    forward = self._flow.calc(gray0, gray1, None)
    backward = self._flow.calc(gray1, gray0, None)
    x1 = self._xx + forward[..., 0]
    y1 = self._yy + forward[..., 1]
    back = cv2.remap(backward, x1, y1, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=(np.nan,) * 4)
    error = np.hypot(forward[..., 0] + back[..., 0],
                     forward[..., 1] + back[..., 1])
    error = np.where(np.isnan(error), np.inf, error).astype(np.float32)
    fields[..., 0:2] = forward
    fields[..., 4] = error

    samples = self._grid & (error < cfg.consistency_threshold * cfg.pixel_scale)
    n = int(samples.sum())
    if n < 0.05 * self._grid.sum() or n < 8:
      return PairMotion(fields, textured, None, 0.0, UNSTABLE_CAMERA)
    src = np.stack([self._xx[samples], self._yy[samples]], axis=-1)
    dst = np.stack([x1[samples], y1[samples]], axis=-1)
    homography, inliers = cv2.findHomography(
        src, dst, cv2.RANSAC, cfg.ransac_threshold * cfg.pixel_scale,
        maxIters=2000, confidence=0.995)
    if homography is None:
      return PairMotion(fields, textured, None, 0.0, UNSTABLE_CAMERA)
    inlier_fraction = float(inliers.mean())
    h = homography.astype(np.float32)
    denom = h[2, 0] * self._xx + h[2, 1] * self._yy + h[2, 2]
    cam_x = (h[0, 0] * self._xx + h[0, 1] * self._yy + h[0, 2]) / denom
    cam_y = (h[1, 0] * self._xx + h[1, 1] * self._yy + h[1, 2]) / denom
    fields[..., 2] = x1 - cam_x
    fields[..., 3] = y1 - cam_y
    problem = (UNSTABLE_CAMERA if inlier_fraction < cfg.min_inlier_fraction
               else None)
    return PairMotion(fields, textured, homography, inlier_fraction, problem)

  # The label of one frame ---------------------------------------------------
  def label(self, pairs: Sequence[PairMotion]) -> LabelResult:
    """The label of the first frame of `pairs` (track_length - 1 pairs)."""
    cfg = self.config
    steps = cfg.track_length - 1
    if len(pairs) != steps:
      raise ValueError(f'Need {steps} frame pairs (track_length '
                       f'{cfg.track_length}), got {len(pairs)}.')
    empty = np.zeros((cfg.height, cfg.width), bool)
    problem = next((p.problem for p in pairs if p.problem), None)
    if problem is not None:
      return self._result(empty, np.zeros(empty.shape, np.float32), problem)
    textured = pairs[0].textured
    if textured.mean() < cfg.min_texture_fraction:
      return self._result(empty, np.zeros(empty.shape, np.float32),
                          TOO_LITTLE_TEXTURE)

    consistency = cfg.consistency_threshold * cfg.pixel_scale
    x, y = self._xx.copy(), self._yy.copy()
    alive = np.ones(empty.shape, bool)
    speeds = np.full((steps,) + empty.shape, np.nan, np.float32)
    for k, pair in enumerate(pairs):
      at = cv2.remap(pair.fields, x, y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_CONSTANT, borderValue=(np.nan,) * 4)
      alive &= np.nan_to_num(at[..., 4], nan=np.inf) < consistency
      speeds[k] = np.where(alive, np.hypot(at[..., 2], at[..., 3]), np.nan)
      x = np.where(alive, x + at[..., 0], x)
      y = np.where(alive, y + at[..., 1], y)
    length = np.sum(~np.isnan(speeds), axis=0)
    # Median over each track's steps (NaN sorts last).
    ordered = np.sort(speeds, axis=0)
    lo = np.take_along_axis(ordered, np.maximum(length - 1, 0)[None] // 2, 0)[0]
    hi = np.take_along_axis(ordered, (length // 2)[None], 0)[0]
    score = np.where(length > 0, (lo + hi) / 2, 0.0).astype(np.float32)

    tracked = textured & (length >= cfg.min_track_steps)
    moving = tracked & (score > cfg.motion_threshold * cfg.pixel_scale)
    sigma = cfg.fill_sigma * cfg.pixel_scale
    votes = cv2.GaussianBlur(moving.astype(np.float32), (0, 0), sigma)
    support = cv2.GaussianBlur(tracked.astype(np.float32), (0, 0), sigma)
    mask = (votes > 0.5 * support) & (support > cfg.min_support)
    if cfg.boundary_erosion:
      mask = cv2.erode(mask.astype(np.uint8), self._erode_kernel).astype(bool)
    mask = self._remove_small_regions(mask)
    return self._result(mask, score, None)

  def _remove_small_regions(self, mask):
    min_area = self.config.label_stride ** 2
    n, components, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8)
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < min_area
    return mask & ~small[components]

  def _result(self, mask, score, reason):
    cfg = self.config
    label = downsample_mask(mask, cfg.label_stride)
    foreground = float(label.mean())
    if reason is None:
      if foreground < cfg.min_foreground:
        reason = TOO_LITTLE_MOTION
      elif foreground > cfg.max_foreground:
        reason = TOO_MUCH_MOTION
    return LabelResult(mask, label, foreground, reason, score)

  # Convenience: clips and streams ---------------------------------------------
  def label_clip(self, frames: Sequence[np.ndarray]) -> LabelResult:
    """Label of frames[0] from frames[0 : track_length] (uint8 RGB)."""
    cfg = self.config
    if len(frames) < cfg.track_length:
      raise ValueError(f'Need {cfg.track_length} frames, got {len(frames)}.')
    frames = [self.prepare(f) for f in frames[:cfg.track_length]]
    pairs = [self.pair_motion(a, b) for a, b in zip(frames[:-1], frames[1:])]
    return self.label(pairs)

  def label_stream(self, frames: Iterable[np.ndarray], frame_step: int = 1
                   ) -> Iterator[Tuple[int, np.ndarray, LabelResult]]:
    """Labels frames 0, frame_step, 2 * frame_step, ... of a frame stream.

    Yields (frame index, prepared frame, result) for every labelled frame
    whose track window fits in the stream; each frame pair's motion is
    computed once, and only for pairs inside some labelled window.
    """
    if frame_step < 1:
      raise ValueError(f'frame_step must be positive, got {frame_step}.')
    length = self.config.track_length
    window: Deque[Tuple[int, np.ndarray, np.ndarray]] = collections.deque(
        maxlen=length)
    pairs: Deque[Optional[PairMotion]] = collections.deque(maxlen=length - 1)
    for index, frame in enumerate(frames):
      frame = self.prepare(frame)
      hist = _hue_saturation_histogram(frame)
      if window:
        # Pair (index-1, index) serves windows starting at s in
        # [index - length + 1, index - 1] with s % frame_step == 0.
        first = max(index - length + 1, 0)
        needed = any(s % frame_step == 0 for s in range(first, index))
        prev_index, prev_frame, prev_hist = window[-1]
        del prev_index
        pairs.append(self.pair_motion(prev_frame, frame, prev_hist, hist)
                     if needed else None)
      window.append((index, frame, hist))
      start = index - length + 1
      if start >= 0 and start % frame_step == 0:
        yield start, window[0][1], self.label(list(pairs))

