"""mtssl: Multi-task Self-Supervised Visual Learning (Doersch & Zisserman, 2017)."""

__version__ = '0.1.0'
