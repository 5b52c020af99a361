r"""Writes a folder of images as TFRecord shards for `--<task>_data=tfrecord:DIR`.

  python tools/make_shards.py --folder=/data/imagenet/train \
      --output=/data/imagenet/shards --records_per_shard=1024

Each shard holds tf.train.Examples with `image/encoded` (the file's bytes)
and `image/class/label` (the index of the first-level subfolder, sorted, when
every image lies in one); beside it `SHARD.index` (record offsets) and
`SHARD.json` (its counts). Files that do not decode are skipped and counted
by reason. Shards are written under temporary names and renamed; rerunning
the same command keeps finished shards. `summary.json` in the output folder
sums it up. Exit status 2 on a bad folder or flag.
"""

import sys

from absl import app
from absl import flags

_FOLDER = flags.DEFINE_string('folder', None, 'Folder of images (nested).')
_OUTPUT = flags.DEFINE_string('output', None, 'Folder for the shards.')
_RECORDS = flags.DEFINE_integer('records_per_shard', 1024,
                                'Images per shard.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the order of the images.')
_LABELS = flags.DEFINE_bool('labels', True, 'Write image/class/label from the '
                            'first-level subfolders.')


def main(argv) -> int:
  del argv
  if not _FOLDER.value or not _OUTPUT.value:
    print('error: --folder and --output are required.', file=sys.stderr)
    return 2
  from mtssl.data import image_records  # pylint: disable=g-import-not-at-top
  from mtssl.data import sources  # pylint: disable=g-import-not-at-top
  try:
    summary = image_records.make_shards(
        _FOLDER.value, _OUTPUT.value, _RECORDS.value, seed=_SEED.value,
        labels=_LABELS.value)
  except (sources.DataSourceError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'{summary["records"]} records in {summary["shards"]} shards '
        f'({summary["shards_written"]} written, {summary["shards_kept"]} kept) '
        f'at {summary["output"]}; skipped: {summary["skipped"] or "none"}.')
  return 0


def run():
  app.run(main)


if __name__ == '__main__':
  run()
