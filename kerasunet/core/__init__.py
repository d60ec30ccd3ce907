"""The TensorFlow-free pieces that both the record builder and the model side import.

``nifti`` (volume I/O and canonical orientation), ``dicom`` (DICOM series read through
SimpleITK into the same canonical volumes), ``cases`` (dataset layouts, case discovery and
the one case loader with its checks), ``labels`` (structures, label values <-> output
channels), ``preprocessing`` (the one normalisation formula), ``stacking`` (2.5D context
stacks), ``records_format`` (manifest and shard file names, checksums), ``runs`` (what a run
folder holds) and ``atomic`` (write to a temporary name, then rename). Nothing here imports
TensorFlow, so builder worker processes and TF Serving clients start fast.
"""
