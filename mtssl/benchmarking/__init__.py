"""Benchmarks of training steps and input pipelines, FLOP counts, NumPy/OpenCV reference pipelines."""
