"""neoxq: GPT-NeoX checkpoints to GGUF, run on llama.cpp, with quantization quality reports."""

__version__ = "0.1.0"
