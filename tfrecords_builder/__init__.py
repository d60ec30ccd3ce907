"""NIfTI volumes -> validated, selected slices -> sharded TFRecords with a manifest.

Stages, one module each: ``ingest`` (find, load, validate cases) -> ``selection`` (which
slices, 2.5D context) -> ``features`` (the one feature spec) -> ``writer`` (TFDS-style
shards) -> ``build`` (splits, manifest, resume). Importing this package does not import
TensorFlow; ``ingest`` and ``selection`` stay TensorFlow-free so worker processes start fast.
"""
