"""medprep: preprocessing of lung CT series and whole-slide images for deep learning.

The package holds all image, storage and parallel logic; the Snakemake rule scripts in
``scripts/`` only read the ``snakemake`` object, call into it and write outputs.
"""

__version__ = "0.1.0"
