"""Central trainer: ingestion, validation, training, ONNX export and the model registry.

Kept import-light: the edge agent imports ``trainer.registry`` without pulling in scikit-learn.
"""
__version__ = "0.1.0"
