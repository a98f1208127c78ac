"""neoxq.runtime: llama.cpp through llama-cpp-python (load, quantize, generate, score, serve).
Base install only: imports no torch or transformers, and never neoxq.convert.

llama.cpp's libraries are loaded here, before anything of ours imports numpy: CUDA builds of
llama-cpp-python were seen to segfault inside libggml-cuda while loading a model when numpy (with
its own OpenBLAS/OpenMP runtime) had been loaded first (llama-cpp-python issue 1581 reports the same
with pandas). Which shared library clashes is still to be confirmed on a GPU machine; loading
llama.cpp first is what avoided it. `neoxq.cli` does the same before any command runs.
"""

import llama_cpp  # noqa: F401  (first, see above)
