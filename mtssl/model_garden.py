"""Model Garden's training driver with the mtssl backbone registered.

Typical use (stock experiments can name `backbone.type: mtssl_resnet_v2`):

  python -m mtssl.model_garden --experiment=fasterrcnn_resnetfpn_coco \
      --config_file=voc.yaml --mode=train_and_eval --model_dir=/runs/det
"""

from absl import app
from absl import flags


def main(argv) -> int:
  # pylint: disable=g-import-not-at-top
  from mtssl.deploy import model_garden  # registers backbone and experiments
  from official.vision import train
  # pylint: enable=g-import-not-at-top
  del model_garden
  train.main(argv)
  return 0


def run():
  from official.common import flags as tfm_flags  # pylint: disable=g-import-not-at-top
  tfm_flags.define_flags()
  flags.mark_flags_as_required(['experiment', 'mode', 'model_dir'])
  app.run(main)


if __name__ == '__main__':
  run()
