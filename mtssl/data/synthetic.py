"""Procedurally generated scenes: the project's built-in data, no download.

A scene is a function of (seed, index): sky, perspective ground, objects of
`NUM_CLASSES` classes, with an exact depth map, boxes, instance mask and a
scene class. Why each part is there: BUILD.md, "Data".

Typical use:

    scene = render_scene(seed=0, index=7)   # .image, .depth, .boxes, .label
    image = synthetic_image(seed=0, index=7)
"""

import dataclasses
import functools
from typing import List, Tuple

import cv2
import numpy as np

NUM_CLASSES = 10
CAMERA_HEIGHT = 1.6   # metres
MAX_DEPTH = 10.0      # sky and far ground are clipped here (NYU-like range)
MIN_DEPTH = 0.5
OBJECT_SCALE = 0.7   # image height of a 1 m object at depth z: 0.7 * H / z

# Per class: shape, hue centre (OpenCV hue, 0-180), hue spread, pattern,
# height/width aspect and real height in metres.
CLASS_STYLES = (
    ('disc', 0, 6, 'solid', 1.0, 1.0),          # red balls
    ('box', 15, 6, 'stripes', 0.8, 1.0),        # orange striped crates
    ('triangle', 30, 5, 'solid', 1.2, 1.2),     # yellow cones
    ('tall_box', 60, 8, 'dots', 2.2, 1.6),      # green dotted pillars
    ('ring', 90, 6, 'solid', 1.0, 1.0),         # cyan rings
    ('diamond', 110, 6, 'checker', 1.3, 1.2),   # blue checkered diamonds
    ('star', 140, 6, 'solid', 1.0, 1.0),        # purple stars
    ('cross', 165, 5, 'stripes', 1.0, 1.0),     # magenta striped crosses
    ('ellipse', 100, 40, 'noise', 0.6, 0.8),    # grey-blue pebbles
    ('house', 10, 10, 'bricks', 1.0, 1.5),      # brick houses
)
CLASS_NAMES = tuple(s[0] for s in CLASS_STYLES)


@dataclasses.dataclass
class Scene:
  image: np.ndarray        # uint8 [H, W, 3] RGB
  depth: np.ndarray        # float32 [H, W] metres
  boxes: np.ndarray        # float32 [N, 4] (ymin, xmin, ymax, xmax) pixels
  classes: np.ndarray      # int32 [N]
  visible: np.ndarray      # float32 [N] visible fraction of each object
  instances: np.ndarray    # int32 [H, W]: 0 background, i+1 for object i
  label: int               # scene class: class of the nearest object


def _rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), stream])


