"""OpenAI-compatible reverse proxy in front of SAI prompt templates."""

__version__ = "0.1.0"
