"""The task travels with the model: every exported folder holds task.json and predict.py (compress/runtime.py),
which reproduce the export stage's measured scoring with onnxruntime, tokenizers and numpy alone; `compress
predict` does the same from the CLI. Tiny random models exported to real ONNX, real files, real subprocesses."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import DATA, TINY, cli

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {"numpy", "onnxruntime", "tokenizers", "json", "sys", "argparse", "pathlib"}
FOLDERS = {"onnx": "onnx-fp32", "onnx-int8": "onnx-int8", "onnx-int4": "onnx-int4"}  # folder -> record variant
LABELS = [*TINY, "pipeline=export", "export=cpu4bit"]
GENERATIVE = ["teacher=tiny-random", "student=tiny-random", "data=squad", "eval=quick", "eval.max_new_tokens=8",
              "data.max_chars=300", "data.eval_size=16", "data.use_chat_template=false", "pipeline=export",
              "export.variants=[fp32]", "report.baselines=false"]
"""Without the chat template (the other encoding: with the tokenizer's special tokens), where the tiny model's
greedy answers vary from token to token (in the template, it repeats one byte)."""


def test_runtime_imports_only_numpy_onnxruntime_tokenizers_and_the_standard_library():
    tree = ast.parse((ROOT / "compress" / "runtime.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports: predict.py runs outside the package"
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "__import__", "import_module"):
            pytest.fail("no dynamic imports in the runtime")
    assert found <= ALLOWED, found - ALLOWED
    assert {"numpy", "onnxruntime", "tokenizers"} <= found


def test_data_and_runtime_cut_inputs_with_the_same_function():
    from compress import data, runtime

    assert data.truncate is runtime.truncate
    assert runtime.truncate("  a  b\n c " + "x" * 50, 10) == "a b c"


# --------------------------------------------------------------------------- helpers


def stage_run(tmp_path_factory, overrides: list[str], name: str) -> tuple[Path, object]:
    """Run the export pipeline; return its export stage folder and the eval split it measured."""
    from compress.data import load_splits

    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *overrides, f"run.root={root}", f"run.name={name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stage = root / name / "01_export"
    return stage, load_splits(OmegaConf.load(stage / "config.yaml").data)


def predict_py(folder: Path, items: list[dict], tmp: Path, python: str = sys.executable, *flags: str) -> list[dict]:
    """Run the folder's predict.py on `items` through files, as a user would; its output lines."""
    src, dst = tmp / "in.jsonl", tmp / "out.jsonl"
    src.write_text("".join(json.dumps(it) + "\n" for it in items))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([python, *flags, str(folder / "predict.py"), "--file", str(src), "--out", str(dst),
                           "--threads", "2"], capture_output=True, text=True, cwd=tmp, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in dst.read_text().splitlines()]


def record_of(stage: Path, folder: str) -> dict:
    return next(r for r in json.loads((stage / "metrics.json").read_text())["records"]
                if r["variant"] == FOLDERS[folder])


# --------------------------------------------------------------------------- a label task


@pytest.fixture(scope="module")
def labels_run(tmp_path_factory):
    return stage_run(tmp_path_factory, LABELS, "L")


def test_every_folder_carries_its_task(labels_run):
    stage, splits = labels_run
    for folder in FOLDERS:
        names = {p.name for p in (stage / folder).iterdir()}
        assert {"model.onnx", "tokenizer.json", "task.json", "predict.py", "README.md"} <= names, names
        assert (stage / folder / "predict.py").read_text() == (ROOT / "compress" / "runtime.py").read_text()
    task = json.loads((stage / "onnx" / "task.json").read_text())
    assert task["format"] == 1 and task["kind"] == "labels" and task["metric"] == "accuracy"
    assert task["model"] == "tiny-random"  # the student's name, which `compress serve` reports
    assert task["verbalizers"] == {"fresh": " positive", "rotten": " negative"}
    assert task["use_chat_template"] and task["prompt"]["add_special_tokens"] is False  # ChatML: spelled out
    assert task["prompt"]["prefix"].startswith("<|im_start|>user\nReview: ")
    assert task["prompt"]["suffix"].endswith("<|im_start|>assistant\nThe sentiment is")
    assert task["max_chars"] == 400 and task["generation"]["stop"] == ["\n"]


def test_the_teacher_baselines_carry_the_task_too(labels_run, tmp_path):
    stage, splits = labels_run
    folder = stage / "teacher-onnx-int8"
    task = json.loads((folder / "task.json").read_text())
    assert task["kind"] == "labels" and (folder / "predict.py").is_file() and "labels fresh" in (
        folder / "README.md").read_text()
    got = predict_py(folder, [{"text": e.text} for e in splits.eval], tmp_path)
    record = next(r for r in json.loads((stage / "metrics.json").read_text())["records"]
                  if r["role"] == "teacher" and r["variant"] == "onnx-int8")
    assert sum(g["label"] == e.label for g, e in zip(got, splits.eval)) / len(splits.eval) == record["accuracy"]


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_predict_py_reproduces_the_measured_accuracy(labels_run, folder, tmp_path):
    stage, splits = labels_run
    got = predict_py(stage / folder, [{"text": e.text} for e in splits.eval], tmp_path)
    labels = [g["label"] for g in got]
    assert labels == json.loads((stage / "predictions.json").read_text())[FOLDERS[folder]]
    accuracy = sum(p == e.label for p, e in zip(labels, splits.eval)) / len(splits.eval)
    assert accuracy == record_of(stage, folder)["accuracy"]
    assert all(set(g["scores"]) == {"fresh", "rotten"} and g["scores"][g["label"]] == max(g["scores"].values())
               for g in got)


def test_tokens_and_scores_equal_compress_evaluation(labels_run):
    """Token for token the requests of compress.evaluate.encode_requests, and its choice_logprobs' scores."""
    from compress import ort, runtime
    from compress.evaluate import build_prompt, choice_logprobs, encode_requests
    from teachers.loading import load_tokenizer

    stage, splits = labels_run
    cfg = OmegaConf.load(stage / "config.yaml")
    source = Path(json.loads((stage / "metrics.json").read_text())["source"])
    tok = load_tokenizer(source, OmegaConf.create({"trust_remote_code": False}), "student")
    texts = [e.text for e in splits.eval]
    expected = encode_requests(tok, [build_prompt(tok, t, cfg.data) for t in texts], [" positive", " negative"],
                               chat=True)
    p = runtime.Predictor.open(stage / "onnx", threads=2)
    got = p.requests([p.prompt(t) for t in texts], [[" positive", " negative"]] * len(texts))
    assert got == expected
    reference = choice_logprobs(ort.logits_fn(ort.OnnxLM.open(stage / "onnx", 2)), expected, 8, tok.pad_token_id)
    np.testing.assert_allclose(p.score(got, 8), reference.numpy(), rtol=1e-5, atol=1e-5)
    one = p.requests([p.prompt(texts[0])], [["x", "y"]])  # one-token continuations: one forward per prompt
    assert all(len(c) == 1 for c in one[0][1]) and p.score(one, 8).shape == (1, 2)


def test_readme_shows_the_task_and_its_command_runs(labels_run, tmp_path):
    stage, _ = labels_run
    readme = (stage / "onnx-int8" / "README.md").read_text()
    pins = (f"pip install onnxruntime=={metadata.version('onnxruntime')} "
            f"tokenizers=={metadata.version('tokenizers')} numpy")
    assert pins in readme and "The best movie" not in readme
    assert "labels fresh (` positive`), rotten (` negative`)" in readme and "accuracy " in readme
    command = re.search(r"```bash\n.*?\n(.*?)```", readme, re.S).group(1).strip()
    shown = json.loads(re.search(r"prints\n\n```\n(.*?)\n```", readme, re.S).group(1))
    assert command.startswith("python predict.py ")
    proc = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)], capture_output=True,
                          text=True, cwd=stage / "onnx-int8", timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["label"] == shown["label"] and got["scores"] == pytest.approx(shown["scores"], abs=1e-4)


