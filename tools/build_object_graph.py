r"""Builds the object graph of transitive invariance from a folder of videos.

  python tools/build_object_graph.py --videos=/data/videos \
      --output_dir=/data/ti --checkpoint=runs/rp --trunk=resnet_v2_101

Moving objects are mined and tracked for 30 frames, embedded with the rp
trunk and patch units of --checkpoint, clustered (k-means parents, mutual
top-10 child clusters of 4) and linked by transitivity
(mtssl/tasks/ti_mining.py). The graph goes to OUTPUT_DIR/graph (schema in
mtssl/data/graph_records.py), which the ti task reads with
`--ti_data=graph:OUTPUT_DIR/graph`; OUTPUT_DIR/graph/summary.json counts
nodes, parents, child clusters, every edge type and every rejection reason.
Mining resumes where an interrupted run stopped.

Exit status: 0 done, 2 the graph could not be built (the message says why).
"""

import json
import sys

from absl import app
from absl import flags

from mtssl.backbones import resnet_v2
from mtssl.data import object_graph
from mtssl.tasks import ti_mining as object_mining

_VIDEOS = flags.DEFINE_string('videos', None, 'Folder of videos (searched '
                              'recursively).')
_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Mined tracks go to '
                                  'OUTPUT_DIR/mined, the graph to '
                                  'OUTPUT_DIR/graph.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'A run (or checkpoint prefix) holding the trunk and '
    'the rp head, whose patch features cluster the objects; empty: HOG and '
    'colour histograms (the paper\'s HOG ablation)')
_TRUNK = flags.DEFINE_enum('trunk', 'resnet_v2_101',
                           sorted(resnet_v2.TRUNK_BLOCKS),
                           'The checkpoint\'s trunk.')
_OUTPUT_STRIDE = flags.DEFINE_integer('output_stride', 8, 'Trunk output '
                                      'stride.')
_TRACK_LENGTH = flags.DEFINE_integer('track_length', 30, 'Frames an object '
                                     'is tracked (paper: 30).', lower_bound=1)
_FRAME_STEP = flags.DEFINE_integer('frame_step', 15, 'A start frame every N '
                                   'frames.', lower_bound=1)
_NUM_PARENTS = flags.DEFINE_integer(
    'num_parents', 5000, 'k-means K of the first stage (paper: 5000; scale '
    'it with the number of tracks).', lower_bound=1)
_MIN_PARENT_SIZE = flags.DEFINE_integer(
    'min_parent_size', 100, 'Parents with fewer members are removed '
    '(paper: 100).', lower_bound=1)
_NEIGHBOURS = flags.DEFINE_integer('neighbours', 10, 'Top-k of the second '
                                   'stage (paper: 10).', lower_bound=1)
_CHILD_SIZE = flags.DEFINE_integer('child_size', 4, 'Samples per child '
                                   'cluster (paper: 4).', lower_bound=2)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the k-means.')
flags.mark_flags_as_required(['videos', 'output_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    options = object_mining.MiningOptions(track_length=_TRACK_LENGTH.value,
                                          frame_step=_FRAME_STEP.value)
    options.validate()
    config = object_graph.GraphConfig(
        track_length=_TRACK_LENGTH.value, num_parents=_NUM_PARENTS.value,
        min_parent_size=_MIN_PARENT_SIZE.value, neighbours=_NEIGHBOURS.value,
        child_size=_CHILD_SIZE.value, seed=_SEED.value)
    config.validate()
    if _CHECKPOINT.value:
      embed = object_mining.RpEmbedder(_CHECKPOINT.value, _TRUNK.value,
                                       _OUTPUT_STRIDE.value)
    else:
      embed = object_graph.color_hog_features
    summary = object_mining.build_from_videos(
        _VIDEOS.value, _OUTPUT_DIR.value, options, config, embed,
        log=lambda line: print(line, file=sys.stderr, flush=True))
  except ValueError as e:  # GraphError, or a checkpoint that does not fit
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=2, sort_keys=True))
  return 0


if __name__ == '__main__':
  app.run(main)
