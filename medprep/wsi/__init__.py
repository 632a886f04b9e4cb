"""Whole-slide images: resolution, tissue mask, tiling, per-tile QC and writers.

Layout: ``slide`` (thin OpenSlide I/O), ``resolution`` (mpp and level choice),
``tissue`` (mask maths), ``grid`` (tile grid, coverage, blocks), ``qc`` (tile scores),
``writers`` (encoders, containers, table), ``workers`` (pool workers),
``preprocess`` and ``tiler`` (orchestration), ``memory`` (peak memory estimates),
``synthetic`` (pyramidal test and benchmark slides), ``steps`` (what the rule scripts run).
"""
