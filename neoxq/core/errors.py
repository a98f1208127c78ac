"""One exception type per kind of user mistake.

Each message is a single line that names the problem and the fix; the CLI prints it and exits 1
(the traceback only with --debug).
"""


class NeoxqError(Exception):
    """Base of every error the CLI turns into one line + exit code 1."""


class SourceError(NeoxqError):
    """The checkpoint cannot be found or lacks a required file (config, tokenizer, weights)."""


class UnsupportedModelError(NeoxqError):
    """The checkpoint or GGUF is not a GPT-NeoX model, or uses a feature neoxq does not convert."""


class CorruptFileError(NeoxqError):
    """A weights, GGUF or imatrix file is truncated, corrupt, or inconsistent with its index."""


class UnsafeCheckpointError(NeoxqError):
    """A pickle checkpoint that would run code when loaded."""


class OutputError(NeoxqError):
    """The output cannot be written: exists without --force, folder unwritable, disk full."""


class UsageError(NeoxqError):
    """A bad option value: unknown quant type, text too short, context too long, ..."""


class LlamaError(NeoxqError):
    """llama.cpp refused or failed at run time (a decode error, a context it cannot allocate)."""


class MissingExtraError(NeoxqError):
    """A command needs the optional heavy dependencies (torch, transformers)."""


def require_convert_extra(exc: ImportError) -> MissingExtraError:
    """The message for a runtime-only install that reached a torch-needing command."""
    return MissingExtraError(
        f"this command needs the converter's dependencies ({exc.name or exc} is missing); install them with: pip install 'neoxq[convert]'"
    )
