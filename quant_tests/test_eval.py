"""neoxq's lm-eval backend against lm-eval's own `hf` backend on the same checkpoint:
local task files (a multiple-choice task and a rolling-perplexity task, YAML + jsonl written by the
test from held-out text), offline."""

from __future__ import annotations

import json
import random

import pytest

from .helpers import assert_one_line_error, run_cli

pytest.importorskip("lm_eval")

MC_YAML = """task: neoxq_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""

PPL_YAML = """task: neoxq_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def tasks_dir(texts, tmp_path_factory):
    """Multiple choice: continue a held-out docstring with its real next words or three spans from
    elsewhere; rolling: held-out paragraphs, some longer than the 512-token context."""
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    paras = [p for p in texts["eval"].split("\n\n") if len(p.split()) > 20]
    words = texts["eval"].split()
    items = []
    for i, p in enumerate(paras[:40]):
        w = p.split()
        choices = [" " + " ".join(w[12:16])] + [" " + " ".join(words[j : j + 4]) for j in rng.sample(range(len(words) - 4), 3)]
        order = rng.sample(range(4), 4)
        items.append({"context": " ".join(w[:12]), "choices": [choices[k] for k in order], "label": order.index(0)})
    (d / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    docs = [{"text": "\n\n".join(paras[i : i + 3])} for i in range(0, 24, 3)] + [{"text": texts["eval"][:9000]}]
    (d / "ppl.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    (d / "neoxq_mc.yaml").write_text(MC_YAML.format(data=d / "mc.jsonl"))
    (d / "neoxq_ppl.yaml").write_text(PPL_YAML.format(data=d / "ppl.jsonl"))
    return d


@pytest.fixture(scope="module")
def hf_results(trained, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    r = simple_evaluate(
        model="hf",
        model_args=f"pretrained={trained},dtype=float32,device=cpu",
        tasks=["neoxq_mc", "neoxq_ppl"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        batch_size=1,
        bootstrap_iters=0,
    )
    return r["results"]


def test_equal_to_lm_eval_hf_backend(trained_f32, tasks_dir, hf_results, tmp_path):
    proc = run_cli("eval", trained_f32, "--tasks", "neoxq_mc,neoxq_ppl", "--include-path", tasks_dir, "-o", tmp_path / "r.json", timeout=900)
    assert proc.returncode == 0, proc.stderr
    ours = json.loads((tmp_path / "r.json").read_text())["models"][str(trained_f32)]["results"]
    print("neoxq:", {t: {k: v for k, v in m.items() if "stderr" not in k} for t, m in ours.items()})
    print("hf:   ", {t: {k: v for k, v in m.items() if "stderr" not in k} for t, m in hf_results.items()})
    assert ours["neoxq_mc"]["acc,none"] == hf_results["neoxq_mc"]["acc,none"]
    assert 0.25 < ours["neoxq_mc"]["acc,none"]  # above chance: the comparison is not vacuous
    for m in ("word_perplexity,none", "byte_perplexity,none"):
        rel = abs(ours["neoxq_ppl"][m] - hf_results["neoxq_ppl"][m]) / hf_results["neoxq_ppl"][m]
        assert rel < 1e-3, (m, ours["neoxq_ppl"][m], hf_results["neoxq_ppl"][m])
    assert "neoxq_mc:acc" in proc.stdout


def test_quantized_files_table(trained_f16, tasks_dir, tmp_path):
    from neoxq.runtime.quantize import quantize

    q = quantize(trained_f16, "Q2_K", output=tmp_path / "q2.gguf")
    proc = run_cli("eval", trained_f16, q.path, "--tasks", "neoxq_ppl", "--include-path", tasks_dir, "--limit", "3", timeout=900)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("file") and "F16" in lines[1] and "Q2_K" in lines[2]


def test_lm_eval_cli_knows_the_model(trained_f16, tasks_dir, tmp_path):
    """`python -m neoxq.lmeval` is lm-eval's own CLI with the `neoxq` class registered."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "neoxq.lmeval",
            "run",
            "--model",
            "neoxq",
            "--model_args",
            f"model={trained_f16}",
            "--tasks",
            "neoxq_mc",
            "--include_path",
            str(tasks_dir),
            "--limit",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "neoxq_mc" in proc.stdout and "acc" in proc.stdout


def test_eval_bad_input(trained_f16, tasks_dir):
    assert_one_line_error(run_cli("eval", trained_f16, "--tasks", "neoxq_mcq", "--include-path", tasks_dir), "neoxq_mc")
    assert_one_line_error(
        run_cli("eval", trained_f16, "--tasks", "arc_easy", env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, timeout=600), "network"
    )


def test_report_tasks_in_json_and_markdown(trained, tasks_dir, texts, tmp_path):
    (tmp_path / "t.txt").write_text(texts["eval"][:20000])
    proc = run_cli(
        "report",
        trained,
        "--text",
        tmp_path / "t.txt",
        "--ctx",
        "128",
        "--types",
        "Q8_0,Q2_K",
        "--imatrix",
        "none",
        "--tasks",
        "neoxq_mc",
        "--include-path",
        tasks_dir,
        "-o",
        tmp_path / "r",
        "--quiet",
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    accs = {r["type"]: r["tasks"]["neoxq_mc"]["acc"] for r in data["results"]}
    assert set(accs) == {"Q8_0", "Q2_K"} and all(0 <= a <= 1 for a in accs.values())
    assert "neoxq_mc: acc" in (tmp_path / "r" / "report.md").read_text()
    from neoxq.convert.hub import RevisionId
    from neoxq.sweep import _entry

    entry = _entry(RevisionId("step1", "c" * 40, "s" * 64), 1, None, data)  # the sweep carries them on
    assert entry["results"][0]["tasks"]["neoxq_mc"]["acc"] == accs["Q8_0"]


def test_generate_until_equals_hf_backend(trained, trained_f32, texts):
    """Greedy generation with stop strings: the same text as lm-eval's hf backend."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from neoxq.lmeval import NeoxqLM

    prompts = [texts["eval"][i : i + 300] for i in (0, 2000, 5000)]
    reqs = [
        Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["\n\n"], "max_gen_toks": 24}), idx=i) for i, p in enumerate(prompts)
    ]
    ours = NeoxqLM(str(trained_f32)).generate_until(reqs)
    theirs = HFLM(pretrained=str(trained), dtype="float32", device="cpu", batch_size=1).generate_until(reqs)
    print(ours, theirs)
    assert ours == theirs and any(o.strip() for o in ours)


def test_importing_the_plugin_keeps_lm_evals_own_models():
    """lm-eval registers its own models only into an empty registry; importing neoxq's class first
    must not hide them (`hf` stays available in the same process)."""
    import subprocess
    import sys

    code = "import neoxq.lmeval\nfrom lm_eval.api.registry import get_model\nprint(get_model('hf').__name__, get_model('neoxq').__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["HFLM", "NeoxqLM"], proc.stderr[-2000:]


def test_batched_choices_score_as_each_alone(trained_f16, tasks_dir):
    """The choices after one context scored in one batch (the default) against each request scored
    alone: the same greedy verdicts and the same chosen answer per question, log-likelihoods equal
    to llama.cpp's rounding (its sums depend on how many tokens a batch holds). The contexts were
    really shared (fewer batches than requests), and a wrong continuation scores differently
    (negative control: the comparison is not of two constants)."""
    import numpy as np

    from neoxq.lmeval import NeoxqLM

    docs = [json.loads(line) for line in (tasks_dir / "mc.jsonl").read_text().splitlines()]
    together, alone = NeoxqLM(str(trained_f16), ctx=512), NeoxqLM(str(trained_f16), ctx=512, batched=False)
    enc = together.tok_encode
    requests = [(None, enc(d["context"]), enc(c)) for d in docs for c in d["choices"]]
    calls = []
    decode_shared = together.model.decoder.decode_shared
    together.model.decoder.decode_shared = lambda *a: calls.append(1) or decode_shared(*a)
    a, b = together._loglikelihood_tokens(requests), alone._loglikelihood_tokens(requests)
    assert len(calls) == len({d["context"] for d in docs}) < len(requests)
    x, y = np.array([v for v, _ in a]), np.array([v for v, _ in b])
    assert [g for _, g in a] == [g for _, g in b]
    assert (x.reshape(len(docs), 4).argmax(1) == y.reshape(len(docs), 4).argmax(1)).all()
    np.testing.assert_allclose(x, y, atol=0.05, rtol=1e-3)
    wrong = together._loglikelihood_tokens([(None, r[1], r[2][::-1]) for r in requests[:8] if len(r[2]) > 1])
    assert all(abs(w[0] - v) > 1e-3 for w, v in zip(wrong, [v for r, v in zip(requests[:8], x) if len(r[2]) > 1]))
    together.close()
    alone.close()
