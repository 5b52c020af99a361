"""Evaluation of a pre-trained trunk: the paper's three protocols (section 5).

Importing this package is cheap (no TensorFlow); the modules are:
registry (protocols by name), metrics, data, augment, trunks, runner,
linear, depth, detection (the protocols), factory.
"""
