"""Checkpoint → GGUF: reading, GPT-NeoX mapping, writing, quantization.

Nothing here imports torch at import time: `convert.quantize` must work on a runtime-only install.
"""
