"""A checkpoint written before the package was reorganized still restores."""

import os
import shutil

import tensorflow as tf

from mtssl import train
from mtssl.training import trainer as trainer_lib

OLD = os.path.join(os.path.dirname(__file__), 'data', 'checkpoint_357a851')
FLAGS = ['--tasks=rp,col,ex,ms', '--trunk=resnet_v2_tiny', '--lasso',
         '--checkpoint_every=4', '--rp_batch_size=2', '--col_batch_size=2',
         '--ex_batch_size=2', '--ms_batch_size=2', '--col_head_widths=8,8',
         '--ms_head_widths=8,8', '--rp_unit_depths=16,8',
         '--rp_unit_bottleneck=4', '--rp_fc_bottleneck=4',
         '--ex_unit_depths=16,8', '--ex_unit_bottleneck=4']


def parse(args):
  train.FLAGS.unparse_flags()
  train.FLAGS(['mtssl.train', *args])
  try:
    return train.config_from_flags()
  finally:
    train.FLAGS.unparse_flags()


class OldCheckpointTest(tf.test.TestCase):

  def test_restores_every_variable_and_resumes(self):
    model_dir = os.path.join(self.get_temp_dir(), 'run')
    shutil.copytree(OLD, model_dir)
    with open(os.path.join(model_dir, 'checkpoint'), 'w') as f:
      f.write('model_checkpoint_path: "ckpt-4"\n'
              'all_model_checkpoint_paths: "ckpt-4"\n')
    config = parse(
        FLAGS + [f'--model_dir={model_dir}', '--steps=5'])
    trainer = trainer_lib.Trainer(config)
    try:
      trainer.setup()  # asserts that every object of the checkpoint matched
      self.assertEqual(int(trainer.state.global_step.numpy()), 4)
      reader = tf.train.load_checkpoint(os.path.join(model_dir, 'ckpt-4'))
      saved = reader.get_variable_to_shape_map()
      trunk = [k for k in saved if k.startswith('backbone/')
               and k.endswith('.ATTRIBUTES/VARIABLE_VALUE')]
      self.assertNotEmpty(trunk)
      result = trainer.train()
    finally:
      trainer.close_inputs()
    self.assertEqual(result['global_step'], 5)
    resaved = tf.train.load_checkpoint(result['checkpoint'])
    self.assertEqual(sorted(saved), sorted(resaved.get_variable_to_shape_map()))


if __name__ == '__main__':
  tf.test.main()
