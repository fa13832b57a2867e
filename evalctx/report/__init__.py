"""Plots and the HTML/Markdown run report (matplotlib is imported only when a plot is drawn)."""

from evalctx.report.render import write_report

__all__ = ["write_report"]
