"""`compress serve`: a real uvicorn server on 127.0.0.1, real HTTP clients (httpx, and OpenAI's own
client), answers equal to the folder's predictor, concurrent requests batched, bad requests refused."""
import asyncio
import socket
import threading
import time

import httpx
import pytest

from conftest import TINY, cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    proc = cli("run", *TINY, "pipeline=export", "export.variants=[fp32,int8]", "report.baselines=false",
               f"run.root={root}", "run.name=S")
    assert proc.returncode == 0, proc.stderr
    return root / "S" / "01_export" / "onnx-int8"


@pytest.fixture(scope="module")
def server(folder):
    import uvicorn

    from compress.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(folder, threads=1, max_batch=16, wait_ms=50)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(10)


TEXTS = ["A wonderful, moving film.", "Dull and far too long.", "I laughed all the way through."]


def test_health_and_classify_equal_the_predictor(server):
    url, app = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": app.state.predictor.task.get("model")
                                                 or "onnx-int8", "task": "labels"}
    got = httpx.post(f"{url}/v1/classify", json={"input": TEXTS}).json()
    assert got["data"] == app.state.predictor.classify(TEXTS)
    assert set(got["data"][0]["scores"]) == {"fresh", "rotten"}


def test_concurrent_requests_are_batched(server):
    url, app = server
    batcher = app.state.batchers["classify"]
    before = len(batcher.batches)

    async def many():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/classify", json={"input": [t]})
                                          for t in TEXTS * 4])

    answers = [r.json()["data"][0] for r in asyncio.run(many())]
    assert answers == app.state.predictor.classify(TEXTS * 4)
    assert max(batcher.batches[before:]) > 1  # 12 concurrent requests did not run one by one


def test_openai_clients_work_against_it(server):
    from openai import OpenAI

    url, app = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    done = client.completions.create(model="any", prompt="The movie was", max_tokens=5)
    expected = app.state.predictor.complete(["The movie was"], 5, [])[0]
    assert done.choices[0].text == expected["text"] and done.choices[0].finish_reason == expected["finish_reason"]
    assert done.usage.completion_tokens == expected["completion_tokens"] <= 5
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=4, stop=["\n"])
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 4
    assert "\n" not in chat.choices[0].message.content


def test_bad_requests_are_refused_with_a_reason(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 2})
    assert r.status_code == 400 and "n=1" in r.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/classify", json={"text": "x"}).status_code == 422  # no `input`
    r = httpx.post(f"{url}/v1/classify", json={"input": ["a", "b"], "choices": [["x", "y"]]})
    assert r.status_code == 400 and "one per input" in r.json()["error"]["message"]


def test_serve_refuses_a_folder_that_is_not_an_export(tmp_path):
    proc = cli("serve", str(tmp_path))
    assert proc.returncode == 2 and "FOLDER" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_load_benchmark_reports_throughput_and_latency(folder, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "serve_load.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), str(folder), "--clients", "1,4",
                           "--requests", "8", "--threads", "1", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["clients"] for r in rows] == [1, 4] and all(r["requests"] == 8 for r in rows)
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["requests_per_s"] > 0 for r in rows)


def test_one_failing_call_does_not_fail_the_batch_it_shares():
    """A batch that raises is rerun call by call: only the bad call's caller gets the error."""
    from concurrent.futures import ThreadPoolExecutor

    from compress.serve import Batcher

    def fn(items):
        if "bad" in items:
            raise ValueError("bad input")
        return [i.upper() for i in items]

    async def go():
        batcher = Batcher(fn, ThreadPoolExecutor(1), max_batch=8, wait_s=0.05)
        task = asyncio.create_task(batcher.run())
        got = await asyncio.gather(batcher(["a"]), batcher(["bad"]), batcher(["b", "c"]), return_exceptions=True)
        task.cancel()
        return got, batcher.batches

    (a, bad, bc), batches = asyncio.run(go())
    assert a == ["A"] and bc == ["B", "C"] and isinstance(bad, ValueError) and batches == [4]


def test_empty_inputs_are_refused(server):
    url, _ = server
    assert httpx.post(f"{url}/v1/completions", json={"prompt": ""}).status_code == 400
    assert httpx.post(f"{url}/v1/classify", json={"input": [" "]}).status_code == 400
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": []}).status_code == 400


def test_bad_serve_options_exit_2_all_named(folder):
    proc = cli("serve", str(folder), "--port", "0", "--max-batch", "0", "--wait-ms", "-1", "--threads", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for key in ("--port=0", "--max-batch=0", "--wait-ms=-1.0", "--threads=0"):
        assert key in proc.stderr, key
