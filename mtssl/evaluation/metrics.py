"""The paper's evaluation metrics as numpy accumulators (section 5, appendix A).

`TopKAccumulator` (top-k accuracy), `DepthAccumulator` (delta < 1.25^k,
mean absolute and relative error over valid pixels) and
`DetectionAccumulator` (PASCAL VOC AP exactly as the VOC2007 devkit computes
it); results in percent, errors in the data's unit. Choices: BUILD.md,
"Metrics".

Typical use:

    acc = TopKAccumulator(ks=(1, 5))
    acc.update(scores, labels)        # once per batch
    acc.result()
"""

import math
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np


class MetricInputError(ValueError):
  """Inputs to a metric are malformed; the message names the argument."""


# ---------------------------------------------------------------------------
# Classification.
# ---------------------------------------------------------------------------


def top_k_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Boolean [N]: whether labels[i] is among the k highest scores[i].

  False for a row with any non-finite score.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2:
    raise MetricInputError(f'scores must be [N, num_classes], got shape '
                           f'{scores.shape}.')
  if labels.shape != (scores.shape[0],):
    raise MetricInputError(f'labels must be [N] = [{scores.shape[0]}], got '
                           f'shape {labels.shape}.')
  num_classes = scores.shape[1]
  bad = (labels < 0) | (labels >= num_classes)
  if np.any(bad):
    raise MetricInputError(
        f'label {int(labels[bad][0])} is outside the class range '
        f'[0, {num_classes}).')
  if k < 1:
    raise MetricInputError(f'k must be >= 1, got {k}.')
  label_scores = scores[np.arange(len(labels)), labels]
  higher = np.sum(scores > label_scores[:, None], axis=1)
  return (higher < k) & np.all(np.isfinite(scores), axis=1)


class TopKAccumulator:
  """Streaming top-k accuracies (percent) over a classification set."""

  def __init__(self, ks: Sequence[int] = (1, 5)):
    self.ks = tuple(ks)
    self.reset()

  def reset(self):
    self.count = 0
    self.nonfinite = 0
    self.correct = {k: 0 for k in self.ks}

  def update(self, scores, labels):
    for k in self.ks:
      self.correct[k] += int(np.sum(top_k_correct(scores, labels, k)))
    self.count += int(np.asarray(labels).shape[0])
    self.nonfinite += int(np.sum(~np.all(
        np.isfinite(np.asarray(scores, np.float64)), axis=1)))

  def result(self) -> Dict[str, float]:
    out = {f'top{k}': (100.0 * self.correct[k] / self.count
                       if self.count else float('nan')) for k in self.ks}
    out['num_examples'] = self.count
    out['nonfinite_examples'] = self.nonfinite
    return out


# ---------------------------------------------------------------------------
# Depth.
# ---------------------------------------------------------------------------

DELTA_BASE = 1.25


def depth_valid_mask(gt: np.ndarray) -> np.ndarray:
  gt = np.asarray(gt)
  return np.isfinite(gt) & (gt > 0)


class DepthAccumulator:
  """Streaming depth metrics over valid ground-truth pixels (see module doc)."""

  def __init__(self, thresholds: Sequence[float] = (
      DELTA_BASE, DELTA_BASE**2, DELTA_BASE**3)):
    self.thresholds = tuple(thresholds)
    self.reset()

  def reset(self):
    self.num_pixels = 0
    self.within = [0] * len(self.thresholds)
    self.abs_sum = 0.0
    self.rel_sum = 0.0
    self.nonfinite = 0

  def update(self, pred, gt):
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
      raise MetricInputError(f'prediction shape {pred.shape} differs from the '
                             f'ground-truth shape {gt.shape}.')
    valid = depth_valid_mask(gt)
    d = gt[valid]
    p = pred[valid]
    with np.errstate(divide='ignore', invalid='ignore'):
      ratio = np.where((p > 0) & np.isfinite(p), np.maximum(d / p, p / d),
                       np.inf)
    for i, t in enumerate(self.thresholds):
      self.within[i] += int(np.sum(ratio < t))
    err = np.abs(d - p)
    err = np.where(np.isfinite(err), err, np.inf)
    self.abs_sum += float(np.sum(err))
    self.rel_sum += float(np.sum(err / d))
    self.num_pixels += int(d.size)
    self.nonfinite += int(np.sum(~np.isfinite(p)))

  def result(self) -> Dict[str, float]:
    n = self.num_pixels
    out = {}
    for i, _ in enumerate(self.thresholds):
      out[f'delta{i + 1}'] = 100.0 * self.within[i] / n if n else float('nan')
    out['mae'] = self.abs_sum / n if n else float('nan')
    out['rel'] = self.rel_sum / n if n else float('nan')
    out['num_pixels'] = n
    out['nonfinite_predictions'] = self.nonfinite
    return out


# ---------------------------------------------------------------------------
# Detection.
# ---------------------------------------------------------------------------


