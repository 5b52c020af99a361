"""Input preprocessing of the released multi-task model (VGG convention).

The trunk released with the paper (google-deepmind/multiself) expects RGB
pixels in [0, 255] with the per-channel ImageNet mean subtracted, no scaling.
Every task's pipeline ends with `vgg_preprocess` so that a trunk trained here
and the released trunk see the same input distribution.
"""

import tensorflow as tf

VGG_MEAN_RGB = (123.68, 116.779, 103.939)


def vgg_preprocess(images):
  """RGB in [0, 255] (any real dtype or uint8), channels last -> float32 minus mean."""
  images = tf.convert_to_tensor(images)
  if images.shape.rank is not None and images.shape[-1] != 3:
    raise ValueError(f'vgg_preprocess expects RGB images with 3 channels in the '
                     f'last axis, got shape {images.shape}.')
  return tf.cast(images, tf.float32) - tf.constant(VGG_MEAN_RGB, tf.float32)


def vgg_unpreprocess(images):
  """Inverse of vgg_preprocess: float RGB in [0, 255] (not clipped)."""
  return tf.cast(images, tf.float32) + tf.constant(VGG_MEAN_RGB, tf.float32)
