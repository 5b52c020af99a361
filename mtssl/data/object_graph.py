"""The object graph of transitive invariance (Wang, He & Gupta 2017).

Nodes are 96x96 patches at both ends of object tracks; edges are intra
(one track), inter (one child cluster) and transitive. Ground-truth
identities, where the source has them, give each edge type's precision.

Typical use:

    tracks = object_graph.synthetic_tracks(seed=0, num_clips=60)
    graph = object_graph.build_graph(
        tracks, object_graph.color_hog_features,
        GraphConfig(num_parents=6, min_parent_size=8))
    object_graph.edge_precision(graph)  # against the generator's identities
"""

import dataclasses
import itertools
from typing import Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np

INTRA, INTER, TRANSITIVE = 0, 1, 2
EDGE_TYPES = ('intra', 'inter', 'transitive')
START, END = 0, 1


class GraphError(ValueError):
  """The graph cannot be built or read; the message names the cause."""


@dataclasses.dataclass
class GraphConfig:
  """Graph-construction settings; defaults are the paper's."""
  patch_size: int = 96
  track_length: int = 30
  num_parents: int = 5000        # k-means K of the first stage
  min_parent_size: int = 100     # smaller parents are removed
  neighbours: int = 10           # top-k of the second stage
  child_size: int = 4            # samples per child cluster
  kmeans_iterations: int = 25
  seed: int = 0

  def validate(self):
    for name in ('patch_size', 'track_length', 'num_parents',
                 'min_parent_size', 'neighbours', 'kmeans_iterations'):
      if getattr(self, name) <= 0:
        raise GraphError(f'{name} must be positive, got {getattr(self, name)}.')
    if not 2 <= self.child_size <= self.neighbours + 1:
      raise GraphError(f'child_size must be in [2, neighbours + 1], got '
                       f'{self.child_size} with neighbours {self.neighbours}.')


@dataclasses.dataclass
class Track:
  """One mined object and where the tracker found it `track_length` later."""
  start: np.ndarray          # uint8 [p, p, 3]
  end: np.ndarray            # uint8 [p, p, 3]
  video: str
  frame: int                 # frame index of the start
  start_box: Sequence[float]  # (x0, y0, x1, y1) in the frame
  end_box: Sequence[float]
  identity: int = -1         # ground-truth instance (-1: unknown)
  category: int = -1         # ground-truth class (-1: unknown)
  end_identity: int = -1
  end_category: int = -1


@dataclasses.dataclass
class Graph:
  """Nodes (2 per track: start, end) and typed edges."""
  patches: np.ndarray        # uint8 [N, p, p, 3] (or None when on disk)
  track: np.ndarray          # int32 [N]
  role: np.ndarray           # int8 [N] START / END
  parent: np.ndarray         # int32 [N] parent cluster, -1 if removed
  identity: np.ndarray       # int64 [N] ground truth, -1 unknown
  category: np.ndarray       # int32 [N] ground truth, -1 unknown
  edges: np.ndarray          # int32 [E, 2]
  edge_type: np.ndarray      # int8 [E]
  counts: Dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def num_nodes(self) -> int:
    return int(self.track.shape[0])

  def edges_of(self, kind: int) -> np.ndarray:
    return self.edges[self.edge_type == kind]

  def summary(self) -> Dict[str, int]:
    out = dict(self.counts)
    out['nodes'] = self.num_nodes
    out['tracks'] = int(np.sum(self.role == START))
    out['parents'] = int(len(np.unique(self.parent[self.parent >= 0])))
    for kind, name in enumerate(EDGE_TYPES):
      out[f'{name}_edges'] = int(np.sum(self.edge_type == kind))
    return out


