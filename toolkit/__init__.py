"""Train image classifiers from one YAML file with Accelerate; serve them with TorchServe."""

__version__ = "0.1.0"