def _hsv_to_rgb(h, s, v) -> np.ndarray:
  hsv = np.array([[[h % 180, np.clip(s, 0, 255), np.clip(v, 0, 255)]]],
                 np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def smooth_noise(rng, height, width, scale, octaves=3) -> np.ndarray:
  """Fractal value noise in [0, 1], features of about `scale` pixels."""
  out = np.zeros((height, width), np.float32)
  amp, total = 1.0, 0.0
  for o in range(octaves):
    s = max(scale / (2 ** o), 1.0)
    gh, gw = int(height / s) + 2, int(width / s) + 2
    grid = rng.random((gh, gw)).astype(np.float32)
    out += amp * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    total += amp
    amp *= 0.5
  out /= total
  lo, hi = out.min(), out.max()
  return (out - lo) / max(hi - lo, 1e-6)


def _pattern(rng, name, height, width, period) -> np.ndarray:
  """A surface pattern in [0, 1] of the given kind."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  period = max(period, 3.0)
  if name == 'stripes':
    angle = rng.uniform(0, np.pi)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    return 0.5 + 0.5 * np.sin(2 * np.pi * t / period)
  if name == 'dots':
    return ((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period))
            > 0.5).astype(np.float32)
  if name == 'checker':
    return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
  if name == 'bricks':
    row = np.floor(yy / (period * 0.5))
    shifted = xx + (row % 2) * period * 0.5
    mortar = ((yy % (period * 0.5)) < 1.5) | ((shifted % period) < 1.5)
    return 1.0 - mortar.astype(np.float32)
  if name == 'noise':
    return smooth_noise(rng, height, width, period)
  return np.ones((height, width), np.float32)


def _shape_mask(shape, height, width) -> np.ndarray:
  """Binary mask of a class shape filling a height x width box."""
  mask = np.zeros((height, width), np.uint8)
  h, w = height - 1, width - 1
  if shape in ('disc', 'ellipse'):
    cv2.ellipse(mask, (w // 2, h // 2), (max(w // 2, 1), max(h // 2, 1)), 0, 0,
                360, 1, -1)
  elif shape in ('box', 'tall_box'):
    mask[:] = 1
  elif shape == 'triangle':
    cv2.fillPoly(mask, [np.array([[w // 2, 0], [0, h], [w, h]], np.int32)], 1)
  elif shape == 'ring':
    cv2.ellipse(mask, (w // 2, h // 2), (max(w // 2, 1), max(h // 2, 1)), 0, 0,
                360, 1, -1)
    cv2.ellipse(mask, (w // 2, h // 2), (max(w // 5, 1), max(h // 5, 1)), 0, 0,
                360, 0, -1)
  elif shape == 'diamond':
    cv2.fillPoly(mask, [np.array([[w // 2, 0], [w, h // 2], [w // 2, h],
                                  [0, h // 2]], np.int32)], 1)
  elif shape == 'star':
    pts = []
    for k in range(10):
      r = 0.5 if k % 2 == 0 else 0.22
      a = -np.pi / 2 + k * np.pi / 5
      pts.append([w / 2 + r * w * np.cos(a), h / 2 + r * h * np.sin(a) + 0.05 * h])
    cv2.fillPoly(mask, [np.array(pts, np.int32)], 1)
  elif shape == 'cross':
    mask[h // 3:h - h // 3 + 1, :] = 1
    mask[:, w // 3:w - w // 3 + 1] = 1
  elif shape == 'house':
    roof = h // 3
    mask[roof:, :] = 1
    cv2.fillPoly(mask, [np.array([[w // 2, 0], [0, roof], [w, roof]], np.int32)], 1)
  else:
    raise ValueError(f'unknown shape {shape!r}')
  return mask.astype(bool)


def _sky_and_ground(rng, height, width, horizon):
  """Background image (float RGB 0-255) and depth map."""
  yy = np.arange(height, dtype=np.float32)[:, None]
  # Rows above the horizon show sky, the others ground; each is computed
  # where it shows, from draws over the whole image.
  is_sky = yy < horizon
  k = int(np.count_nonzero(is_sky))
  # Sky: a time-of-day hue, brighter toward the horizon, with clouds.
  sky_hue = rng.choice([105.0, 100.0, 115.0, 15.0]) + rng.normal(0, 4)
  top = _hsv_to_rgb(sky_hue, rng.uniform(120, 220), rng.uniform(120, 200))
  bottom = _hsv_to_rgb(sky_hue, rng.uniform(20, 90), rng.uniform(200, 250))
  t = np.clip(yy[:k] / max(horizon, 1), 0, 1)[..., None]
  sky = top * (1 - t) + bottom * t
  clouds = smooth_noise(rng, height, width, width / rng.uniform(2, 5))[:k]
  clouds = np.clip((clouds - rng.uniform(0.45, 0.7)) * 3, 0, 1)[..., None]
  sky = sky * (1 - clouds * 0.8) + 245 * clouds * 0.8
  # Ground: a ground-cover hue with a perspective texture.
  ground_hue = rng.choice([45.0, 40.0, 20.0, 12.0, 0.0]) + rng.normal(0, 4)
  ground_sat = 0.0 if ground_hue == 0.0 else rng.uniform(80, 200)
  base = _hsv_to_rgb(ground_hue, ground_sat, rng.uniform(90, 170))
  dark = base * rng.uniform(0.45, 0.7)
  rows = np.maximum(yy - horizon, 0.5)
  depth_ground = np.clip(CAMERA_HEIGHT * height / rows, MIN_DEPTH, MAX_DEPTH)
  near = depth_ground[k:]
  # Texture in ground coordinates: x spreads with depth, z is depth.
  xx = (np.arange(width, dtype=np.float32)[None, :] - width / 2) / width
  gx = xx * near * rng.uniform(6, 12)
  gz = near * rng.uniform(2, 5)
  tex = 0.5 + 0.25 * np.sin(gz + 0.7 * np.sin(gx)) + 0.25 * np.sin(1.7 * gx)
  grain = smooth_noise(rng, height, width, rng.uniform(3, 8), octaves=2)[k:]
  tex = np.clip(0.7 * tex + 0.3 * grain, 0, 1)[..., None]
  ground = dark + (base - dark) * tex
  haze = np.clip(near / MAX_DEPTH, 0, 1)[..., None] ** 2
  ground = ground * (1 - 0.5 * haze) + bottom * 0.5 * haze
  image = np.concatenate([sky, ground]).astype(np.float32, copy=False)
  depth = np.where(is_sky, MAX_DEPTH, depth_ground).astype(np.float32)
  depth = np.broadcast_to(depth, (height, width)).copy()
  return image, depth


def _object_surface(rng, cls, obj_h, obj_w) -> np.ndarray:
  """Float RGB [obj_h, obj_w, 3] surface of a class: its hue and pattern, lit
  from the upper left (the shape's mask is `_shape_mask`)."""
  _, hue, hue_spread, pattern, _, _ = CLASS_STYLES[cls]
  color_a = _hsv_to_rgb(hue + rng.normal(0, hue_spread), rng.uniform(150, 240),
                        rng.uniform(170, 240))
  color_b = _hsv_to_rgb(hue + rng.normal(0, hue_spread), rng.uniform(100, 220),
                        rng.uniform(60, 140))
  pat = _pattern(rng, pattern, obj_h, obj_w, max(obj_w / rng.uniform(3, 6), 3))
  surface = color_b + (color_a - color_b) * pat[..., None]
  yy, xx = np.mgrid[0:obj_h, 0:obj_w].astype(np.float32)
  light = 1.15 - 0.5 * (yy / obj_h + xx / obj_w) / 2
  return surface * light[..., None]


def _draw_object(rng, image, depth, instances, cls, obj_id, bottom_y, center_x,
                 horizon, height, width):
  """Paints one object standing on the ground; returns the (y0, y1, x0, x1)
  window it may cover and its painted pixel count, or None."""
  shape, _, _, _, aspect, real_h = CLASS_STYLES[cls]
  z = float(np.clip(CAMERA_HEIGHT * height / max(bottom_y - horizon, 0.5),
                    MIN_DEPTH, MAX_DEPTH))
  obj_h = int(round(real_h * rng.uniform(0.85, 1.2) * height / z * OBJECT_SCALE))
  obj_w = int(round(obj_h / aspect * rng.uniform(0.85, 1.15)))
  if obj_h < 6 or obj_w < 6:
    return None
  y1, x1 = int(bottom_y) - obj_h, int(center_x - obj_w / 2)
  y0c, x0c = max(y1, 0), max(x1, 0)
  y1c, x1c = min(y1 + obj_h, height), min(x1 + obj_w, width)
  if y1c - y0c < 3 or x1c - x0c < 3:
    return None
  mask = _shape_mask(shape, obj_h, obj_w)[y0c - y1:y1c - y1, x0c - x1:x1c - x1]
  if not mask.any():
    return None
  # Cast shadow on the ground to the lower right.
  sh_w, sh_h = int(obj_w * 0.6), max(int(obj_w * 0.15), 2)
  shadow = np.zeros((height, width), np.uint8)
  cv2.ellipse(shadow, (int(center_x + obj_w * 0.3), int(bottom_y)),
              (max(sh_w, 1), sh_h), 0, 0, 360, 1, -1)
  shadow = shadow.astype(bool) & (depth > z)
  image[shadow] *= 0.55
  surface = _object_surface(rng, cls, obj_h, obj_w)
  surface = surface[y0c - y1:y1c - y1, x0c - x1:x1c - x1]
  region = image[y0c:y1c, x0c:x1c]
  region[mask] = surface[mask]
  depth[y0c:y1c, x0c:x1c][mask] = z
  instances[y0c:y1c, x0c:x1c][mask] = obj_id
  return (y0c, y1c, x0c, x1c), int(np.count_nonzero(mask))


@functools.lru_cache(maxsize=16)
def _vignette(height: int, width: int) -> np.ndarray:
  """Per-pixel gain [H, W, 1] of the camera's vignetting (read-only)."""
  yy = np.arange(height, dtype=np.float32)[:, None]
  xx = np.arange(width, dtype=np.float32)[None, :]
  r2 = (yy / height - 0.5) ** 2 + (xx / width - 0.5) ** 2
  gain = (1 - 0.35 * r2)[..., None]
  gain.flags.writeable = False
  return gain


def render_scene(seed: int, index: int, height: int = 256, width: int = 256,
                 max_objects: int = 8, min_objects: int = 1,
                 num_classes: int = NUM_CLASSES) -> Scene:
  """Renders scene `index` of the stream `seed` at height x width.

  `num_classes` < NUM_CLASSES draws objects from the first `num_classes`
  classes only (e.g. a small detection problem); at the default every scene
  is the same as without the argument.
  """
  if height < 16 or width < 16:
    raise ValueError(f'Synthetic scenes need at least 16x16 pixels, got '
                     f'{height}x{width}.')
  if not 1 <= num_classes <= NUM_CLASSES:
    raise ValueError(f'num_classes must be in 1..{NUM_CLASSES}, got '
                     f'{num_classes}.')
  rng = _rng(seed, index)
  horizon = rng.uniform(0.25, 0.55) * height
  image, depth = _sky_and_ground(rng, height, width, horizon)
  instances = np.zeros((height, width), np.int32)
  n = int(rng.integers(min_objects, max_objects + 1))
  # A "hero" object of a uniformly drawn class stands near the camera, so
  # every class is equally often the most prominent one (the scene label);
  # the others stand farther away. Painting goes from far to near.
  classes = rng.integers(0, num_classes, n)
  hero_bottom = rng.uniform(0.85, 1.1) * height
  bottoms = np.concatenate([
      rng.uniform(horizon + 0.06 * height, hero_bottom * 0.95, n - 1),
      [hero_bottom]])
  centers = np.concatenate([rng.uniform(-0.05 * width, 1.05 * width, n - 1),
                            [rng.uniform(0.3, 0.7) * width]])
  order = np.argsort(bottoms, kind='stable')
  classes, bottoms, centers = classes[order], bottoms[order], centers[order]
  drawn: List[Tuple[int, int, Tuple[int, int, int, int]]] = []
  areas = []
  nearest_class = None
  for cls, by, cx in zip(classes, bottoms, centers):
    obj_id = len(drawn) + 1
    painted = _draw_object(rng, image, depth, instances, int(cls), obj_id, by,
                           cx, horizon, height, width)
    if painted is not None:
      drawn.append((obj_id, int(cls), painted[0]))
      areas.append(painted[1])
      nearest_class = int(cls)
  # Camera effects: slight blur, grain, vignetting.
  image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8))
  image += rng.normal(0, rng.uniform(1, 4), image.shape).astype(np.float32)
  image *= _vignette(height, width)
  image = np.clip(image, 0, 255).astype(np.uint8)

  # Objects painted over entirely by nearer ones are dropped; the others are
  # numbered 1.. in painting order. An object's pixels lie in its window.
  boxes, out_classes, visible = [], [], []
  relabel = np.zeros(len(drawn) + 1, instances.dtype)
  for (obj_id, cls, (y0, y1, x0, x1)), full_area in zip(drawn, areas):
    ys, xs = np.nonzero(instances[y0:y1, x0:x1] == obj_id)
    if ys.size == 0:
      continue
    boxes.append([y0 + ys.min(), x0 + xs.min(), y0 + ys.max() + 1,
                  x0 + xs.max() + 1])
    out_classes.append(cls)
    visible.append(ys.size / max(full_area, 1))
    relabel[obj_id] = len(boxes)
  label = nearest_class if nearest_class is not None else int(classes[-1])
  relabeled = relabel[instances]
  return Scene(
      image=image,
      depth=depth,
      boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
      classes=np.asarray(out_classes, np.int32),
      visible=np.asarray(visible, np.float32),
      instances=relabeled,
      label=label,
  )


def synthetic_image(seed: int, index: int, height: int = 256,
                    width: int = 256) -> np.ndarray:
  """Image `index` of stream `seed`: uint8 RGB [height, width, 3]."""
  return render_scene(seed, index, height, width).image
