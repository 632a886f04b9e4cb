"""Lung CT engine behind ``preprocess_ct`` and ``tile_ct``.

- ``dicom_io``: the pydicom edge (header scan without pixels, pixel decoding, versions)
- ``series``: classify files, group series, pick one, sort along the normal, geometry
- ``hu``: modality LUT to Hounsfield units, padding to air, normalisation
- ``resample``: separable resampling from the real slice positions (gantry tilt, gaps)
- ``lung``: the reference lung mask, made robust (border seeding, both lungs, no-lungs),
  with nodule pockets filled per lung and the lungs told apart (left/right volumes)
- ``lidc``: LIDC-IDRI reader XML (readings, outlines, centroid and diameters)
- ``nifti``: affines (LPS to RAS) and reproducible ``.nii.gz`` writing
- ``qc_picture``: the QC picture
- ``patches``: the 3D patch grid; ``tile``: the tile_ct engine; ``preprocess``: the
  preprocess_ct engine; ``steps``: ``run_preprocess``/``run_tile``, what the rule scripts,
  tests and benchmark call (outputs plus step manifest)
- ``memory``: peak-memory estimates for the workflow's ``mem_mb``
- ``phantom``: a synthetic chest CT written as DICOM, with its ground truth
- ``settings``: the ``ct:`` config section with defaults
"""
