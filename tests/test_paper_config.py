"""The paper's configuration builds and trains one step of every task on CPU.

ResNet-v2-101 to block 3 at output stride 8, all four tasks with the paper's
heads (rp 61 M, col 35 M, ms 21 M parameters) and input sizes (96x96 patches,
256x256 images, 240x320 frames), batch 1 on the built-in data: the only
test that trains the full-size model. The steps run eagerly: the point here
is the paper's sizes, and the traced steps are the same code, tested at small
sizes everywhere else. Traced, the test took 60 s on the 2-core machine;
eagerly 32 s.
"""

import numpy as np
import tensorflow as tf

from mtssl.configs import training as configs
from mtssl.training import trainer as trainer_lib


class PaperConfigTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    tf.config.run_functions_eagerly(True)
    self.addCleanup(tf.config.run_functions_eagerly, False)

  def test_one_step_per_task(self):
    config = configs.paper_config(('rp', 'col', 'ex', 'ms'))
    for run in config.tasks.values():
      run.config.batch_size = 2 if run is config.tasks['ex'] else 1
      run.data = 'synthetic'
    config = configs.dataclasses.replace(
        config, model_dir=self.get_temp_dir(), max_cost=None, steps=4,
        cost_model='measured', snapshot_cost=None, log_every=4)
    trainer = trainer_lib.Trainer(config)
    trainer.setup()
    model = trainer.model
    self.assertEqual(model.trunk.scope, 'resnet_v2_101')
    trunk_params = sum(int(np.prod(v.shape)) for v in model.trunk.variables)
    self.assertEqual(trunk_params, 27_635_200)
    col_head = sum(int(np.prod(v.shape))
                   for v in model.heads['col'].trainable_variables)
    self.assertAllClose(col_head / 1e6, 35.0, atol=0.5)
    result = trainer.train()
    self.assertEqual(result['task_steps'], {'rp': 1, 'col': 1, 'ex': 1, 'ms': 1})
    self.assertEqual(result['skipped_steps'], {'rp': 0, 'col': 0, 'ex': 0, 'ms': 0})
    self.assertTrue(tf.io.gfile.exists(result['checkpoint'] + '.index'))


if __name__ == '__main__':
  tf.test.main()
