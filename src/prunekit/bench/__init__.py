"""The bench: suites in YAML, resumable runs in SQLite, reports with plots.

    prunekit bench --suite demo          # runs what is not done yet; Ctrl-C and re-run to resume
    prunekit bench --suite bip_resnet20 --variant 1epoch   # a named variant (`prunekit bench --list`)
    prunekit report --out report/        # markdown + PNG plots (or --format csv)
"""
from .report import write_report
from .runner import Summary, run_suite
from .store import Store
from .suite import Suite, list_suites, load_suite

__all__ = ["Store", "Suite", "Summary", "list_suites", "load_suite", "run_suite", "write_report"]
