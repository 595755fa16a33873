"""Data: read files, validate records, render templates, tokenize with masks, batch."""
