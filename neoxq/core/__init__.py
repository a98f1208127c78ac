"""neoxq's base layer: errors, quant types, atomic output, text files, progress, GGUF metadata,
imatrix files, machine facts. It imports nothing above it (no neoxq.convert, neoxq.runtime, CLI)
and no torch/transformers, so every other layer can build on it."""