def test_compress_predict_on_the_folder(labels_run, tmp_path):
    stage, splits = labels_run
    texts = [splits.eval[0].text, splits.eval[1].text]
    proc = cli("predict", str(stage / "onnx"), *texts, "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = predict_py(stage / "onnx", [{"text": t} for t in texts], tmp_path)
    assert [g["label"] for g in lines] == [e["label"] for e in expected]
    assert lines[0]["scores"] == pytest.approx(expected[0]["scores"], abs=1e-5)
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": texts[0]}) + "\n")
    proc = cli("predict", str(stage / "onnx"), "--file", str(tmp_path / "more.jsonl"),
               "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o.jsonl").read_text())["label"] == expected[0]["label"]


def test_choices_given_with_an_input_are_scored_over_them(labels_run):
    from compress import runtime

    stage, splits = labels_run
    p = runtime.Predictor.open(stage / "onnx", threads=2)
    text = splits.eval[0].text
    (got,) = p.predict([{"text": text, "choices": ["fresh", "good", "bad"]}])
    assert set(got["scores"]) == {"fresh", "good", "bad"}
    assert got["scores"]["fresh"] == pytest.approx(p.classify([text])[0]["scores"]["fresh"], abs=1e-5)


def test_bad_folder_or_input_exits_2(labels_run, tmp_path):
    stage, _ = labels_run
    proc = cli("predict", str(stage), "some text")  # the stage folder: say which export
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    flat = proc.stderr.replace("\n", " ")
    assert "FOLDER=" in flat and "no model.onnx and no task.json" in flat and "onnx-int8" in flat
    bare = tmp_path / "bare"
    shutil.copytree(stage / "onnx", bare)
    (bare / "task.json").unlink()
    proc = cli("predict", str(bare), "some text")
    assert proc.returncode == 2 and "no task.json" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bad.jsonl").write_text('{"txt": "no text field"}\n')
    proc = subprocess.run([sys.executable, str(stage / "onnx" / "predict.py"), "--file", str(tmp_path / "bad.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--file line 1" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("predict", str(stage / "onnx"))
    assert proc.returncode == 2 and "give texts to predict" in proc.stderr


# --------------------------------------------------------------------------- a generative task


@pytest.fixture(scope="module")
def generative_run(tmp_path_factory):
    data = json.loads((DATA / "squad" / "squad_dev_v1.1.json").read_text())
    path = tmp_path_factory.mktemp("squad") / "small.json"
    path.write_text(json.dumps({"version": "1.1", "data": data["data"][:2]}))
    return stage_run(tmp_path_factory, [*GENERATIVE, f"data.path={path}"], "G")


def test_predict_py_reproduces_the_measured_answers(generative_run, tmp_path):
    from compress.evaluate import exact_match, token_f1

    stage, splits = generative_run
    task = json.loads((stage / "onnx" / "task.json").read_text())
    assert task["kind"] == "generative" and task["metric"] == "f1" and task["max_chars"] is None
    assert task["generation"]["max_new_tokens"] == 8 and task["generation"]["eos_token_id"] is not None
    assert task["prompt"]["add_special_tokens"] and task["prompt"]["prefix"].startswith("Answer the question")
    got = [g["answer"] for g in predict_py(stage / "onnx", [{"text": e.text} for e in splits.eval], tmp_path)]
    assert got == json.loads((stage / "predictions.json").read_text())["onnx-fp32"]  # KV cache = no cache
    assert len(set(got)) > 1 and all(len(set(a)) > 2 for a in got)  # not one byte repeated: the cache is read
    record, n = record_of(stage, "onnx"), len(splits.eval)
    assert sum(exact_match(a, e.answers) for a, e in zip(got, splits.eval)) / n == record["exact_match"]
    assert sum(token_f1(a, e.answers) for a, e in zip(got, splits.eval)) / n == record["f1"]
    assert '{"answer": ' in (stage / "onnx" / "README.md").read_text()


def test_raw_completion_stops_at_a_stop_string(generative_run):
    from compress import runtime

    stage, _ = generative_run
    p = runtime.Predictor.open(stage / "onnx", threads=2)
    (free,) = p.complete(["The passage says"], max_new_tokens=6)
    assert free["completion_tokens"] <= 6 and free["prompt_tokens"] > 0
    assert free["finish_reason"] in ("stop", "length")
    if free["text"][1:]:  # stop at the second character it wrote: cut before it
        (cut,) = p.complete(["The passage says"], max_new_tokens=6, stop=[free["text"][1]])
        assert cut["finish_reason"] == "stop" and free["text"][1] not in cut["text"]


# --------------------------------------------------------------------------- choices of each example's own


@pytest.fixture(scope="module")
def choices_run(tmp_path_factory):
    pool = ["a", "b", "red", "blue", "green apple", "no", "maybe"]
    rows = [{"q": f"question {i}: which one?", "opts": [pool[(i * 5 + j * 3) % len(pool)] for j in range(3 + i % 2)],
             "answer": i % 3} for i in range(60)]
    path = tmp_path_factory.mktemp("choices") / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stage_run(tmp_path_factory, ["teacher=tiny-random", "student=tiny-random", "data=jsonl", f"data.path={path}",
                                        "data.text_field=q", "data.choices_field=opts", "data.label_field=answer",
                                        "data.verbalizers={red: ' crimson'}", "data.eval_size=20", "eval=quick",
                                        "eval.latency=false", "eval.perplexity=false", "pipeline=export",
                                        "export.variants=[fp32]", "report.baselines=false"], "C")


def test_a_choices_task_takes_each_inputs_choices(choices_run, tmp_path):
    stage, splits = choices_run
    folder = stage / "onnx"
    task = json.loads((folder / "task.json").read_text())
    assert task["kind"] == "choices" and task["verbalizers"] == {"red": " crimson"}
    got = predict_py(folder, [{"text": e.text, "choices": list(e.choices)} for e in splits.eval], tmp_path)
    labels = [g["label"] for g in got]
    assert labels == json.loads((stage / "predictions.json").read_text())["onnx-fp32"]
    accuracy = sum(p == e.label for p, e in zip(labels, splits.eval)) / len(splits.eval)
    assert accuracy == record_of(stage, "onnx")["accuracy"]
    assert [list(g["scores"]) for g in got] == [list(e.choices) for e in splits.eval]
    readme = (folder / "README.md").read_text()
    command = re.search(r"```bash\n.*?\n(.*?)```", readme, re.S).group(1).strip()
    assert command.startswith("echo '{") and "> in.jsonl\npython predict.py --file in.jsonl" in command
    proc = subprocess.run(["bash", "-c", command.replace("python predict.py", f"{sys.executable} {folder}/predict.py")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    shown = json.loads(re.search(r"prints\n\n```\n(.*?)\n```", readme, re.S).group(1))
    assert proc.returncode == 0 and json.loads(proc.stdout)["label"] == shown["label"], proc.stderr
    proc = cli("predict", str(folder), "question 1: which one?")  # no choices given: say how to give them
    assert proc.returncode == 2 and '"choices": ["...", "..."]' in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- outside compress's environment


NO_NETWORK = ("Could not find a version", "No matching distribution", "Failed to establish a new connection",
              "Temporary failure in name resolution", "Network is unreachable", "ProxyError", "Read timed out")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A fresh virtual environment holding only onnxruntime, tokenizers and numpy (and their dependencies), at
    the versions installed here; skipped only when pip cannot reach the packages."""
    env = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    python = str(env / "bin" / "python")
    pins = [f"{n}=={metadata.version(n)}" for n in ("onnxruntime", "tokenizers", "numpy")]
    proc = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and any(s in proc.stdout + proc.stderr for s in NO_NETWORK):
        pytest.skip(f"pip cannot install {pins} here (no network?): {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    for absent in ("torch", "transformers", "compress"):
        probe = subprocess.run([python, "-I", "-c", f"import {absent}"], capture_output=True, text=True, timeout=120)
        assert probe.returncode != 0, f"{absent} is importable in the bare environment"
    return python


def test_predict_py_runs_with_onnxruntime_tokenizers_and_numpy_only(bare_python, labels_run, generative_run,
                                                                    tmp_path):
    stage, splits = labels_run
    items = [{"text": e.text} for e in splits.eval]
    bare = predict_py(stage / "onnx-int8", items, tmp_path, bare_python, "-I")
    assert [g["label"] for g in bare] == json.loads((stage / "predictions.json").read_text())["onnx-int8"]
    here = predict_py(stage / "onnx-int8", items, tmp_path)
    for a, b in zip(bare, here):
        assert a["label"] == b["label"] and a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    stage, splits = generative_run
    answers = predict_py(stage / "onnx", [{"text": e.text} for e in splits.eval], tmp_path, bare_python, "-I")
    assert [a["answer"] for a in answers] == json.loads((stage / "predictions.json").read_text())["onnx-fp32"]


# --------------------------------------------------------------------------- re-evaluation writes the task again


def test_changed_eval_settings_write_the_task_again(tmp_path):
    """Only eval.* changed: the finished export is re-measured in place, and task.json (its batch size and
    generation settings come from eval.*), predict.py and the README are written again."""
    base = [*TINY, "pipeline=export", "export.variants=[fp32]", "eval.latency=false", "eval.perplexity=false",
            "report.baselines=false", f"run.root={tmp_path}", "run.name=R"]
    assert cli("run", *base).returncode == 0
    folder = tmp_path / "R" / "01_export" / "onnx"
    assert json.loads((folder / "task.json").read_text())["batch_size"] == 8
    for name in ("task.json", "predict.py", "README.md"):
        (folder / name).unlink()
    proc = cli("run", *base, "eval.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-measuring" in proc.stderr
    assert json.loads((folder / "task.json").read_text())["batch_size"] == 4
    assert (folder / "predict.py").is_file() and (folder / "README.md").is_file()


def test_a_chat_template_that_changes_the_text_stops_the_stage(tiny_cfg):
    """The runtime concatenates prefix + text + suffix: a template that rewrites the text could not be
    reproduced, so the stage refuses it before exporting (exit 2 through the CLI's CompressError)."""
    from compress.data import load_splits
    from compress.errors import CompressError
    from compress.stages.export import task_spec
    from teachers.loading import byte_tokenizer

    tok, splits = byte_tokenizer(), load_splits(tiny_cfg.data)
    assert task_spec(tok, splits, tiny_cfg, "tiny")["kind"] == "labels"
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>{% endfor %}"
    with pytest.raises(CompressError) as e:
        task_spec(tok, splits, tiny_cfg, "tiny")
    assert e.value.problems[0].key == "data.use_chat_template" and "data.use_chat_template=false" in str(e.value)
