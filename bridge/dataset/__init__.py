"""Reading Part-10 files without Pixel Data, and the UIDs and values that may name things on disk."""
