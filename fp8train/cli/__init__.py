"""Command-line entry points: ``python train.py`` and the ``fp8train`` command."""
