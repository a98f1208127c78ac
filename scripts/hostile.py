"""Hostile input over every command and the server: each case is a mistake a user can
make (or an ordinary request that must keep working) and is judged on what it leaves behind.

    python scripts/hostile.py [--only PREFIX] [--json OUT] [--limit N]

A mistake is clean when it exits 1 with one line `error: …` that is not a raw library exception
(`error: ValueError: …`), with no traceback and no file left behind (outputs, `.partial`, `.lock`);
an ordinary case is clean when it exits 0. The server's mistakes must be a 4xx with a JSON error,
never a 500; its ordinary requests a 200. The table prints rc, the first line, traceback, debris,
accepted nonsense; the last line counts the clean cases. Everything runs offline on a tiny random
checkpoint this script builds (a few seconds); the whole run takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RAW = re.compile(r"^error: [A-Z][A-Za-z]*(Error|Exception|Interrupt|NotFound)\b")


@dataclass
class Case:
    name: str
    argv: list[str]
    ok: bool = False  # an ordinary use that must succeed
    env: dict = field(default_factory=dict)
    stdin: str | None = None


@dataclass
class Result:
    name: str
    rc: int
    first: str
    traceback: bool
    debris: list[str]
    nonsense: bool
    clean: bool


def build_fixtures(d: Path) -> dict[str, str]:
    """A tiny random GPT-NeoX checkpoint, its F16 and Q8_0 files, an imatrix, texts and bad files."""
    from neoxq.convert.converter import convert
    from neoxq.convert.tiny import TinySpec, build_random, stdlib_text
    from neoxq.runtime.quantize import quantize

    corpus = stdlib_text(60_000)
    ck = build_random(d / "ckpt", TinySpec(config_style="hf4", use_parallel_residual=True, rotary_pct=0.25), corpus)
    twin = build_random(d / "twin", TinySpec(config_style="hf4", use_parallel_residual=True, rotary_pct=0.25, seed=7), corpus)
    f16 = convert(str(ck), "f16", output=d / "m-F16.gguf")
    twin_f16 = convert(str(twin), "f16", output=d / "twin-F16.gguf")
    q8 = quantize(f16, "Q8_0", output=d / "m-Q8_0.gguf").path
    q4 = quantize(f16, "Q4_0", output=d / "m-Q4_0.gguf").path
    text = d / "t.txt"
    text.write_text(corpus[:20_000])
    files = {"CK": ck, "TWIN": twin, "F16": f16, "TWINF16": twin_f16, "Q8": q8, "Q4": q4, "T": text}
    for name, content in {
        "EMPTY": b"",
        "WS": b"   \n\t\n",
        "NONUTF8": b"caf\xe9 \xff\xfe",
        "SHORT": b"hello world",
        "TXTGGUF": b"this is not a gguf",
    }.items():
        p = d / f"{name.lower()}.{'gguf' if name == 'TXTGGUF' else 'txt'}"
        p.write_bytes(content)
        files[name] = p
    trunc = d / "trunc.gguf"
    trunc.write_bytes(Path(f16).read_bytes()[:5000])
    files["TRUNC"] = trunc
    (d / "dir").mkdir()
    files["DIR"] = d / "dir"
    files["MISSING"] = d / "missing.gguf"
    fifo = d / "fifo"
    os.mkfifo(fifo)
    files["FIFO"] = fifo
    from neoxq.convert.imatrix import make_imatrix

    files["IM"] = make_imatrix(str(ck), text, d / "m.imatrix", ctx=64)
    files["TWINIM"] = make_imatrix(str(twin), text, d / "twin.imatrix", ctx=64)
    return {k: str(v) for k, v in files.items()}


BAD_MODELS = ("MISSING", "DIR", "EMPTY", "TXTGGUF", "TRUNC")
BAD_TEXTS = ("MISSING", "DIR", "NONUTF8")


def numeric(cmd: list[str], option: str, values: list[str]) -> list[Case]:
    return [Case(f"{cmd[0]} {option} {v}", [*cmd, option, v]) for v in values]


def cli_cases(f: dict[str, str], out: str) -> list[Case]:
    F, Q, T, CK = f["F16"], f["Q8"], f["T"], f["CK"]
    o = f"{out}/o.gguf"
    run = ["run", F, "-n", "2", "-p", "hi"]
    cases = [
        Case("types", ["types"], ok=True),
        Case("version", ["--version"], ok=True),
        Case("unknown command", ["frobnicate"]),
        Case("unknown option", ["info", F, "--frob"]),
    ]
    cases += [Case(f"info {b}", ["info", f[b]]) for b in BAD_MODELS] + [Case("info ok", ["info", F], ok=True)]
    cases += [Case(f"tokenize {b}", ["tokenize", f[b], "hi"]) for b in BAD_MODELS] + [Case("tokenize ok", ["tokenize", F, "hi"], ok=True)]
    # run
    cases += [Case(f"run {b}", ["run", f[b], "-p", "hi", "-n", "2"]) for b in BAD_MODELS]
    cases += numeric(run, "--temp", ["nan", "inf", "-1", "abc"]) + numeric(run, "--top-p", ["nan", "2", "-0.1"])
    cases += numeric(run, "--min-p", ["nan", "1.5"]) + numeric(run, "--repeat-penalty", ["nan", "-1", "inf"])
    cases += numeric(run, "--top-k", ["-1", "abc"]) + numeric(run, "-n", ["-1", "abc", "nan"]) + numeric(run, "--seed", ["-1", "x"])
    cases += numeric(run, "--threads", ["0", "1000", "abc"]) + numeric(run, "--ctx", ["0", "1", "100000", "nan"])
    cases += numeric(run, "--n-gpu-layers", ["-5", "x"]) + numeric(run, "--device", ["tpu"]) + numeric(run, "--flash-attn", ["maybe"])
    cases += [
        Case("run --stop ''", [*run, "--stop", ""]),
        Case("run -p and -f", [*run, "-f", T]),
        Case("run long prompt --ctx 16", ["run", F, "-f", T, "--ctx", "16", "-n", "2"]),
        Case("run --device cpu -ngl 3", [*run, "--device", "cpu", "-ngl", "3"]),
        Case("run -i and -p", [*run, "-i"]),
    ]
    cases += [Case(f"run -f {b}", ["run", F, "-f", f[b], "-n", "2"]) for b in BAD_TEXTS]
    cases += [
        Case("run -p ''", ["run", F, "-p", "", "-n", "2"], ok=True),
        Case("run -f EMPTY", ["run", F, "-f", f["EMPTY"], "-n", "2"], ok=True),
        Case("run -f WS", ["run", F, "-f", f["WS"], "-n", "2"], ok=True),
        Case("run -n 0", ["run", F, "-p", "hi", "-n", "0"], ok=True),
        Case("run stdin", ["run", F, "-n", "2"], ok=True, stdin="hello"),
        Case("run -i non-UTF-8 line", ["run", F, "-i", "-n", "2"], ok=True, stdin="caf\udce9\nhi\n"),
        Case("run ok", [*run, "--seed", "1"], ok=True),
    ]
    # perplexity
    ppl = ["perplexity", F, "--text", T, "--ctx", "64"]
    cases += [Case(f"perplexity {b}", ["perplexity", f[b], "--text", T, "--ctx", "64"]) for b in BAD_MODELS]
    cases += [Case(f"perplexity --text {b}", ["perplexity", F, "--text", f[b], "--ctx", "64"]) for b in (*BAD_TEXTS, "EMPTY", "WS", "SHORT")]
    cases += numeric(ppl, "--ctx", ["0", "3", "nan", "100000"]) + numeric(ppl, "--threads", ["0", "1000"])
    cases += [Case("perplexity ok", ppl, ok=True)]
    # kld / compare
    kld = ["kld", Q, "--text", T, "--ctx", "64"]
    for label, ref in (
        ("MISSING", f["MISSING"]),
        ("DIR", f["DIR"]),
        ("TXTGGUF", f["TXTGGUF"]),
        ("twin F16", f["TWINF16"]),
        ("twin checkpoint", f["TWIN"]),
        ("f16", "f16"),
        ("auto (no hub source)", "auto"),
        ("hub id offline", "nobody/nothing"),
    ):
        cases.append(Case(f"kld --reference {label}", [*kld, "--reference", ref], env={"HF_HUB_OFFLINE": "1"}))
    cases += [Case(f"kld --text {b}", ["kld", Q, "--reference", F, "--text", f[b], "--ctx", "64"]) for b in (*BAD_TEXTS, "SHORT")]
    cases += numeric([*kld, "--reference", F], "--ctx", ["2", "nan"]) + numeric([*kld, "--reference", F], "--max-memory", ["abc", "-1", "1KB"])
    cases += [Case("kld ok", [*kld, "--reference", F], ok=True), Case("kld checkpoint ok", [*kld, "--reference", CK], ok=True)]
    cases += [
        Case("compare no text", ["compare", Q, F, "--reference", F]),
        Case("compare no reference", ["compare", Q, F, "--text", T]),
        Case("compare MISSING", ["compare", f["MISSING"], Q, "--reference", F, "--text", T]),
        Case("compare ok", ["compare", Q, f["Q4"], "--reference", F, "--text", T, "--ctx", "64"], ok=True),
    ]
    # quantize
    qz = ["quantize", F, "--type", "Q4_0", "-o", o]
    cases += [Case(f"quantize --type {t}", ["quantize", F, "--type", t, "-o", o]) for t in ("Q3_K_XL", "F16", "", "IQ2_XXS")]
    cases += [Case(f"quantize {b}", ["quantize", f[b], "--type", "Q4_0", "-o", o]) for b in BAD_MODELS]
    cases += [
        Case("quantize a quantized file", ["quantize", Q, "--type", "Q4_0", "-o", o]),
        Case("quantize -o input", ["quantize", F, "--type", "Q4_0", "-o", F, "--force"]),
        Case("quantize -o FIFO", ["quantize", F, "--type", "Q4_0", "-o", f["FIFO"], "--force"]),
        Case("quantize -o missing folder", ["quantize", F, "--type", "Q4_0", "-o", f"{out}/no/such/o.gguf"]),
        Case("quantize -o existing", ["quantize", F, "--type", "Q4_0", "-o", Q]),
        Case("quantize --imatrix MISSING", [*qz, "--imatrix", f["MISSING"]]),
        Case("quantize --imatrix TXTGGUF", [*qz, "--imatrix", f["TXTGGUF"]]),
        Case("quantize --imatrix of the twin", [*qz, "--imatrix", f["TWINIM"]]),
        Case("quantize --mix without --calib", [*qz, "--mix"]),
        Case("quantize --calib without --mix", [*qz, "--calib", T]),
        Case("quantize --optimize without --calib", [*qz, "--optimize"]),
        Case("quantize --max-memory without --optimize", [*qz, "--max-memory", "8GB"]),
        Case("quantize --reference without --mix", [*qz, "--reference", str(CK)]),
        Case("quantize --target-size and --target-bpw", [*qz, "--mix", "--calib", T, "--target-size", "1MB", "--target-bpw", "4"]),
        Case("quantize --mix --calib MISSING", [*qz, "--mix", "--calib", f["MISSING"]]),
        Case("quantize --mix --calib EMPTY", [*qz, "--mix", "--calib", f["EMPTY"], "--imatrix", "none"]),
    ]
    mix = [*qz, "--mix", "--calib", T, "--imatrix", "none"]
    cases += numeric(mix, "--target-bpw", ["nan", "0", "100", "inf"]) + numeric(mix, "--target-size", ["5TB", "abc", "-1", "0"])
    cases += numeric(mix, "--ctx", ["0", "nan"])
    cases += [
        Case("quantize ok", ["quantize", F, "--type", "Q4_0", "-o", o], ok=True),
        Case("quantize -o folder ok", ["quantize", F, "--type", "Q4_0", "-o", out], ok=True),
        Case("quantize --imatrix ok", [*qz, "--imatrix", f["IM"]], ok=True),
    ]
    # convert / imatrix
    cases += [
        Case("convert MISSING", ["convert", f["MISSING"], "-o", o]),
        Case("convert DIR", ["convert", f["DIR"], "-o", o]),
        Case("convert a file", ["convert", T, "-o", o]),
        Case("convert --outtype q4_0", ["convert", CK, "--outtype", "q4_0", "-o", o]),
        Case("convert --quant XYZ", ["convert", CK, "--quant", "XYZ", "-o", out]),
        Case("convert -o weights", ["convert", CK, "-o", f"{CK}/model.safetensors", "--force"]),
        Case("convert -o FIFO", ["convert", CK, "-o", f["FIFO"], "--force"]),
        Case("convert -o existing", ["convert", CK, "-o", F]),
        Case("convert --revision on a folder", ["convert", CK, "--revision", "step1000", "-o", o]),
        Case("convert hub id offline", ["convert", "nobody/nothing", "-o", o], env={"HF_HUB_OFFLINE": "1"}),
        Case("convert ok", ["convert", CK, "-o", o], ok=True),
    ]
    im = ["imatrix", CK, "--text", T, "-o", f"{out}/i.imatrix"]
    cases += [Case(f"imatrix --text {b}", ["imatrix", CK, "--text", f[b], "-o", f"{out}/i.imatrix"]) for b in (*BAD_TEXTS, "EMPTY")]
    cases += numeric(im, "--ctx", ["0", "nan", "100000"])
    cases += [
        Case("imatrix MISSING", ["imatrix", f["MISSING"], "--text", T, "-o", f"{out}/i.imatrix"]),
        Case("imatrix -o existing", ["imatrix", CK, "--text", T, "-o", f["IM"]]),
        Case("imatrix -o text input", ["imatrix", CK, "--text", T, "-o", T, "--force"]),
        Case("imatrix ok", [*im, "--ctx", "64"], ok=True),
    ]
    # report / sweep / eval / serve
    rep = ["report", CK, "--text", T, "-o", f"{out}/rep", "--ctx", "64"]
    cases += [
        Case("report --types XYZ", [*rep, "--types", "XYZ"]),
        Case("report --imatrix sometimes", [*rep, "--imatrix", "sometimes"]),
        Case("report --text MISSING", ["report", CK, "--text", f["MISSING"], "-o", f"{out}/rep"]),
        Case("report --text SHORT", ["report", CK, "--text", f["SHORT"], "-o", f"{out}/rep"]),
        Case("report --tasks ','", [*rep, "--tasks", ","]),
        Case("report --tasks nosuchtask", [*rep, "--tasks", "nosuchtask"]),
        Case("report --max-memory abc", [*rep, "--max-memory", "abc"]),
        Case("report --reference garbage", [*rep, "--reference", "garbage"]),
        Case("report MISSING", ["report", f["MISSING"], "--text", T, "-o", f"{out}/rep"]),
    ]
    cases += numeric(rep, "--ctx", ["0", "nan"])
    off = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": f"{out}/no-cache"}
    sw = ["sweep", "EleutherAI/pythia-14m", "--text", T, "-o", f"{out}/sw"]
    cases += [Case("sweep offline without a cache", [*sw, "--revisions", "step0"], env=off)]
    cases += [Case(f"sweep --revisions {r}", [*sw, "--revisions", r], env=off) for r in ("step0..step10/0", "step0..step10/-2", "step9..step1", "")]
    cases += numeric([*sw, "--revisions", "step0"], "--workers", ["0", "x"]) + [
        Case("sweep --imatrix FILE", [*sw, "--revisions", "step0", "--imatrix", f["IM"]])
    ]
    cases += [
        Case("eval --tasks ','", ["eval", Q, "--tasks", ","]),
        Case("eval --tasks nosuchtask", ["eval", Q, "--tasks", "nosuchtask"]),
        Case("eval MISSING", ["eval", f["MISSING"], "--tasks", "lambada_openai"]),
        Case("eval --limit 0", ["eval", Q, "--tasks", "piqa", "--limit", "0"]),
    ]
    cache = {"NEOXQ_CACHE": f"{out}/cache"}
    cases += [
        Case("cache prune (nothing said)", ["cache", "prune"], env=cache),
        Case("cache prune --older-than soon", ["cache", "prune", "--older-than", "soon"], env=cache),
        Case("cache prune --max-size lots", ["cache", "prune", "--max-size", "lots"], env=cache),
        Case("cache frob", ["cache", "frob"], env=cache),
        Case("cache list ok", ["cache", "list"], ok=True, env=cache),
        Case("cache prune --all ok", ["cache", "prune", "--all"], ok=True, env=cache),
    ]
    pub = {"HF_TOKEN": "", "HF_HOME": f"{out}/hfhome"}
    cases += [
        Case("publish MISSING", ["publish", f["MISSING"], "me/x", "--dry-run", f"{out}/pub"], env=pub),
        Case("publish a folder without report.json", ["publish", f["DIR"], "me/x", "--dry-run", f"{out}/pub"], env=pub),
        Case("publish bad repo id", ["publish", f["DIR"], "not a repo", "--dry-run", f"{out}/pub"], env=pub),
        Case("publish without a token", ["publish", f["DIR"], "me/x"], env=pub),
    ]
    cases += [
        Case("serve MISSING", ["serve", f["MISSING"]]),
        Case("serve --port 0", ["serve", F, "--port", "0"]),
        Case("serve --port 70000", ["serve", F, "--port", "70000"]),
        Case("serve unresolvable --host", ["serve", F, "--host", "no.such.host.invalid", "--api-key", "k"]),
    ]
    return cases


def run_case(c: Case, work: Path, out: Path, timeout: int = 300) -> Result:
    before = _listing(work)
    env = {**os.environ, "NO_COLOR": "1", **c.env}
    try:
        p = subprocess.run(
            [sys.executable, "-m", "neoxq", *c.argv],
            capture_output=True,
            cwd=out,
            env=env,
            timeout=timeout,
            input=c.stdin.encode("utf-8", "surrogateescape") if c.stdin is not None else None,
        )
        rc, err = p.returncode, p.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        rc, err = -1, "timed out"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    after = _listing(work)
    debris = sorted(str(Path(x).relative_to(work)) for x in after - before if not c.ok or Path(x).name.startswith("."))
    first = next((ln for ln in lines if ln.startswith(("error:", "warning:"))), lines[0] if lines else "")
    tb = "Traceback" in err
    if c.ok:
        clean = rc == 0 and not tb
    else:
        clean = rc == 1 and len(lines) == 1 and lines[0].startswith("error: ") and not RAW.match(lines[0]) and not tb and not debris
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    return Result(c.name, rc, first[:110], tb, debris, not c.ok and rc == 0, clean)


def _listing(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


# The server ---------------------------------------------------------------------------------------

SERVER_BAD = [
    ("not JSON", b"{nope"),
    ("JSON nested 100000 deep", b"[" * 100000 + b"]" * 100000),
    ("a JSON array", b"[1, 2]"),
    ("a JSON string", b'"hi"'),
    ("surrogate in prompt", b'{"prompt": "\\ud800x"}'),
    ("surrogate in stop", b'{"prompt": "x", "stop": "\\udfff"}'),
    ("n=5", {"n": 5}),
    ("best_of=3", {"best_of": 3}),
    ("suffix", {"suffix": "end"}),
    ("stream 'yes'", {"stream": "yes"}),
    ("stream_options without stream", {"stream_options": {}}),
    ("stream_options unknown key", {"stream": True, "stream_options": {"chunks": 2}}),
    ("unknown key", {"foo": 1}),
    ("functions", {"functions": []}),
    ("temperature NaN", b'{"prompt": "x", "temperature": NaN}'),
    ("temperature -1", {"temperature": -1}),
    ("temperature text", {"temperature": "hot"}),
    ("temperature Infinity", b'{"prompt": "x", "temperature": Infinity}'),
    ("top_p 2", {"top_p": 2}),
    ("top_p NaN", b'{"prompt": "x", "top_p": NaN}'),
    ("top_k -1", {"top_k": -1}),
    ("min_p 3", {"min_p": 3}),
    ("max_tokens -1", {"max_tokens": -1}),
    ("max_tokens '5'", {"max_tokens": "5"}),
    ("max_tokens 2.5", {"max_tokens": 2.5}),
    ("logprobs 50", {"logprobs": 50}),
    ("logprobs -1", {"logprobs": -1}),
    ("logprobs true", {"logprobs": True}),
    ("echo 'yes'", {"echo": "yes"}),
    ("stop ''", {"stop": ""}),
    ("stop [1]", {"stop": [1]}),
    ("two prompts", {"prompt": ["a", "b"]}),
    ("prompt a number", {"prompt": 5}),
    ("prompt token ids", {"prompt": [1, 2, 3]}),
    ("seed -1", {"seed": -1}),
    ("seed 2**40", {"seed": 2**40}),
    ("frequency_penalty 5", {"frequency_penalty": 5}),
    ("presence_penalty NaN", b'{"prompt": "x", "presence_penalty": NaN}'),
    ("logit_bias unknown token", {"logit_bias": {"99999999": 1}}),
    ("logit_bias not a token", {"logit_bias": {"abc": 1}}),
    ("logit_bias 1000", {"logit_bias": {"5": 1000}}),
    ("prompt too long", {"prompt": "word " * 5000}),
]
SERVER_OK = [
    ("empty prompt", {"prompt": ""}),
    ("n=1 and user", {"n": 1, "user": "me"}),
    ("logit_bias", {"logit_bias": {"5": 10}}),
    ("echo logprobs max_tokens 0", {"echo": True, "logprobs": 2, "max_tokens": 0}),
    ("max_tokens huge", {"max_tokens": 10**9}),
    ("stop list", {"stop": ["\n", "."]}),
    ("penalties", {"frequency_penalty": 0.5, "presence_penalty": 0.5}),
    ("model name", {"model": "anything"}),
    ("seed", {"seed": 3}),
]


def server_cases(f16: str, work: Path) -> list[Result]:
    import httpx
    from benchlib import start_server

    proc, base = start_server(f16, ctx=256)
    port = int(base.rsplit(":", 1)[1])
    out = []
    try:
        for (name, body), ok in [(c, False) for c in SERVER_BAD] + [(c, True) for c in SERVER_OK]:
            if isinstance(body, dict):
                body = json.dumps({"prompt": "Hello", "max_tokens": 4, **body}).encode()
            r = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=120)
            try:
                msg = r.json()["error"]["message"] if r.status_code != 200 else "ok"
            except (ValueError, KeyError, TypeError):
                msg = r.text[:100]
            clean = r.status_code == 200 if ok else (400 <= r.status_code < 500 and msg != r.text[:100])
            out.append(Result(f"server {name}", r.status_code, msg[:110], False, [], not ok and r.status_code == 200, clean))
        s = socket.create_connection(("127.0.0.1", port))  # a client that leaves mid-request
        s.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"prompt": "x"')
        s.close()
        r = httpx.get(f"{base}/health", timeout=30)
        out.append(
            Result(
                "server half a request, then gone",
                r.status_code,
                "still serving" if r.status_code == 200 else r.text[:100],
                False,
                [],
                False,
                r.status_code == 200,
            )
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run only the cases whose name starts with this")
    ap.add_argument("--limit", type=int, help="at most this many command-line cases (a quick check)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="neoxq-hostile-") as tmp:
        work = Path(tmp)
        files = build_fixtures(work / "in")
        out = work / "out"
        out.mkdir()
        cases = [c for c in cli_cases(files, str(out)) if not args.only or c.name.startswith(args.only)][: args.limit]
        results = []
        for i, c in enumerate(cases, 1):
            results.append(run_case(c, work, out))
            print(f"\r{i}/{len(cases)} {c.name[:60]:<60}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if not args.only or "server".startswith(args.only) or args.only.startswith("server"):
            results += server_cases(files["F16"], work)
    print(f"{'case':<44} {'rc':>4}  {'tb':<3} {'debris':<6} {'nonsense':<8} first line")
    for r in results:
        mark = "" if r.clean else "  <-- NOT CLEAN"
        print(
            f"{r.name[:44]:<44} {r.rc:>4}  {'yes' if r.traceback else 'no':<3} {'yes' if r.debris else 'no':<6} "
            f"{'yes' if r.nonsense else 'no':<8} {r.first}{mark}"
        )
    n_clean = sum(r.clean for r in results)
    print(f"{n_clean} of {len(results)} cases clean")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0 if n_clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