# Features ------------------------------------------------------------------
def hog_features(patches: np.ndarray, cell: int = 12, bins: int = 9
                 ) -> np.ndarray:
  """Histograms of oriented gradients of uint8 patches [N, p, p, 3].

  Unsigned orientation, `bins` bins per `cell` x `cell` cell, each 2x2 block
  of cells L2-normalized; float32 [N, D]. The paper's ablation clusters
  with HOG.
  """
  patches = np.asarray(patches)
  out = []
  for patch in patches:
    gray = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=1)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=1)
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)
    bin_index = np.minimum((orientation / np.pi * bins).astype(int), bins - 1)
    n = patch.shape[0] // cell
    m = magnitude[:n * cell, :n * cell]
    b = bin_index[:n * cell, :n * cell]
    cells = np.zeros((n, n, bins), np.float32)
    rows, cols = np.mgrid[0:n * cell, 0:n * cell] // cell
    np.add.at(cells, (rows, cols, b), m)
    blocks = np.concatenate([cells[:-1, :-1], cells[1:, :-1], cells[:-1, 1:],
                             cells[1:, 1:]], axis=-1)
    blocks /= np.linalg.norm(blocks, axis=-1, keepdims=True) + 1e-6
    out.append(blocks.ravel())
  return np.asarray(out, np.float32)


