"""The outlier monitor: per-layer SwiGLU outlier, alignment and FP8 overflow statistics, alerts and reports.

``stats`` holds the statistics as pure functions of tensors, ``alerts`` the rules, ``monitor`` the hooks and
records. Nothing here imports the trainer; the trainer calls ``capture`` around each micro-batch of a step and
``collect`` after its optimizer step.
"""

from fp8train.monitor.alerts import Alert
from fp8train.monitor.monitor import OUTLIERS_FILE, DisabledMonitor, OutlierMonitor, build_monitor

__all__ = ["OUTLIERS_FILE", "Alert", "DisabledMonitor", "OutlierMonitor", "build_monitor"]
