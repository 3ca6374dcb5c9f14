"""Training, evaluation, gate and export CLIs: run each as `python -m training.<name>` (see README)."""
