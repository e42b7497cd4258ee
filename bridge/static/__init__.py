"""Static DICOMweb trees (issue 18): folders of files that a plain web server serves as
the read-only half of DICOMweb (study, series and instance queries, metadata, frames,
bulk data), laid out as static-DICOMweb readers such as OHIF's ``staticWado`` expect.
``metadata`` gives a data set's DICOM JSON (PS3.18 Annex F) for the metadata and query
files; ``frames`` cuts Pixel Data into the frame files, one multipart part each;
``tree`` writes instances into a tree and keeps its series, study and query files up to
date (used by the ``static`` destination and ``dicom-bridge convert``); ``serve`` is the
ASGI app that serves a tree's DICOMweb read routes (``dicom-bridge serve-static``),
answering searches from its query files with ``qido``."""
