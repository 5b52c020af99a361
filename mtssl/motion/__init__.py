"""Motion-segmentation labels from video (label extraction for the ms task)."""
