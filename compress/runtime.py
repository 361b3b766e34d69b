"""Run an exported model's task with onnxruntime, tokenizers and numpy alone.

The `export` stage copies this file into every ONNX folder as `predict.py`, beside `model.onnx`,
`tokenizer.json` and `task.json` (the task the folder was measured on: prompt, labels and their
continuations, generation settings). It scores exactly as compress's evaluation does
(compress.evaluate: build_prompt, encode_requests, choice_logprobs, generate_greedy):

    python predict.py "text" ...                      one JSON line per text
    python predict.py --file in.jsonl --out out.jsonl [--threads N]

Input lines are `{"text": ...}`, plus `"choices": [...]` for a task whose examples carry their own
choices (task.json `kind` "choices"). Output lines are `{"label": ..., "scores": {label: log-prob}}`
for label and choice tasks, `{"answer": ...}` for generative ones, `{"completion": ...}` for a
plain-text task (no task: the text is continued as it is).

In Python (a server imports this module):

    p = Predictor.open(folder, threads=2)
    p.classify(["text", ...], choices=None)  -> [{"label": ..., "scores": {...}}, ...]
    p.generate(["text", ...])                -> ["answer", ...]   (the task's prompt, greedy, one line)
    p.complete(["raw prompt"], 32, ["\\n"])   -> [{"text", "finish_reason", "prompt_tokens", "completion_tokens"}]
    p.predict([{"text": ...}, ...])          -> the output lines above

Imports nothing but numpy, onnxruntime, tokenizers and the standard library's json, sys, argparse
and pathlib (tests/test_predict.py checks it), so it runs where torch and transformers are absent.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

FORMAT = 1
"""Version of task.json's layout; a runtime refuses a newer one."""
TASK_FILE = "task.json"
KINDS = ("labels", "choices", "generative", "text")
"""labels: shared labels scored by their verbalizers; choices: each input's own choices; generative: a greedy
answer cut at the first newline; text: no task (the input is continued as it is)."""
DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


GRAPH_LEVELS = ("disable", "basic", "extended", "all")


def session(model_path: Path | bytes, threads: int | None = None, graph_level: str = "all",
            data_folder: Path | None = None):
    """An onnxruntime InferenceSession on the CPU with the given intra-op threads and graph optimization level
    (compress.ort measures with the same sessions). A graph given as bytes reads its external weights from
    `data_folder`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if data_folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_folder))
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_level]
    model = model_path if isinstance(model_path, bytes) else str(model_path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class BadInput(ValueError):
    """Input the user can fix: the key or argument at fault, its value, and what to do."""

    def __init__(self, key: str, value, fix: str):
        self.key, self.value, self.fix = key, value, fix
        super().__init__(f"{key}={value!r}: {fix}")


def truncate(text: str, max_chars: int) -> str:
    """Cut to at most `max_chars` characters, at a word boundary when there is one (whitespace collapsed):
    what compress.data does to every input before prompting."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization` (decoding with `clean_up_tokenization_spaces`)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, in float32."""
    x = x.astype(np.float32) - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def eos_ids(task: dict) -> list[int]:
    """The tokens that end an answer: `eos_token_ids` (tokenizer and generation config), else `eos_token_id`."""
    gen = task["generation"]
    return list(gen.get("eos_token_ids") or [gen["eos_token_id"]])


def read_task(folder: Path) -> dict:
    """The folder's task.json, checked: a folder without model.onnx or task.json is bad input."""
    folder = Path(folder)
    if not (folder / "model.onnx").is_file() or not (folder / TASK_FILE).is_file():
        inner = sorted(str(p.parent) for p in folder.glob(f"*/{TASK_FILE}")) if folder.is_dir() else []
        hint = (f"it holds exported folders: give one of {', '.join(inner)}"
                if inner else "give a folder written by compress's export stage (onnx/, onnx-int8/ or onnx-int4/ of "
                "a run's export stage), which holds model.onnx, tokenizer.json and task.json")
        missing = [n for n in ("model.onnx", TASK_FILE) if not (folder / n).is_file()]
        raise BadInput("FOLDER", str(folder), f"no {' and no '.join(missing)} here; {hint}")
    try:
        task = json.loads((folder / TASK_FILE).read_text())
    except ValueError as e:
        raise BadInput(TASK_FILE, str(folder / TASK_FILE), f"is not valid JSON ({e}); export the model again")

    if task.get("format", 0) > FORMAT or task.get("kind") not in KINDS:
        raise BadInput(TASK_FILE, task.get("format"), f"written by a newer compress (format {task.get('format')}, "
                       f"this runtime reads {FORMAT}): run the predict.py of the same folder")
    return task


