"""vidmaas: a model-as-a-service control plane for AI video generation."""

__version__ = "0.1.0"
