"""kerasunet: liver and liver-tumour segmentation in CT and MRI with a Keras 3 U-Net.

Pipeline: ``kerasunet.synth`` (phantoms) -> ``tfrecords_builder`` (NIfTI -> TFRecords)
-> ``kerasunet.data`` (tf.data reader) -> ``kerasunet.model`` / ``kerasunet.train``
-> ``kerasunet.predict`` / ``kerasunet.evaluate`` -> ``kerasunet.export`` (TF Serving).

Importing this package does not import TensorFlow; each stage imports what it needs.
"""

__version__ = "0.1.0"
