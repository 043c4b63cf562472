"""mmgen: distributed pretraining of unified multimodal generative models."""
__version__ = "0.1.0"