def greedy(run, empty_past: dict, ids: list[int], max_new_tokens: int, eos: list[int],
           stop) -> tuple[list[int], str]:
    """Greedy decoding with the KV cache, batch 1: `run(ids, mask, positions, past) -> (logits (1, T, V), past)`
    is one forward of the graph. New tokens until EOS (not kept), `stop(new tokens)` holds (that token kept) or
    `max_new_tokens`; returns (tokens, "stop" or "length"). compress.ort's evaluation decodes through this too."""
    new, t = [], len(ids)
    logits, past = run(np.array([ids], np.int64), np.ones((1, t), np.int64), np.arange(t, dtype=np.int64)[None],
                       empty_past)
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token in eos:
            return new, "stop"
        new.append(token)
        if stop(new):
            return new, "stop"
        if len(new) == max_new_tokens:
            break
        n = t + len(new)
        logits, past = run(np.array([[token]], np.int64), np.ones((1, n), np.int64), np.array([[n - 1]], np.int64),
                           past)
    return new, "length"


class Predictor:
    """An exported folder: its onnxruntime session, tokenizer and task."""

    def __init__(self, folder: Path, task: dict, tokenizer, session):
        self.folder, self.task, self.tok, self.sess = Path(folder), task, tokenizer, session
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        unknown = set(self.inputs) - {"input_ids", "attention_mask", "position_ids", *self.past}
        if not self.past or unknown:
            raise BadInput("model.onnx", str(self.folder / "model.onnx"), "expected a decoder with KV cache (inputs "
                           "input_ids, attention_mask, position_ids, past_key_values.*), got inputs "
                           f"{sorted(self.inputs)}")
        first = self.inputs[self.past[0]]
        if first.type not in DTYPES or not all(isinstance(d, int) for d in first.shape[1::2]):
            raise BadInput("model.onnx", str(self.folder / "model.onnx"), f"a KV cache of {first.type} {first.shape}: "
                           "this runtime reads float or float16 caches of fixed heads and head size")
        self.kv_shape, self.kv_dtype = (first.shape[1], first.shape[3]), DTYPES[first.type]
        self.present = [n.replace("past_key_values.", "present.") for n in self.past]

    @classmethod
    def open(cls, folder, threads: int | None = None) -> "Predictor":
        """Load `folder` (model.onnx, tokenizer.json, task.json) on the CPU with `threads` intra-op threads."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        task = read_task(folder)
        if not (folder / "tokenizer.json").is_file():
            raise BadInput("FOLDER", str(folder), "no tokenizer.json here; export the model again with compress")
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_truncation()  # transformers encodes without the file's truncation or padding, so do we
        tok.no_padding()
        return cls(folder, task, tok, session(folder / "model.onnx", threads, task.get("graph_optimization", "all")))

    # ------------------------------------------------------------------ tokens and logits

    def encode(self, text: str, special: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        text = self.tok.decode(ids, skip_special_tokens=skip_special)
        return clean_up_spaces(text) if self.task.get("clean_up_tokenization_spaces") else text

    def prompt(self, text: str) -> str:
        """The task's prompt around `text` (cut to the task's `max_chars` first, as its inputs were)."""
        if self.task.get("max_chars"):
            text = truncate(text, self.task["max_chars"])
        p = self.task["prompt"]
        return p["prefix"] + text + p["suffix"]

    def _empty_past(self, batch: int) -> dict:
        heads, dim = self.kv_shape
        return {n: np.zeros((batch, heads, 0, dim), self.kv_dtype) for n in self.past}

    def _run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict) -> tuple:
        """(logits (B, T, V), present cache) of one forward; only the inputs the graph declares are fed."""
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        out = self.sess.run(["logits", *self.present], {k: v for k, v in feed.items() if k in self.inputs})
        return out[0], dict(zip(self.past, out[1:]))

    def logits(self, seqs: list[list[int]]) -> np.ndarray:
        """Logits (B, T, V) of right-padded sequences with an empty cache (compress.ort.logits_fn)."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.task["pad_token_id"], np.int64)  # (B, T)
        mask = np.zeros((len(seqs), width), np.int64)  # (B, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return self._run(ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None), self._empty_past(len(seqs)))[0]

    # ------------------------------------------------------------------ labels and choices

    def continuations(self, choices: list[str] | None) -> dict[str, str]:
        """Choice -> the continuation scoring it: the task's labels, or the given choices (each " " + choice
        unless the task names a verbalizer for it), as compress.data.Splits.continuations."""
        if choices is None:
            if self.task["kind"] != "labels":
                raise BadInput("choices", None, f"this {self.task['kind']} task has no shared labels: give each input "
                               'its choices, as --file lines {"text": ..., "choices": ["...", "..."]}')
            return self.task["verbalizers"]
        return {c: self.task["verbalizers"].get(c, f" {c}") for c in choices}

    def requests(self, prompts: list[str], conts: list[list[str]]) -> list[tuple[list[int], list[list[int]]]]:
        """Token ids of each prompt and of each continuation after it (compress.evaluate.encode_requests)."""
        special, out = self.task["prompt"]["add_special_tokens"], []
        for prompt, own in zip(prompts, conts):
            ctx, tails = self.encode(prompt, special), []
            for cont in own:
                whole = self.encode(prompt + cont, special)
                tail = whole[len(ctx):] if whole[: len(ctx)] == ctx else []
                tails.append(tail or self.encode(cont, True))
            out.append((ctx, tails))
        return out

    def score(self, requests: list, batch_size: int) -> np.ndarray:
        """Summed log-probability of every continuation after its context: (N, C), -inf past a request's
        choices (compress.evaluate.choice_logprobs: the same sequences, order and batches)."""
        n, c = len(requests), max(len(conts) for _, conts in requests)
        single = all(len(cont) == 1 for _, conts in requests for cont in conts)
        seqs = [(i, j, ctx if single else ctx + cont) for i, (ctx, conts) in enumerate(requests)
                for j, cont in enumerate(conts) if not single or j == 0]
        seqs.sort(key=lambda s: -len(s[2]))
        scores = np.full((n, c), -np.inf, np.float32)
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start: start + batch_size]
            logits = self.logits([s[2] for s in batch])  # (B, T, V)
            for b, (i, j, seq) in enumerate(batch):
                ctx, conts = requests[i]
                if single:
                    logp = log_softmax(logits[b, len(ctx) - 1])  # (V,)
                    scores[i, : len(conts)] = [logp[cont[0]] for cont in conts]
                else:
                    logp = log_softmax(logits[b, len(ctx) - 1: len(seq) - 1])  # (L, V)
                    scores[i, j] = logp[np.arange(len(conts[j])), conts[j]].sum()
        return scores

    def classify(self, texts: list[str], choices: list[list[str] | None] | None = None,
                 batch_size: int | None = None) -> list[dict]:
        """Each text's most likely label (or choice) and every label's summed log-probability."""
        if not texts:
            return []
        maps = [self.continuations(own) for own in (choices or [None] * len(texts))]
        reqs = self.requests([self.prompt(t) for t in texts], [list(m.values()) for m in maps])
        scores = self.score(reqs, batch_size or self.task.get("batch_size", 8))
        return [{"label": list(m)[int(row.argmax())], "scores": {k: float(v) for k, v in zip(m, row)}}
                for m, row in zip(maps, scores)]

    # ------------------------------------------------------------------ generation

    def greedy(self, ids: list[int], max_new_tokens: int, stop: list[str]) -> tuple[list[int], str]:
        """Greedy new tokens after `ids` with the KV cache, batch 1: until EOS, a `stop` string in the decoded
        text, or `max_new_tokens`. Returns (tokens, "stop" or "length")."""
        return greedy(self._run, self._empty_past(1), ids, max_new_tokens, eos_ids(self.task),
                      lambda new: any(s in self.decode(new, False) for s in stop))

    def generate(self, texts: list[str], max_new_tokens: int | None = None) -> list[str]:
        """The task's answer to each text: its prompt continued greedily up to a newline, EOS or
        `max_new_tokens` (default: the task's), cut at the first newline and stripped
        (compress.evaluate.generate_greedy)."""
        gen = self.task["generation"]
        out = []
        for text in texts:
            ids = self.encode(self.prompt(text), self.task["prompt"]["add_special_tokens"])
            new, _ = self.greedy(ids, max_new_tokens or gen["max_new_tokens"], gen["stop"])
            out.append(self.decode(new, True).split("\n")[0].strip())
        return out

    def complete(self, prompts: list[str], max_new_tokens: int = 16, stop: list[str] | None = None,
                 special: bool = True) -> list[dict]:
        """Raw completion, no task template: each prompt (tokenized with the tokenizer's special tokens, unless
        `special` is false: a chat-templated prompt spells them out) continued greedily, cut before the first
        `stop` string. Returns text, finish_reason ("stop": EOS or a stop string; "length"), prompt_tokens and
        completion_tokens."""
        out, stop = [], [s for s in stop or [] if s]
        for prompt in prompts:
            ids = self.encode(prompt, special)
            new, reason = self.greedy(ids, max_new_tokens, stop)
            text = self.decode(new, True)
            for s in stop:
                text = text.split(s)[0]
            out.append({"text": text, "finish_reason": reason, "prompt_tokens": len(ids),
                        "completion_tokens": len(new)})
        return out

    # ------------------------------------------------------------------ the task

    def predict(self, items: list[dict]) -> list[dict]:
        """One output per input `{"text": ..., "choices"?: [...]}`, by the task's kind (module docstring)."""
        texts, kind = [it["text"] for it in items], self.task["kind"]
        if kind in ("labels", "choices"):
            own = [it.get("choices") for it in items]
            return self.classify(texts, own if any(c is not None for c in own) else None)
        if kind == "generative":
            return [{"answer": a} for a in self.generate(texts)]
        gen = self.task["generation"]
        return [{"completion": c["text"]} for c in self.complete(texts, gen["max_new_tokens"])]


