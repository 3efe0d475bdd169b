"""Reports of benchmark grids: merged CSV, SafeCLIP-style tables, plots, markdown and HTML."""

from clipguard.reporting.merge import load_cells, read_results_csv, write_results_csv
from clipguard.reporting.report import terminal_tables, write_report

__all__ = ["load_cells", "read_results_csv", "terminal_tables", "write_report", "write_results_csv"]