def color_hog_features(patches: np.ndarray) -> np.ndarray:
  """`hog_features` joined with a hue-saturation histogram (8x4 bins) of each
  patch's central half, both L2-normalized: the features of the built-in
  synthetic graph, since no trained network exists when a run starts."""
  patches = np.asarray(patches)
  hists = []
  for patch in patches:
    p = patch.shape[0]
    centre = patch[p // 4:p - p // 4, p // 4:p - p // 4]
    hsv = cv2.cvtColor(centre, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [8, 4], [0, 180, 0, 256])
    hists.append(hist.ravel())
  return np.concatenate([_normalize(hog_features(patches)),
                         _normalize(np.asarray(hists))], axis=1)


def _normalize(x):
  x = np.asarray(x, np.float32)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


# Clustering -----------------------------------------------------------------
def kmeans(features: np.ndarray, k: int, iterations: int, seed: int
           ) -> np.ndarray:
  """Cluster of every row of `features` (cosine k-means, k-means++ seeding)."""
  x = _normalize(features)
  n = x.shape[0]
  k = min(k, n)
  rng = np.random.default_rng(seed)
  centres = [x[rng.integers(n)]]
  closest = 1.0 - x @ centres[0]
  for _ in range(1, k):
    p = np.maximum(closest, 0.0) ** 2
    total = p.sum()
    i = rng.choice(n, p=p / total) if total > 0 else rng.integers(n)
    centres.append(x[i])
    closest = np.minimum(closest, 1.0 - x @ x[i])
  centres = np.stack(centres)
  assign = np.zeros(n, np.int64)
  for iteration in range(iterations):
    new = _nearest_centre(x, centres)
    if iteration and np.array_equal(new, assign):
      break
    assign = new
    for c in range(k):
      members = x[assign == c]
      if len(members):
        centres[c] = _normalize(members.sum(0, keepdims=True))[0]
  return assign


def _nearest_centre(x, centres, chunk=4096):
  return np.concatenate([np.argmax(x[i:i + chunk] @ centres.T, axis=1)
                         for i in range(0, x.shape[0], chunk)])


def top_neighbours(features: np.ndarray, k: int, chunk: int = 2048
                   ) -> np.ndarray:
  """int64 [n, min(k, n-1)]: each row's nearest other rows by cosine."""
  x = _normalize(features)
  n = x.shape[0]
  k = min(k, n - 1)
  out = []
  for i in range(0, n, chunk):
    sim = x[i:i + chunk] @ x.T
    sim[np.arange(sim.shape[0]), np.arange(i, i + sim.shape[0])] = -np.inf
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k > 0 else (
        np.zeros((sim.shape[0], 0), np.int64))
    out.append(part)
  return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def child_clusters(features: np.ndarray, neighbours: int, size: int
                   ) -> List[tuple]:
  """Groups of `size` rows all in each other's top-`neighbours` (sorted)."""
  n = features.shape[0]
  if n < size:
    return []
  top = top_neighbours(features, neighbours)
  near = [set(row.tolist()) for row in top]
  mutual = [{j for j in near[i] if i in near[j]} for i in range(n)]
  groups = []

  def grow(group, candidates):
    if len(group) == size:
      groups.append(tuple(group))
      return
    for c in sorted(candidates):
      if c > group[-1]:
        grow(group + [c], candidates & mutual[c])

  for i in range(n):
    grow([i], {j for j in mutual[i] if j > i})
  return groups


# Graph construction ----------------------------------------------------------
def build_graph(tracks: Sequence[Track],
                embed: Callable[[np.ndarray], np.ndarray],
                config: Optional[GraphConfig] = None,
                counts: Optional[Dict[str, int]] = None) -> Graph:
  """The graph of `tracks`; `embed` maps uint8 patches [n, p, p, 3] to
  features [n, D]. Raises GraphError when no edge can be made."""
  config = config or GraphConfig()
  config.validate()
  counts = dict(counts or {})
  if not tracks:
    raise GraphError('No tracks to build a graph from (no moving object was '
                     'mined and tracked).')
  n_tracks = len(tracks)
  patches = np.stack([p for t in tracks for p in (t.start, t.end)])
  track_id = np.repeat(np.arange(n_tracks, dtype=np.int32), 2)
  role = np.tile(np.array([START, END], np.int8), n_tracks)
  identity = np.array([i for t in tracks for i in (t.identity, t.end_identity)],
                      np.int64)
  category = np.array([c for t in tracks for c in (t.category, t.end_category)],
                      np.int32)
  features = np.asarray(embed(patches[0::2]), np.float32)
  if features.shape[0] != n_tracks:
    raise GraphError(f'The embedding returned {features.shape[0]} rows for '
                     f'{n_tracks} patches.')
  assign = kmeans(features, config.num_parents, config.kmeans_iterations,
                  config.seed)
  sizes = np.bincount(assign)
  kept = np.flatnonzero(sizes >= config.min_parent_size)
  counts['kmeans_clusters'] = int(np.sum(sizes > 0))
  if not len(kept):
    raise GraphError(
        f'No parent cluster has at least min_parent_size='
        f'{config.min_parent_size} members (largest: {int(sizes.max())} of '
        f'{n_tracks} tracks, K={config.num_parents}); lower min_parent_size '
        f'or num_parents, or mine more videos.')
  counts['tracks_without_parent'] = int(np.sum(~np.isin(assign, kept)))
  parent_of_track = np.full(n_tracks, -1, np.int32)
  for new, old in enumerate(kept):
    parent_of_track[assign == old] = new
  parent = np.repeat(parent_of_track, 2)

  edges, types = [], []
  # Intra: each track's two ends (tracks with a parent only).
  for t in np.flatnonzero(parent_of_track >= 0):
    edges.append((2 * t, 2 * t + 1))
    types.append(INTRA)
  inter = set()
  children = 0
  for p in range(len(kept)):
    members = np.flatnonzero(parent_of_track == p)
    groups = child_clusters(features[members], config.neighbours,
                            config.child_size)
    children += len(groups)
    for group in groups:
      for a, b in itertools.combinations(members[list(group)], 2):
        inter.add((int(min(a, b)), int(max(a, b))))
  counts['child_clusters'] = children
  transitive = set()
  for a, b in sorted(inter):
    edges.append((2 * a, 2 * b))
    types.append(INTER)
    for x, y in ((2 * a, 2 * b + 1), (2 * a + 1, 2 * b),
                 (2 * a + 1, 2 * b + 1)):
      transitive.add((x, y))
  for x, y in sorted(transitive):
    edges.append((x, y))
    types.append(TRANSITIVE)
  graph = Graph(patches, track_id, role, parent, identity, category,
                np.asarray(edges, np.int32).reshape(-1, 2),
                np.asarray(types, np.int8), counts)
  if not len(graph.edges):
    raise GraphError('The graph has no edge.')
  return graph


def edge_precision(graph: Graph) -> Dict[str, Dict[str, float]]:
  """Per edge type, over edges whose ends have ground truth: the fraction
  linking one instance (`same_instance`) and one class (`same_class`)."""
  out = {}
  for kind, name in enumerate(EDGE_TYPES):
    e = graph.edges_of(kind)
    a, b = e[:, 0], e[:, 1]
    known = (graph.identity[a] >= 0) & (graph.identity[b] >= 0)
    if not np.any(known):
      continue
    a, b = a[known], b[known]
    out[name] = {
        'edges': int(len(a)),
        'same_instance': float(np.mean(graph.identity[a] == graph.identity[b])),
        'same_class': float(np.mean(graph.category[a] == graph.category[b])),
    }
  return out


# Mining ----------------------------------------------------------------------
def most_moving_box(mask: np.ndarray, side: int):
  """(x0, y0) of the side x side box holding the most True pixels of `mask`,
  and that count."""
  h, w = mask.shape
  side = min(side, h, w)
  integral = cv2.integral(mask.astype(np.uint8))
  sums = (integral[side:, side:] - integral[:-side, side:] -
          integral[side:, :-side] + integral[:-side, :-side])
  y0, x0 = np.unravel_index(np.argmax(sums), sums.shape)
  return (int(x0), int(y0)), int(sums[y0, x0])


def crop_patch(frame: np.ndarray, box, size: int) -> np.ndarray:
  """The box (x0, y0, x1, y1) of an RGB frame resized to size x size
  (reflecting at the frame border)."""
  x0, y0, x1, y1 = [float(v) for v in box]
  sx, sy = (x1 - x0) / size, (y1 - y0) / size
  m = np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]],
               np.float64)
  interp = cv2.INTER_AREA if max(sx, sy) > 1 else cv2.INTER_LINEAR
  return cv2.warpAffine(frame, m, (size, size),
                        flags=interp | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REFLECT)


