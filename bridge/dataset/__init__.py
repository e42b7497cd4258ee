"""Data sets: Part-10 files read without Pixel Data, tag paths and their values, new
elements from configured values, the UIDs and values that may name things on disk, text
fitted to a character set, and C-FIND identifiers read into queries."""
