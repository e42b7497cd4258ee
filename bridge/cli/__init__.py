"""The command line: ``dicom-bridge`` and its subcommands."""
