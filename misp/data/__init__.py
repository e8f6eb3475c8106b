"""Data: record formats and validation, the Shapes world, collation, and the negative-sampler datamodule."""
