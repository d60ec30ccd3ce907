"""NIfTI volumes -> validated, selected slices -> sharded TFRecords with a manifest.

Cases are found, loaded and checked by ``kerasunet.core.cases`` (shared with evaluate and
predict). Stages, one module each: ``ingest`` (inspect, extract cases) -> ``selection`` (which
slices, 2.5D context) -> ``features`` (the one feature spec) -> ``writer`` (TFDS-style
shards) -> ``build`` (splits, manifest, resume). Importing this package does not import
TensorFlow; ``ingest`` and ``selection`` stay TensorFlow-free so worker processes start fast.
"""
