"""neoxq.runtime: llama.cpp through llama-cpp-python (load, quantize, generate, score, serve).
Base install only: imports no torch or transformers, and never neoxq.convert.

llama.cpp's libraries are loaded here, before anything of ours imports numpy: CUDA builds of
llama-cpp-python were seen to segfault inside libggml-cuda while loading a model when numpy (with
its own OpenBLAS/OpenMP runtime) had been loaded first (llama-cpp-python issue 1581 reports the same
with pandas). Which shared library clashes is still to be confirmed on a GPU machine; loading
llama.cpp first is what avoided it. `neoxq.cli` does the same before any command runs.

llama.cpp's CPU backend runs its threads under OpenMP, whose idle workers spin after each graph
(libgomp's default: 300,000 spins, milliseconds) and so take a core from the log-sum-exp that
follows every decode in perplexity/KLD scoring: measured 4.5 against 3.2 ms per 512-token window
at a 50k vocabulary, with no change in decode speed at 30,000. It must be set before libgomp loads,
so importing this package does not set it (an import changes nothing outside it): the CLI calls
neoxq.core.machine.init_process() first, and a library user can call it before importing this.
"""

import llama_cpp  # noqa: F401  (first, see above)
