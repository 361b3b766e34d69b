"""compress: fine-tune, distil, prune, quantize and export an LLM, measuring every step."""

__version__ = "0.1.0"
