"""Test support shared by the tests, the benches and the demo, so that none of them borrows from another: one
definition each of a synthetic volume, a file writer or a reader of committed output. Nothing in production imports
it (a test holds to that).

- ``volumes``: synthetic volumes (the demo's body with a planted anomaly, CT-like, smooth, per-dtype tissue);
- ``nifti``, ``dicom``: writers of input files (NIfTI as given or as scanners store it; DICOM series with pydicom);
- ``archive``: a small NIfTI archive and its CSV manifest;
- ``results``: reading committed ``results/`` and ``errors/`` rows, locally, through pyarrow or directly on S3;
- ``faults``: faults planted in the real pipeline (``python -m jobs.testing FAULTS ...``);
- ``processes``, ``ray_nodes``, ``tcp_proxy``: drivers as processes, waiting, real Ray nodes, a TCP proxy to cut;
- ``reference``, ``cpu``: the scipy preprocessing oracle, and the CPU a figure was measured on.
"""
