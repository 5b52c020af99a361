"""TensorFlow image ops shared by tasks (batched, graph- and XLA-friendly)."""
