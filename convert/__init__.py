"""neoxq.convert: checkpoint → GGUF (reading, GPT-NeoX mapping, writing), the importance matrix and
the transformers fp32 reference. Needs the `neoxq[convert]` extra for torch-backed parts; never
imports neoxq.runtime. torch is imported only where a function needs it."""
