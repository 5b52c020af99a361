"""mtssl: Multi-task Self-Supervised Visual Learning (Doersch & Zisserman, 2017)."""

import os

# mtssl and Model Garden build on tf_keras. With this set before TensorFlow
# is imported, `tf.keras` is tf_keras too and TensorFlow does not import
# Keras 3 (about 1.7 CPU-s of every process start). A value the user set wins.
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

__version__ = '0.1.0'
