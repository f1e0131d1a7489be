"""OpenAI-compatible reverse proxy in front of SAI prompt templates."""

__all__ = ["__version__"]

__version__ = "0.1.0"
