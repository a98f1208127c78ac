"""`neoxq publish`: a report folder to a hub repository, with a model card that carries the report.

What is uploaded (one commit per branch): the report's GGUF files (llama.cpp's naming, as the report
built them), the importance matrix, report.json, report.png and report-kld-cdf.png, a README.md
model card, and with --ollama a Modelfile per GGUF. Every file is checked against report.json's
sha256 first, so what is published is what was scored. A sweep folder (sweep.json) publishes as
one repository with a branch per revision, as Pythia itself is laid out; its main branch gets the
sweep's card.

Everything up to the upload is built and tested here (`--dry-run DIR` writes exactly the folder
that would be uploaded); the upload itself is huggingface_hub's `create_commit` (large files go
through its own LFS/xet upload), with the token from `hf auth login` or HF_TOKEN.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import gguf as gg

from neoxq.core.errors import UsageError
from neoxq.core.gguf_info import read_info
from neoxq.core.imatrix_io import file_sha256
from neoxq.core.report_row import rows_of
from neoxq.render import results_table, se_note, sweep_markdown

TAGS = ["gguf", "gpt-neox", "pythia", "quantized"]
PLOTS = ("report.png", "report-kld-cdf.png")


@dataclass
class PublishOptions:
    repo_id: str
    private: bool = False
    revision: str | None = None  # the branch (default main; a sweep uses one per revision)
    dry_run: Path | None = None  # write the folder(s) here instead of uploading
    ollama: bool = False
    force: bool = False  # publish into a repository that exists already


Contents = dict[str, "Path | str"]  # path in the repo → a file to upload, or text


def publish(folder: Path | str, opts: PublishOptions, api=None) -> dict[str, Contents]:
    """Check the folder, build what each branch gets, then write it (--dry-run) or upload it."""
    folder = Path(folder)
    _check_repo_id(opts.repo_id)
    branches = _sweep_branches(folder, opts) if (folder / "sweep.json").is_file() else {opts.revision or "main": report_contents(folder, opts)}
    if opts.dry_run is not None:
        write_folders(branches, Path(opts.dry_run), opts.force)
    else:
        upload(branches, opts, api)
    return branches


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("no namespace")
    except HFValidationError:
        raise UsageError(f"{repo_id!r} is not a hub repository id; write it as OWNER/NAME") from None


def load_report(folder: Path) -> dict:
    """report.json, and every file it names present with the sha256 it records."""
    rj = folder / "report.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass the folder `neoxq report` wrote")
    if not rj.is_file():
        raise UsageError(f"{folder} has no report.json; pass the folder `neoxq report` wrote")
    unreadable = UsageError(f"{rj} is not a neoxq report (unreadable JSON or no results); rerun `neoxq report`")
    try:
        report = json.loads(rj.read_text())
        rows = own_rows(report)
    except (ValueError, TypeError, AttributeError):
        raise unreadable from None
    if not rows or any(r.file is None for r in rows):
        raise unreadable
    for name, sha in [(r.file, r.sha256) for r in rows] + _imatrix_entry(report):
        path = folder / name
        if not path.is_file():
            raise UsageError(f"{path} is missing; report.json names it: rerun `neoxq report` into {folder}")
        if sha is None:
            raise UsageError(
                f"report.json records no sha256 for {name} (made by an older neoxq); rerun `neoxq report` with the same "
                "arguments (it reuses what it built and scored)"
            )
        if file_sha256(path) != sha:
            raise UsageError(f"{path} is not the file that was scored (its sha256 differs from report.json's); rerun `neoxq report`")
    missing = [p for p in PLOTS[:1] if not (folder / p).is_file()]
    if missing:
        raise UsageError(f"{folder / missing[0]} is missing; install matplotlib and rerun `neoxq report` to draw it")
    return report


def own_rows(report: dict) -> list:
    """The rows of the files the report made: files given with --add (made elsewhere) are
    compared in the report but never published."""
    return [r for r in rows_of(report) if not r.added]


def _imatrix_entry(report: dict) -> list[tuple[str, str | None]]:
    im = report.get("imatrix") or {}
    return [(im["file"], im.get("sha256"))] if im.get("file") else []


def report_contents(folder: Path, opts: PublishOptions, branch_note: str = "") -> Contents:
    report = load_report(folder)
    files = [folder / r.file for r in own_rows(report)]
    out: Contents = {p.name: p for p in files}
    out |= {name: folder / name for name, _ in _imatrix_entry(report)}
    out |= {p: folder / p for p in PLOTS if (folder / p).is_file()}
    out["report.json"] = folder / "report.json"
    if opts.ollama:
        out |= {f"{p.stem}.Modelfile": modelfile(p) for p in files}
    out["README.md"] = model_card(report, folder, opts, branch_note)
    return out


def _sweep_branches(folder: Path, opts: PublishOptions) -> dict[str, Contents]:
    """One branch per revision of the sweep (its report folder), and main with the sweep's card."""
    if opts.revision:
        raise UsageError("a sweep publishes one branch per revision; leave --revision out")
    sweep = json.loads((folder / "sweep.json").read_text())
    branches = {}
    for rev in sweep["revisions"]:
        if rev.get("duplicate_of"):
            continue  # its weights are an earlier revision's: that branch holds the files
        sub = folder / rev["revision"]
        if not any(sub.glob("*.gguf")):
            raise UsageError(f"{sub} holds no GGUF files: the sweep deletes them unless asked; rerun `neoxq sweep` with --keep-files")
        branches[rev["revision"]] = report_contents(sub, opts, f"Branch `{rev['revision']}` of a sweep over training; `main` compares them all.")
    main: Contents = {"sweep.json": folder / "sweep.json"}
    main |= {p: folder / p for p in ("sweep.png",) if (folder / p).is_file()}
    main["README.md"] = sweep_card(sweep, folder, list(branches))
    branches["main"] = main
    return branches


