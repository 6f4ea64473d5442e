"""Sweeps: many variants, one metric table (data, prefix replay, checkpoints, metrics, tables,
config files). Built on `splice.engine`; imports nothing above it."""
