"""Run and score GGUF files with llama-cpp-python. Imports no torch or transformers."""
