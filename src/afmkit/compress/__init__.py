"""On-device compression: palettized weights (k-means look-up tables), see docs/compression.md."""