# The card --------------------------------------------------------------------------------------


def _card_data(meta: dict, report_source: dict):
    from huggingface_hub import ModelCardData

    repo = report_source.get("repo") or meta.get("neoxq.source.repo")
    data = ModelCardData(
        license=meta.get("general.license"),
        library_name="gguf",
        tags=list(TAGS),
        base_model=repo,
        base_model_relation="quantized" if repo else None,
        quantized_by="neoxq",
    )
    if repo and report_source.get("revision"):
        data.base_model_revision = report_source["revision"]
    return data


def model_card(report: dict, folder: Path, opts: PublishOptions, branch_note: str = "") -> str:
    """README.md: YAML metadata huggingface_hub parses, the scored table, how each file was made,
    what was scored, and how to run the files."""
    first = read_info(folder / own_rows(report)[0].file)
    src, text = report["source"], report["text"]
    data = _card_data(first.metadata, src)
    name = src.get("repo") or src["name"]
    at = f" at revision `{src['revision']}`" + (f" (commit `{src['commit']}`)" if src.get("commit") else "") if src.get("revision") else ""
    body = [
        f"# {name.split('/')[-1]} GGUF, with their quality report",
        "",
        (f"GGUF files of [{name}](https://huggingface.co/{name}){at}" if src.get("repo") else f"GGUF files of `{name}`{at}")
        + ", converted and quantized by [neoxq](https://pypi.org/project/neoxq/) with llama.cpp's own quantizer, each "
        "scored against the fp32 model on the same tokens.",
        "",
    ]
    if branch_note:
        body += [branch_note, ""]
    body += ["## What quantization costs", "", *results_table(report, leave_out=("pp_tps", "tg_tps")), "", se_note(report), ""]
    if (folder / "report.png").is_file():
        body += ["![size vs quality](report.png)", ""]
    body += [
        "## How each file was made",
        "",
        *_made_table(report, folder),
        "",
        f"llama.cpp as vendored by llama-cpp-python {report['versions'].get('llama-cpp-python', '?')}; "
        f"gguf {report['versions'].get('gguf', '?')}; neoxq {report['versions'].get('neoxq', '?')}.",
        "",
        "## What was scored",
        "",
        f"`{text['file']}` (sha256 `{text['sha256']}`): {text['tokens_scored']} tokens scored in windows of {text['ctx']} "
        f"(the second half of each, as llama-perplexity), against {report['reference']['kind']} "
        f"(perplexity {report['reference']['ppl']:.3f} ± {report['reference']['ppl_se']:.3f})."
        + (f" Calibration text: {text['calibration']}." if text.get("calibration") else ""),
        "",
        "## Use",
        "",
        *_usage(report, opts),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def _made_table(report: dict, folder: Path) -> list[str]:
    lines = ["| file | type | importance matrix | per-tensor types | rounding | calibration sha256 |", "|---|---|---|---|---|---|"]
    for r in own_rows(report):
        m = read_info(folder / r.file).metadata
        im = m.get("neoxq.imatrix.sha256")
        calib = m.get("neoxq.optimize.calibration.sha256") or m.get("neoxq.mix.calib_sha256")
        lines.append(
            f"| {r.file} | {r.type} | {('sha256 `' + im[:16] + '…`') if im else '-'} | "
            f"{'sensitivity mix (≤ stock ' + m['neoxq.mix.base'] + ' size)' if m.get('neoxq.mix.base') else 'llama.cpp stock'} | "
            f"{m.get('neoxq.optimize.method') or ('-' if r.type in ('F32', 'F16', 'BF16') else 'llama.cpp')} | "
            f"{('`' + calib[:16] + '…`') if calib else '-'} |"
        )
    return lines


def _usage(report: dict, opts: PublishOptions) -> list[str]:
    rows = own_rows(report)
    row = next((r for r in rows if r.type == "Q4_K_M"), rows[-1])
    file, base = row.file, Path(row.file).stem
    out = [
        "llama.cpp:",
        "",
        "```sh",
        f'llama-cli -m {file} -p "The capital of France is" -n 64 -no-cnv',
        f"llama-perplexity -m {file} -f wiki.test.raw",
        "```",
        "",
        "llama-cpp-python:",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama.from_pretrained(repo_id="{opts.repo_id}", filename="{file}")',
        'print(llm("The capital of France is", max_tokens=64)["choices"][0]["text"])',
        "```",
        "",
        "Ollama:",
        "",
        "```sh",
    ]
    if opts.ollama:
        out += [
            f"ollama create {base.lower()} -f {base}.Modelfile   # in a folder with {file} and its Modelfile",
            f'ollama run {base.lower()} "The capital of France is"',
        ]
    else:
        out += [f"ollama run hf.co/{opts.repo_id}:{row.type}"]
    out += [
        "```",
        "",
        "neoxq (measure it yourself):",
        "",
        "```sh",
        f'neoxq run {file} -p "The capital of France is"',
        f"neoxq kld {file} --reference {report['source'].get('repo') or 'CHECKPOINT'} --text wiki.test.raw",
        "```",
    ]
    return out


def sweep_card(sweep: dict, folder: Path, branches: list[str]) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="gguf", tags=list(TAGS), base_model=sweep["repo"], base_model_relation="quantized", quantized_by="neoxq")
    body = sweep_markdown(sweep).splitlines()
    body[1:1] = [
        "",
        "One branch per training step, as the source is laid out: "
        + ", ".join(f"`{b}`" for b in branches)
        + ". Each branch holds that step's GGUF files and its own quality card.",
    ]
    if (folder / "sweep.png").is_file():
        body += ["", "![across training](sweep.png)"]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"


