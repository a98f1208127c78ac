"""neoxq.runtime: llama.cpp through llama-cpp-python (load, quantize, generate, score, serve).
Base install only: imports no torch or transformers, and never neoxq.convert.

llama.cpp's libraries are loaded here, before anything of ours imports numpy: CUDA builds of
llama-cpp-python were seen to segfault inside libggml-cuda while loading a model when numpy (with
its own OpenBLAS/OpenMP runtime) had been loaded first (llama-cpp-python's tracker reports the same
with pandas). Loading llama.cpp first avoids it. `neoxq.cli` does the same before any command runs.

llama.cpp's CPU backend runs its threads under OpenMP, whose idle workers spin after each graph
(libgomp's default: 300,000 spins, milliseconds) and so take a core from the log-sum-exp that
follows every decode in perplexity/KLD scoring; a tenth of that spin count costs the decode nothing
(docs/benchmarks.md, "Speed"). It must be set before libgomp loads,
so importing this package does not set it (an import changes nothing outside it): the CLI calls
neoxq.core.machine.init_process() first, and a library user can call it before importing this.
"""

import llama_cpp  # noqa: F401  (first, see above)