def synthetic_tracks(seed: int, num_clips: int, starts_per_clip: int = 3,
                     start_step: int = 15,
                     height: int = 240, width: int = 320,
                     box_fraction: float = 0.5,
                     config: Optional[GraphConfig] = None,
                     counts: Optional[Dict[str, int]] = None) -> List[Track]:
  """Tracks mined from clips 0..num_clips-1 of the synthetic video `seed`.

  The motion cue is the generator's exact mask of independently moving
  pixels and the tracker its exact object positions: at each start frame the
  box (side `box_fraction` x height) holding the most moving pixels is a
  node, its object's box holding the most of that object's pixels
  `track_length` frames later is the other. Frames with under 5% of the box
  moving are pruned (`too_little_motion`), tracks whose object has left the
  frame are dropped (`lost_track`), both counted in `counts`.
  """
  from mtssl.data import synthetic_video  # pylint: disable=g-import-not-at-top
  config = config or GraphConfig()
  counts = counts if counts is not None else {}
  side = int(round(box_fraction * height))
  min_pixels = 0.05 * side * side
  tracks = []
  step = start_step
  for clip in range(num_clips):
    scene = synthetic_video.VideoScene(seed, clip, height, width,
                                       camera='pan_zoom')
    for s in range(starts_per_clip):
      t0 = s * step
      frame0, mask0 = scene.frame(t0)
      (x0, y0), count = most_moving_box(mask0, side)
      if count < min_pixels:
        counts['too_little_motion'] = counts.get('too_little_motion', 0) + 1
        continue
      inst0 = scene.instance_map(t0)[y0:y0 + side, x0:x0 + side]
      who = np.bincount(inst0.ravel(), minlength=len(scene.movers) + 1)[1:]
      mover = int(np.argmax(who))
      t1 = t0 + config.track_length
      inst1 = scene.instance_map(t1) == mover + 1
      (x1, y1), count1 = most_moving_box(inst1, side)
      if count1 < min_pixels:
        counts['lost_track'] = counts.get('lost_track', 0) + 1
        continue
      frame1, _ = scene.frame(t1)
      start_box = (x0, y0, x0 + side, y0 + side)
      end_box = (x1, y1, x1 + side, y1 + side)
      identity = clip * 16 + mover
      tracks.append(Track(
          crop_patch(frame0, start_box, config.patch_size),
          crop_patch(frame1, end_box, config.patch_size),
          f'synthetic:{seed}:{clip}', t0, start_box, end_box, identity,
          scene.movers[mover].cls, identity, scene.movers[mover].cls))
  return tracks
