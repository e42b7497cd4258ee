"""dicom-bridge: a DICOM bridge daemon."""

__version__ = "0.1.0"
