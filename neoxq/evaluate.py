"""`neoxq eval`: lm-evaluation-harness tasks on GGUF files through neoxq's lm-eval class (no
server). Results are lm-eval's own JSON, one entry per file; several files get a table."""

from __future__ import annotations

import difflib
import functools
import json
import sys
from pathlib import Path

from neoxq.core.atomic import atomic_output
from neoxq.core.errors import MissingExtraError, UsageError
from neoxq.core.gguf_info import read_info


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"evaluation needs lm-eval ({exc.name} is missing); install it with: pip install 'neoxq[eval]'") from exc


def task_manager(include_path: Path | str | None, tasks: list[str] | None = None):
    """lm-eval's TaskManager, one per include path and process: building one indexes every task
    YAML lm-eval ships (seconds), and a report asks for it once per file it scores. When every one
    of `tasks` is in the include path, lm-eval's own tasks are not indexed at all."""
    _lm_eval()
    if include_path and tasks:
        own = _cached_manager(str(include_path), False)
        if set(tasks) <= set(own.all_tasks):
            return own
    return _cached_manager(str(include_path) if include_path else None, True)


@functools.lru_cache(maxsize=4)
def _cached_manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def parse_tasks(spec: str) -> list[str]:
    """`a, b,c` → ["a", "b", "c"]; no name at all is one line, not lm-eval's ValueError."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise UsageError(f"--tasks {spec!r} names no task; pass comma-separated names such as lambada_openai,piqa")
    return tasks


def check_tasks(tasks: list[str], manager) -> None:
    known = set(manager.all_tasks)
    for t in tasks:
        if t not in known:
            near = difflib.get_close_matches(t, known, n=3, cutoff=0.5)
            raise UsageError(
                f"unknown task {t!r}"
                + (f"; close names: {', '.join(near)}" if near else "")
                + "; list them with `lm_eval ls tasks`, or pass --include-path DIR for your own YAML tasks"
            )


def evaluate_file(
    path: Path | str,
    tasks: list[str],
    manager,
    num_fewshot: int | None = None,
    limit: int | None = None,
    ctx: int | None = None,
    batched: bool = True,
) -> dict:
    """lm-eval's `simple_evaluate` on one GGUF; network failures while offline become one line.
    `batched`: score the requests that share a context in one batch (neoxq.lmeval)."""
    from lm_eval import simple_evaluate

    from neoxq.lmeval import NeoxqLM  # lm-eval's model class: imports lm-eval itself

    lm = NeoxqLM(str(path), ctx=ctx, batched=batched)
    try:
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            torch_random_seed=None,  # neoxq's model class never uses torch: importing it to seed it costs seconds
        )
    except Exception as exc:
        cause = network_failure(exc)
        if cause is None:
            raise
        text = f"{type(cause).__name__}: {cause}".splitlines()[0][:160]
        raise UsageError(
            f"a task's data needs the network, which cannot be reached ({text}); "
            "run once online to fill the datasets cache, or use local task files with --include-path"
        ) from exc
    finally:
        lm.close()


def network_failure(exc: BaseException) -> BaseException | None:
    """The first exception in `exc`'s chain that says the network could not be reached: datasets and
    huggingface_hub raise ConnectionError (offline mode too), requests and httpx their own."""
    kinds: tuple[type, ...] = (ConnectionError, TimeoutError)
    for module, name in (("requests", "ConnectionError"), ("httpx", "TransportError")):
        kind = getattr(sys.modules.get(module), name, None)  # not imported: none of its errors can be here
        if isinstance(kind, type):
            kinds += (kind,)
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kinds):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def metrics(results: dict) -> dict[str, dict[str, float]]:
    """task → metric → value (stderr columns and aliases left out)."""
    out = {}
    for task, values in results.get("results", {}).items():
        out[task] = {k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and "stderr" not in k and k != "alias"}
    return out


def run_eval(
    models: list[Path],
    tasks: list[str],
    include_path=None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    output: Path | None = None,
    batched: bool = True,
) -> dict:
    manager = task_manager(include_path, tasks)
    check_tasks(tasks, manager)
    labels = {str(m): read_info(m).metadata.get("neoxq.quant_type") or Path(m).stem for m in models}
    combined = {"models": {}}
    for m in models:
        r = evaluate_file(m, tasks, manager, num_fewshot, limit, batched=batched)
        combined["models"][str(m)] = {
            "type": labels[str(m)],
            "results": r["results"],
            "configs": r.get("configs"),
            "n-samples": r.get("n-samples"),
            "versions": r.get("versions"),
        }
    if output:
        with atomic_output(Path(output), force=True) as tmp:
            tmp.write_text(json.dumps(combined, indent=1, default=str))
    return combined
