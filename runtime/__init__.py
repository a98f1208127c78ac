"""neoxq.runtime: llama.cpp through llama-cpp-python (load, quantize, generate, score, serve).
Base install only: imports no torch or transformers, and never neoxq.convert."""
