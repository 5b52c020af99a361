"""A trained trunk as a TF Serving version directory, written atomically.

`export_saved_model` writes `<export_base>/<model_name>/<version>/`: the
SavedModel of mtssl.deploy.serving, warm-up requests and
`assets.extra/mtssl_export.json`. Layout and versions: README, "Writing the
SavedModel"; choices: BUILD.md, "Export".

Typical use:

    trunk = load_trunk('/runs/mt/ckpt', 'resnet_v2_101', output_stride=8)
    result = export_saved_model(trunk, '/models', 'mtssl')
"""

import dataclasses
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

import mtssl
from mtssl.backbones import resnet_v2
from mtssl.backbones import slim_checkpoint
from mtssl.data import synthetic
from mtssl.deploy import serving
from mtssl.utils import io_utils

WARMUP_FILE = 'tf_serving_warmup_requests'
METADATA_FILE = 'mtssl_export.json'
ASSETS_EXTRA = 'assets.extra'
WARMUP_SEED = 20170  # Synthetic scenes used as warmup images.
_MODEL_NAME_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')


class ExportError(ValueError):
  """An export request that cannot be carried out; the message says why."""


@dataclasses.dataclass
class ExportResult:
  path: str
  version: int
  metadata: dict


def check_model_name(name: str) -> str:
  if not name or not _MODEL_NAME_RE.match(name):
    raise ExportError(f'Model name {name!r} must be letters, digits, "_", "." '
                      f'or "-" (it is a directory name and a TF Serving '
                      f'model name).')
  return name


def existing_versions(model_dir: str) -> List[int]:
  """Numeric version directories of a TF Serving model directory."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(int(n) for n in os.listdir(model_dir)
                if n.isdigit() and os.path.isdir(os.path.join(model_dir, n)))


def next_version(model_dir: str) -> int:
  versions = existing_versions(model_dir)
  return versions[-1] + 1 if versions else 1


def version_directory(export_base: str, model_name: str,
                      version: Optional[int] = None,
                      overwrite: bool = False) -> Tuple[int, str]:
  """(version, its directory); ExportError if invalid or existing."""
  if not export_base:
    raise ExportError('--export_base is required.')
  model_dir = os.path.join(export_base, check_model_name(model_name))
  if version is None:
    version = next_version(model_dir)
  if int(version) < 1:
    raise ExportError(f'--version must be a positive integer, got {version}.')
  version_dir = os.path.join(model_dir, str(int(version)))
  if os.path.exists(version_dir) and not overwrite:
    raise ExportError(f'{version_dir} already exists; pass --overwrite to '
                      f'replace it or choose another --version.')
  return int(version), version_dir


def resolve_checkpoint(path: str) -> str:
  """A checkpoint prefix from a prefix or a directory, or ExportError."""
  if not path:
    raise ExportError('--checkpoint is required.')
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise ExportError(f'No checkpoint found in directory {path!r}.')
    return latest
  if not tf.io.gfile.exists(path + '.index'):
    raise ExportError(f'Checkpoint {path!r} does not exist (no {path}.index).')
  return path


def load_trunk(checkpoint: str, trunk_name: str = 'resnet_v2_101',
               output_stride: Optional[int] = 8) -> resnet_v2.ResNetV2:
  """Builds the named trunk and restores its `backbone` checkpoint."""
  try:
    trunk = resnet_v2.trunk_from_name(trunk_name, output_stride=output_stride)
  except ValueError as e:
    raise ExportError(str(e)) from None
  trunk.build_for_input()
  try:
    slim_checkpoint.restore_trunk(trunk, checkpoint)
  except slim_checkpoint.SlimCheckpointError as e:
    raise ExportError(str(e)) from None
  return trunk


def import_serving_apis():
  try:
    # pylint: disable=g-import-not-at-top
    from tensorflow_serving.apis import model_pb2
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_log_pb2
  except ImportError as e:
    raise ExportError(
        f'tensorflow-serving-api is needed to write the warmup requests '
        f'({e}); pip install "tensorflow-serving-api>=2.20,<2.21".') from None
  return model_pb2, predict_pb2, prediction_log_pb2


def warmup_images(image_size: Sequence[int]):
  """(serving_default batches of encoded images, from_pixels batch)."""
  h, w = image_size

  def scene(index, height, width):
    return synthetic.synthetic_image(WARMUP_SEED, index, max(height, 1),
                                     max(width, 1))

  def encode(image, fmt):
    if fmt == 'jpeg':
      return tf.io.encode_jpeg(image, quality=90).numpy()
    return tf.io.encode_png(image).numpy()

  first = [encode(scene(0, h, w), 'jpeg')]
  second = [encode(scene(1, h // 2, w // 2), 'png'),
            encode(scene(2, h * 3 // 2, w * 3 // 2), 'jpeg')]
  pixels = scene(3, h, w)[None].astype(np.float32)
  return [first, second], pixels


def warmup_requests(model_name: str, image_size: Sequence[int]):
  """The PredictionLog records written to assets.extra."""
  model_pb2, predict_pb2, prediction_log_pb2 = import_serving_apis()
  batches, pixels = warmup_images(image_size)
  requests = [(serving.SERVING_SIGNATURE, serving.IMAGES_INPUT,
               tf.make_tensor_proto(batch, dtype=tf.string))
              for batch in batches]
  requests.append((serving.PIXELS_SIGNATURE, serving.PIXELS_INPUT,
                   tf.make_tensor_proto(pixels, dtype=tf.float32)))
  logs = []
  for signature, input_name, tensor in requests:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name,
                                       signature_name=signature))
    request.inputs[input_name].CopyFrom(tensor)
    logs.append(prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)))
  return logs


def export_saved_model(trunk: resnet_v2.ResNetV2, export_base: str,
                       model_name: str = 'mtssl',
                       version: Optional[int] = None,
                       image_size: Sequence[int] = serving.DEFAULT_IMAGE_SIZE,
                       overwrite: bool = False,
                       checkpoint: Optional[str] = None) -> ExportResult:
  """Writes the feature extractor of `trunk` as a TF Serving version.

  Returns the version directory, its number and the metadata written.
  Raises ExportError before writing anything when the version exists
  (and not `overwrite`) or the arguments are invalid.
  """
  version, version_dir = version_directory(export_base, model_name, version,
                                           overwrite)
  logs = warmup_requests(model_name, image_size)

  extractor = serving.FeatureExtractor(trunk, image_size=image_size)
  extractor.trace_call()
  signatures = extractor.signatures()
  metadata = extractor.describe()
  metadata.update(checkpoint=checkpoint, mtssl_version=mtssl.__version__,
                  tensorflow_version=tf.__version__, model_name=model_name,
                  version=version)
  with io_utils.atomic_directory(version_dir, overwrite=overwrite) as tmp:
    tf.saved_model.save(extractor, tmp, signatures=signatures)
    extra = os.path.join(tmp, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, WARMUP_FILE)) as writer:
      for log in logs:
        writer.write(log.SerializeToString())
    io_utils.atomic_write_json(os.path.join(extra, METADATA_FILE), metadata)
  return ExportResult(path=version_dir, version=version, metadata=metadata)
