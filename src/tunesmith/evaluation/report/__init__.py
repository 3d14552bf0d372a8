"""Run reports: plots of a run's logged metrics and one HTML page per run."""

from tunesmith.evaluation.report.page import REPORT_FILE, render_report

__all__ = ["REPORT_FILE", "render_report"]
