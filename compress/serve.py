"""`compress serve FOLDER`: an exported folder behind HTTP (FastAPI on uvicorn).

| route | body | answer |
| --- | --- | --- |
| `GET /health` | | `{"status": "ok", "model", "task"}` |
| `POST /v1/classify` | `{"input": ["text", ...], "choices"?: [[...], ...]}` | `{"model", "data": [{"label", "scores"}, ...]}` |
| `POST /v1/completions` | OpenAI: `prompt` (string or list), `max_tokens`, `stop` | OpenAI `text_completion` |
| `POST /v1/chat/completions` | OpenAI: `messages`, `max_tokens`, `stop` | OpenAI `chat.completion` |

Everything runs through `compress.runtime.Predictor` (the folder's own `predict.py`), so the server
answers as the export stage measured. Decoding is greedy: `temperature` and `top_p` are accepted and
ignored; `n > 1` and `stream` are refused (400). Concurrent requests are batched: each route queues its
inputs, and one worker thread takes everything queued within `wait_ms` (up to `max_batch` inputs) in
one call: label scoring runs as padded batches; generation decodes the batch's prompts one after
another with the KV cache. One worker keeps onnxruntime's threads to themselves.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Optional, Union

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from compress.runtime import Predictor


class Batcher:
    """Collects concurrent calls and runs them as one batch on the shared worker thread."""

    def __init__(self, fn: Callable[[list], list], worker: ThreadPoolExecutor, max_batch: int, wait_s: float):
        self.fn, self.worker, self.max_batch, self.wait_s = fn, worker, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches: list[int] = []
        """Size of every batch run (for tests and the load benchmark)."""

    async def __call__(self, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((items, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            calls = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while sum(len(c[0]) for c in calls) < self.max_batch:
                try:
                    calls.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            flat = [item for items, _ in calls for item in items]
            self.batches.append(len(flat))
            try:
                results = await loop.run_in_executor(self.worker, self.fn, flat)
            except Exception:  # one bad call must not fail the others: each runs alone, and only its caller sees
                for items, fut in calls:
                    try:
                        done = await loop.run_in_executor(self.worker, self.fn, items)
                    except Exception as e:
                        _settle(fut, error=e)
                    else:
                        _settle(fut, done)
                continue
            start = 0
            for items, fut in calls:
                _settle(fut, results[start: start + len(items)])
                start += len(items)


def _settle(fut: asyncio.Future, result=None, error: Exception | None = None) -> None:
    """Answer a caller, unless it went away (a cancelled request: its future is done already)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


# --------------------------------------------------------------------------- request bodies


class ClassifyRequest(BaseModel):
    input: Union[str, list[str]]
    choices: Optional[list[list[str]]] = None
    """Per input, its own choices (tasks whose examples carry their choices)."""


class CompletionRequest(BaseModel):
    model: Optional[str] = None
    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1, le=4096)
    stop: Union[str, list[str], None] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: Optional[str] = None
    messages: list[Message]
    max_tokens: Optional[int] = Field(None, ge=1, le=4096)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=4096)
    stop: Union[str, list[str], None] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False


def _stops(stop) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _refuse_unsupported(req) -> None:
    if req.n != 1 or req.stream:
        raise HTTPException(400, "this server decodes greedily, one choice, without streaming: send n=1, stream=false")


# --------------------------------------------------------------------------- the app


