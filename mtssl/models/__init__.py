"""Multi-task model: shared trunk, per-task heads, unit lasso."""