def matlab_colon(a: float, d: float, b: float) -> List[float]:
  """The doubles of MATLAB's `a:d:b` (d > 0), as MATLAB's colon computes them.

  MathWorks' algorithm (colonop.m; MATLAB Coder's `eml_float_colon`): the
  number of intervals n = floor((b - a) / d + 0.5), with b itself as the last
  point when a + n*d is within 2 eps max(|a|, |b|) of it; the first half is
  a + k*d, the second half b_last - k*d, and an even n puts (a + b_last) / 2
  in the middle.
  """
  a, d, b = float(a), float(d), float(b)
  n = math.floor((b - a) / d + 0.5)
  last = a + n * d
  if abs(last - b) < 2 * np.finfo(np.float64).eps * max(abs(a), abs(b)):
    last = b
  elif last > b:
    n -= 1
    last = a + n * d
  if n < 0:
    return []
  v = [0.0] * (n + 1)
  for k in range(n // 2 + 1):
    v[k] = a + k * d
    v[n - k] = last - k * d
  if n % 2 == 0:
    v[n // 2] = (a + last) / 2
  return v


# The devkit's `for t=0:0.1:1`: [0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5,
# 0.6, 0.7, 0.8, 0.9, 1] (np.arange gives 0.6000000000000001 and
# 0.7000000000000001 instead).
VOC07_RECALL_THRESHOLDS = tuple(matlab_colon(0.0, 0.1, 1.0))


def voc_overlaps(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """VOCevaldet.m's overlap of one box with each row of `boxes`.

  Boxes are (ymin, xmin, ymax, xmax) inclusive pixel boxes (the devkit's
  "+1" areas); -inf where the boxes do not intersect (iw or ih <= 0), as the
  devkit never considers those.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  box = np.asarray(box, np.float64)
  iw = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]) + 1
  ih = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]) + 1
  ua = ((box[3] - box[1] + 1) * (box[2] - box[0] + 1)
        + (boxes[:, 3] - boxes[:, 1] + 1) * (boxes[:, 2] - boxes[:, 0] + 1)
        - iw * ih)
  intersect = (iw > 0) & (ih > 0)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(intersect, iw * ih / ua, -np.inf)


def voc_ap(recall: np.ndarray, precision: np.ndarray,
           use_07_metric: bool = True) -> float:
  """VOC average precision from recall/precision curves (devkit definitions).

  NaN precisions (0/0, before the first TP or FP) are skipped, as MATLAB's
  `max` skips them.
  """
  recall = np.asarray(recall, np.float64)
  precision = np.asarray(precision, np.float64)
  if use_07_metric:
    ap = 0.0
    for t in VOC07_RECALL_THRESHOLDS:
      above = precision[(recall >= t) & ~np.isnan(precision)]
      p = np.max(above) if above.size else 0.0
      ap = ap + p / 11
    return float(ap)
  # VOC2010+ (VOCap.m): area under the monotone precision envelope.
  mrec = np.concatenate([[0.0], recall, [1.0]])
  mpre = np.concatenate([[0.0], np.nan_to_num(precision, nan=0.0), [0.0]])
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  idx = np.where(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _as_boxes(name, value, n=None):
  value = np.asarray(value, np.float64)
  if value.size == 0:
    value = value.reshape(0, 4)
  if value.ndim != 2 or value.shape[1] != 4:
    raise MetricInputError(f'{name} must be [N, 4] boxes, got shape '
                           f'{value.shape}.')
  if n is not None and value.shape[0] != n:
    raise MetricInputError(f'{name} has {value.shape[0]} rows, expected {n}.')
  return value


class DetectionAccumulator:
  """VOC detection AP per class and mAP at several IoU thresholds."""

  def __init__(self, num_classes: int,
               iou_thresholds: Sequence[float] = (0.5, 0.75),
               use_07_metric: bool = True,
               class_names: Optional[Sequence[str]] = None):
    if num_classes < 1:
      raise MetricInputError(f'num_classes must be >= 1, got {num_classes}.')
    self.num_classes = num_classes
    self.iou_thresholds = tuple(iou_thresholds)
    self.use_07_metric = use_07_metric
    self.class_names = (list(class_names) if class_names is not None
                        else [str(c) for c in range(num_classes)])
    self.reset()

  def reset(self):
    # Per image: (boxes [N, 4], classes [N], difficult [N]).
    self.ground_truth: Dict[object, tuple] = {}
    # Per class: lists of (image id, score, box), in the order added.
    self.detections: List[list] = [[] for _ in range(self.num_classes)]
    self.nonfinite_detections = 0

  def _check_classes(self, name, classes):
    classes = np.asarray(classes).astype(np.int64).reshape(-1)
    bad = (classes < 0) | (classes >= self.num_classes)
    if np.any(bad):
      raise MetricInputError(f'{name}: class {int(classes[bad][0])} is outside '
                             f'the class range [0, {self.num_classes}).')
    return classes

  def add_ground_truth(self, image_id, boxes, classes, difficult=None):
    boxes = _as_boxes('ground-truth boxes', boxes)
    classes = self._check_classes('ground-truth classes', classes)
    if classes.shape[0] != boxes.shape[0]:
      raise MetricInputError(f'{boxes.shape[0]} ground-truth boxes but '
                             f'{classes.shape[0]} classes.')
    if difficult is None:
      difficult = np.zeros(boxes.shape[0], bool)
    difficult = np.asarray(difficult, bool).reshape(-1)
    if difficult.shape[0] != boxes.shape[0]:
      raise MetricInputError(f'{boxes.shape[0]} ground-truth boxes but '
                             f'{difficult.shape[0]} difficult flags.')
    if image_id in self.ground_truth:
      raise MetricInputError(f'image {image_id!r} already has ground truth.')
    self.ground_truth[image_id] = (boxes, classes, difficult)

  def add_detections(self, image_id, boxes, scores, classes):
    scores = np.asarray(scores, np.float64).reshape(-1)
    boxes = _as_boxes('detection boxes', boxes, scores.shape[0])
    classes = self._check_classes('detection classes', classes)
    if classes.shape[0] != scores.shape[0]:
      raise MetricInputError(f'{scores.shape[0]} detection scores but '
                             f'{classes.shape[0]} classes.')
    finite_score = np.isfinite(scores)
    self.nonfinite_detections += int(np.sum(
        ~(finite_score & np.all(np.isfinite(boxes), axis=1))))
    for box, score, cls in zip(boxes[finite_score], scores[finite_score],
                               classes[finite_score]):
      self.detections[cls].append((image_id, float(score), box))

  def class_ap(self, cls: int, iou_threshold: float) -> Optional[float]:
    """AP of one class at one IoU threshold; None without positives."""
    gt_per_image = {}
    npos = 0
    for image_id, (boxes, classes, difficult) in self.ground_truth.items():
      keep = classes == cls
      gt_per_image[image_id] = (boxes[keep], difficult[keep],
                                np.zeros(int(np.sum(keep)), bool))
      npos += int(np.sum(~difficult[keep]))
    dets = self.detections[cls]
    unknown = {d[0] for d in dets} - set(gt_per_image)
    if unknown:
      shown = sorted(map(str, unknown))[:5]
      raise MetricInputError(f'detections for image(s) {shown} that have no '
                             f'ground-truth entry.')
    if npos == 0:
      return None
    scores = np.array([d[1] for d in dets], np.float64)
    # MATLAB's sort is stable: tied confidences keep the order added.
    order = np.argsort(-scores, kind='stable')
    tp = np.zeros(len(dets))
    fp = np.zeros(len(dets))
    for rank, i in enumerate(order):
      image_id, _, box = dets[i]
      gt_boxes, gt_difficult, detected = gt_per_image[image_id]
      overlaps = voc_overlaps(box, gt_boxes)
      j = int(np.argmax(overlaps)) if overlaps.size else -1
      if j >= 0 and overlaps[j] >= iou_threshold:
        if gt_difficult[j]:
          continue  # neither TP nor FP
        if not detected[j]:
          tp[rank] = 1.0
          detected[j] = True
        else:
          fp[rank] = 1.0
      else:
        fp[rank] = 1.0
    tp = np.cumsum(tp)
    fp = np.cumsum(fp)
    recall = tp / npos
    with np.errstate(divide='ignore', invalid='ignore'):
      precision = tp / (fp + tp)  # 0/0 = NaN while only ignored so far
    return voc_ap(recall, precision, self.use_07_metric)

  def result(self) -> Dict[str, object]:
    out = {}
    for t in self.iou_thresholds:
      tag = f'{int(round(t * 100))}'
      aps = [self.class_ap(c, t) for c in range(self.num_classes)]
      valid = [a for a in aps if a is not None]
      out[f'mAP@{tag}'] = 100.0 * float(np.mean(valid)) if valid else float(
          'nan')
      out[f'AP@{tag}'] = {
          name: (None if a is None else 100.0 * a)
          for name, a in zip(self.class_names, aps)
      }
    out['num_images'] = len(self.ground_truth)
    out['nonfinite_detections'] = self.nonfinite_detections
    return out


def random_detection_baseline(ground_truth: Iterable[tuple], num_classes: int,
                              image_sizes: Iterable[tuple], per_image: int,
                              seed: int,
                              iou_thresholds=(0.5, 0.75)) -> Dict[str, object]:
  """mAP of a detector that outputs random boxes, classes and scores.

  `ground_truth`: (boxes, classes, difficult) per image; `image_sizes`:
  (height, width) per image. Box corners are uniform over the image. This is
  the chance level a trained detector is compared with.
  """
  rng = np.random.default_rng(seed)
  acc = DetectionAccumulator(num_classes, iou_thresholds)
  for i, ((boxes, classes, difficult), (h, w)) in enumerate(
      zip(ground_truth, image_sizes)):
    acc.add_ground_truth(i, boxes, classes, difficult)
    ys = np.sort(rng.uniform(0, h, (per_image, 2)), axis=1)
    xs = np.sort(rng.uniform(0, w, (per_image, 2)), axis=1)
    det = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], axis=1)
    acc.add_detections(i, det, rng.uniform(size=per_image),
                       rng.integers(0, num_classes, per_image))
  return acc.result()