def create_app(folder: Path, threads: int | None = None, max_batch: int = 16, wait_ms: float = 5.0) -> FastAPI:
    """The server of one exported folder (see the module table)."""
    predictor = Predictor.open(folder, threads)
    name = predictor.task.get("model") or Path(folder).name
    chat = _chat_renderer(Path(folder))
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress-serve")

    def classify(items: list[tuple[str, list[str] | None]]) -> list[dict]:
        own = [c for _, c in items]
        return predictor.classify([t for t, _ in items], own if any(c is not None for c in own) else None)

    def complete(items: list[tuple[str, int, list[str], bool]]) -> list[dict]:
        return [predictor.complete([p], n, stop, special)[0] for p, n, stop, special in items]

    batchers = {"classify": Batcher(classify, worker, max_batch, wait_ms / 1000),
                "complete": Batcher(complete, worker, max_batch, wait_ms / 1000)}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        tasks = [asyncio.create_task(b.run()) for b in batchers.values()]
        yield
        for t in tasks:
            t.cancel()
        worker.shutdown(wait=False)

    app = FastAPI(title=f"compress serve: {name}", lifespan=lifespan)
    app.state.batchers, app.state.predictor = batchers, predictor

    @app.exception_handler(HTTPException)
    async def openai_error(request, exc: HTTPException):  # OpenAI's error shape, which its clients parse
        return JSONResponse({"error": {"message": exc.detail, "type": "invalid_request_error"}}, exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": name, "task": predictor.task["kind"]}

    @app.post("/v1/classify")
    async def classify_route(req: ClassifyRequest) -> dict:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if predictor.task["kind"] not in ("labels", "choices"):
            raise HTTPException(400, f"this model's task is {predictor.task['kind']!r}, not classification: use "
                                "/v1/completions or /v1/chat/completions")
        if req.choices is not None and len(req.choices) != len(texts):
            raise HTTPException(400, f"choices: {len(req.choices)} lists for {len(texts)} inputs; give one per input")
        if predictor.task["kind"] == "choices" and req.choices is None:
            raise HTTPException(400, "this task's examples carry their own choices: send choices=[[...], ...]")
        if any(not t.strip() for t in texts) or any(c is not None and not c for c in req.choices or []):
            raise HTTPException(400, "every input needs some text, and every choices list at least one choice")
        data = await batchers["classify"](list(zip(texts, req.choices or [None] * len(texts))))
        return {"object": "list", "model": name, "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> dict:
        _refuse_unsupported(req)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p for p in prompts):
            raise HTTPException(400, "prompt: give a non-empty string (or a list of them)")
        outs = await batchers["complete"]([(p, req.max_tokens, _stops(req.stop), True) for p in prompts])
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name, "choices": [{"index": i, "text": o["text"], "logprobs": None,
                                            "finish_reason": o["finish_reason"]} for i, o in enumerate(outs)],
                "usage": _usage(outs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> dict:
        _refuse_unsupported(req)
        if not req.messages:
            raise HTTPException(400, "messages: give at least one message")
        try:
            prompt, templated = chat([m.model_dump() for m in req.messages])
        except Exception as e:  # the model's chat template refuses these messages (roles, order, system turn)
            raise HTTPException(400, f"the model's chat template refused these messages: {e}") from None
        limit = req.max_completion_tokens or req.max_tokens or predictor.task["generation"]["max_new_tokens"]
        [o] = await batchers["complete"]([(prompt, limit, _stops(req.stop), not templated)])
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "message": {"role": "assistant", "content": o["text"]},
                                            "finish_reason": o["finish_reason"]}], "usage": _usage([o])}

    return app


def _usage(outs: list[dict]) -> dict:
    p, c = sum(o["prompt_tokens"] for o in outs), sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chat_renderer(folder: Path) -> Callable[[list[dict]], tuple[str, bool]]:
    """messages -> (prompt text, whether a chat template wrote it): by the tokenizer's chat template
    (transformers renders it; its text spells out the special tokens); without one, `role: content` lines
    and `assistant:`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if getattr(tok, "chat_template", None):
        return lambda messages: (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True)
    return lambda messages: ("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", False)


def serve(folder: Path, host: str, port: int, threads: int | None, max_batch: int, wait_ms: float) -> None:
    import uvicorn

    uvicorn.run(create_app(folder, threads, max_batch, wait_ms), host=host, port=port, log_level="info")
