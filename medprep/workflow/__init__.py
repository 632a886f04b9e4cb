"""The Snakemake glue: everything the workflow's rules call, and nothing the engines need.

- ``parse``: what runs while Snakemake reads the workflow (configuration checks, the
  sample table, runs, source fingerprints, the check of published samples, parameters)
- ``resources``: memory, threads and local disk of each job, and the global resources
- ``runner``: ``run_step``, how every rule script runs (logging, one error line, failure
  records, working files restored)
- ``manifest``: the step manifests that pass a sample from one step to the next
- ``working_files``: which working files go after upload, and restoring them for a rerun
- ``sheet``: the sample sheet, validated row by row
"""
