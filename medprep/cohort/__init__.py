"""The cohort report: ``table`` (one row per sample, its status and figures; the summary a
run prints), ``html`` (the table as a page) and ``plot`` (the cohort plot)."""