def modelfile(gguf: Path) -> str:
    """An Ollama Modelfile for one GGUF beside it: its context length and end-of-text token, and a
    plain completion template (a base model: no chat turns)."""
    info = read_info(gguf)
    eos = _token_text(gguf, info.metadata.get("tokenizer.ggml.eos_token_id"))
    lines = [f"FROM ./{gguf.name}", f"PARAMETER num_ctx {info.context_length or 2048}"]
    if eos:
        lines.append(f"PARAMETER stop {json.dumps(eos)}")
    lines += ['TEMPLATE """{{ .Prompt }}"""', ""]
    return "\n".join(lines)


def _token_text(gguf: Path, token_id) -> str | None:
    """One token's text from the file's vocabulary (gguf's reader: neoxq's own skips the tokenizer arrays)."""
    if token_id is None:
        return None

    field = gg.GGUFReader(str(gguf)).fields.get("tokenizer.ggml.tokens")
    if field is None or int(token_id) >= len(field.data):
        return None
    return bytes(field.parts[field.data[int(token_id)]]).decode("utf-8", errors="replace")


# Writing and uploading -------------------------------------------------------------------------


def write_folders(branches: dict[str, Contents], target: Path, force: bool) -> None:
    """--dry-run: exactly what would be uploaded; one branch in `target` itself, several in
    `target/<branch>/`. Written beside it and renamed into place."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"--dry-run {target} is not a folder; pass a folder to write into")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{target} exists and is not empty; pass another --dry-run folder or --force")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for branch, contents in branches.items():
            _write(contents, tmp / branch if len(branches) > 1 else tmp)
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(contents: Contents, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in contents.items():
        dest = folder / name
        if isinstance(src, str):
            dest.write_text(src, encoding="utf-8")
            continue
        try:
            os.link(src, dest)  # same bytes, no copy of a multi-GB file
        except OSError:
            shutil.copy2(src, dest)


def upload(branches: dict[str, Contents], opts: PublishOptions, api=None) -> None:
    """One commit per branch through huggingface_hub; a repository that exists is refused without --force."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if api is None:
        if not get_token():
            raise UsageError("no hub token: log in with `hf auth login` or set HF_TOKEN, or write the folder with --dry-run DIR")
        api = HfApi()
    if api.repo_exists(opts.repo_id) and not opts.force:
        raise UsageError(f"{opts.repo_id} exists on the hub; pass --force to publish into it (files of the same name are replaced)")
    api.create_repo(opts.repo_id, private=opts.private, exist_ok=True)
    for branch, contents in sorted(branches.items(), key=lambda kv: kv[0] != "main"):
        if branch != "main":
            api.create_branch(opts.repo_id, branch=branch, exist_ok=True)
        ops = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=src.encode("utf-8") if isinstance(src, str) else str(src))
            for name, src in contents.items()
        ]
        api.create_commit(opts.repo_id, operations=ops, revision=branch, commit_message=f"neoxq publish: {len(ops)} files")
