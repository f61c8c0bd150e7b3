"""tokengate: an OpenAI-compatible serving gateway over vLLM."""

__version__ = "0.1.0"