# ---------------------------------------------------------------------- command line


def read_inputs(texts: list[str], file: str | None) -> list[dict]:
    """Inputs from the command line's texts and a JSON-lines file (`{"text": ..., "choices"?: [...]}`)."""
    items = [{"text": t} for t in texts]
    if file:
        path = Path(file)
        if not path.is_file():
            raise BadInput("--file", file, "no such file; give a JSON-lines file, one {\"text\": ...} per line")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"--file line {n}", line[:80], f"not JSON ({e.msg})") from None
            choices = item.get("choices") if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not (
                    choices is None or (isinstance(choices, list) and len(choices) >= 2
                                        and all(isinstance(c, str) for c in choices))):
                raise BadInput(f"--file line {n}", line[:80], 'each line must be {"text": "..."}, with '
                               '"choices": ["...", "..."] (two or more strings) for a choices task')
            items.append(item)
    if not items:
        raise BadInput("TEXT", None, "give texts to predict, or --file in.jsonl")
    return items


def predict_cli(folder, texts: list[str], file: str | None, out: str | None, threads: int | None) -> int:
    """`predict.py` and `compress predict`: predictions as JSON lines to `out` (or stdout)."""
    items = read_inputs(texts, file)
    rows = Predictor.open(folder, threads).predict(items)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out:
        Path(out).write_text(lines, encoding="utf-8")
        print(f"{len(rows)} predictions -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(lines)
    return 0


def parser(folder_default: Path | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Predict with this exported model's task (task.json): one JSON line "
                                "per input.")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to predict")
    p.add_argument("--file", help='JSON-lines input, one {"text": ...} per line ("choices": [...] for a choices task)')
    p.add_argument("--out", help="write the JSON lines here instead of stdout")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    p.add_argument("--folder", default=folder_default, help="the exported folder (default: this script's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser(Path(__file__).resolve().parent).parse_args(argv)
    try:
        if args.threads is not None and args.threads < 1:
            raise BadInput("--threads", args.threads, "must be >= 1")
        return predict_cli(args.folder, args.texts, args.file, args.out, args.threads)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
