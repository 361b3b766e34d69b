"""ONNX Runtime sessions for exported causal LMs: logits for scoring, and a lean decode loop for latency.

One module for everything that runs an exported model, so the `export` stage and any
benchmark measure it the same way:

    lm = OnnxLM.open(folder, threads=2)
    logits_fn(lm)(input_ids, attention_mask, positions)   # compress.evaluate.LogitsFn
    generate_fn(lm, eos)(prompts, max_new_tokens, stop)   # compress.evaluate.GenerateFn (KV cache)
    measure_latency(lm, prompt_ids, decode_tokens, warmup, runs) -> {"prefill_ms", "decode_tok_s"}

The graph is the export stage's (onnxruntime-genai's model builder, or optimum's `text-generation-with-past`):
inputs `input_ids`, `attention_mask`, `position_ids` (optimum only; the builder's graph derives positions from
the mask, so padded batches are right-padded) and `past_key_values.{i}.key/value` (B, kv_heads, P, head_dim);
outputs `logits` (B, T, V) and `present.{i}.key/value` (B, kv_heads, P + T, head_dim).

The decode loop skips optimum's generate (whose per-token Python overhead dominates at this
size): IO binding onto preallocated numpy buffers, the KV cache ping-ponging between two
buffers per tensor, so a step allocates nothing and copies nothing.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compress import extras
from compress.errors import CompressError, Problem
from compress import runtime
from compress.runtime import GRAPH_LEVELS, session  # noqa: F401  (one CPU session for compress and predict.py)


def require_onnx(key: str = "pipeline.stages") -> None:
    """Stop with the install command when the ONNX extra is missing."""
    missing = []
    for module in ("onnxruntime", "onnx", "optimum.exporters.onnx"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CompressError(Problem(key, "export", f"needs {', '.join(missing)}, which are not installed: "
                                    f"run `{extras.install('onnx')}`"))


@dataclass
class OnnxLM:
    """An exported decoder and the shape of its KV cache."""

    sess: object
    past_names: list[str]
    """Graph inputs `past_key_values.{i}.key/value`, in graph order."""
    kv_heads: int
    head_dim: int
    vocab: int
    positions: bool = True
    """Whether the graph takes `position_ids` (the builder's graphs and optimum's Gemma-2 compute them)."""
    gathers: bool = False
    """Whether the graph takes `logits_positions` (`gathered_graph`): logits only at those positions."""

    @classmethod
    def open(cls, folder: Path, threads: int | None = None, graph_level: str = "all",
             gather: bool = False) -> "OnnxLM":
        """The folder's model.onnx; with `gather`, its `gathered_graph` for scoring (the same graph when its
        output head is not found), never for latency: the folder deploys the graph as it is."""
        graph = gathered_graph(Path(folder) / "model.onnx") if gather else None
        sess = session(graph.SerializeToString() if graph else Path(folder) / "model.onnx", threads, graph_level,
                       Path(folder) if graph else None)
        past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        if not past:
            raise CompressError(Problem("model", str(folder), "this ONNX graph has no KV-cache inputs; export it "
                                        "with task text-generation-with-past"))
        vocab = next(o for o in sess.get_outputs() if o.name == "logits").shape[-1]
        return cls(sess, [p.name for p in past], int(past[0].shape[1]), int(past[0].shape[3]), int(vocab),
                   any(i.name == "position_ids" for i in sess.get_inputs()), graph is not None)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}


POSITIONS = "logits_positions"
HEAD_OPS = ("MatMul", "MatMulInteger", "MatMulNBits")
"""What computes the output head in an exported graph (fp32, dynamic int8, int4)."""
PER_POSITION_OPS = ("Cast", "Mul", "Add", "Sub", "Div", "Tanh")
"""What may follow the head before `logits` (int8 rescaling, a bias, final-logit soft-capping)."""


def gathered_graph(path: Path):
    """The graph at `path` (weights left in their external files) with one more input, `logits_positions`
    (K,) int64: the output head's activation is gathered at those sequence positions, (B, T, H) -> (B, K, H),
    so `logits` come out (B, K, V) and the head runs at K positions instead of T. Scoring reads one or two
    positions per prompt, and the head (576 x 49,152 for SmolLM2) is a fifth of the teacher's forward and
    two fifths of a 10-layer student's. The gather sits right before the head's MatMul, after any dynamic
    quantization of its input (whose scale still spans the whole batch), so the kept logits are the full
    graph's. None when no head is found behind `logits` (then the full graph scores)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    made = {o: n for n in g.node for o in n.output}

    def heads(name: str, chain: set) -> list:  # the head nodes behind `name` through per-position ops
        node = made.get(name)
        if node is None or node.op_type not in HEAD_OPS + PER_POSITION_OPS:
            return []
        chain.add(name)
        if node.op_type in HEAD_OPS:
            return [node]
        return [h for i in node.input if i for h in heads(i, chain)]  # int8's rescale: a scale branch ends empty

    chain: set = set()
    found = heads("logits", chain)
    if len(found) != 1 or any(i.name == POSITIONS for i in g.input):
        return None
    node = found[0]
    picked = f"{node.input[0]}/at_{POSITIONS}"
    g.input.append(onnx.helper.make_tensor_value_info(POSITIONS, onnx.TensorProto.INT64, ["positions"]))
    at = list(g.node).index(node)
    g.node.insert(at, onnx.helper.make_node("Gather", [node.input[0], POSITIONS], [picked], axis=1,
                                            name=f"/gather_{POSITIONS}"))
    node.input[0] = picked
    kept = [v for v in g.value_info if v.name not in chain]  # shapes along the head now have K positions
    del g.value_info[:]
    g.value_info.extend(kept)
    dims = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim
    if len(dims) == 3:
        dims[1].dim_param = "positions"
    return model


def logits_fn(lm: OnnxLM):
    """A compress.evaluate.LogitsFn over the session: one forward with an empty cache (the head only at
    `positions` when the graph gathers)."""

    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor, positions=None) -> torch.Tensor:
        ids = input_ids.cpu().numpy().astype(np.int64)  # (B, T)
        mask = attention_mask.cpu().numpy().astype(np.int64)  # (B, T)
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)  # (B, T)
        feed = {"input_ids": ids, "attention_mask": mask, **lm.empty_past(ids.shape[0])}
        if lm.positions:
            feed["position_ids"] = pos
        if lm.gathers:
            feed[POSITIONS] = np.asarray(range(ids.shape[1]) if positions is None else positions, np.int64)
            return torch.from_numpy(lm.sess.run(["logits"], feed)[0])  # (B, K, V)
        out = lm.sess.run(["logits"], feed)[0]  # (B, T, V)
        return torch.from_numpy(out if positions is None else out[:, positions])  # (B, K, V)

    return logits


def generate_fn(lm: OnnxLM, eos: list[int]):
    """A compress.evaluate.GenerateFn over the session: greedy, one prompt at a time, the KV cache fed back
    (compress.runtime.greedy: the loop an exported folder's predict.py runs)."""
    present = ["logits"] + [n.replace("past_key_values.", "present.") for n in lm.past_names]

    def run(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict) -> tuple:
        feed = {"input_ids": ids, "attention_mask": mask, **past, **({"position_ids": positions} if lm.positions
                                                                      else {})}
        if lm.gathers:  # greedy reads the last position only
            feed[POSITIONS] = np.array([ids.shape[1] - 1], np.int64)
        logits, *kv = lm.sess.run(present, feed)  # (1, T or 1, V), L x (1, H, P + T, D)
        return logits, dict(zip(lm.past_names, kv))

    def generate(prompts: list[list[int]], max_new_tokens: int, stop) -> list[list[int]]:
        return [runtime.greedy(run, lm.empty_past(1), p, max_new_tokens, eos, stop)[0] for p in prompts]

    return generate


class Decoder:
    """Greedy batch-1 decoding with IO binding and preallocated, ping-ponged KV buffers."""

    def __init__(self, lm: OnnxLM, max_tokens: int):
        self.lm, self.max = lm, max_tokens
        per = lm.kv_heads * max_tokens * lm.head_dim
        self.kv = [[np.empty(per, np.float32) for _ in lm.past_names] for _ in range(2)]  # 2 x L x (H*T*D,)
        self.mask = np.ones((1, max_tokens), np.int64)
        self.ids, self.pos = np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64)
        self.step_logits = np.empty((1, 1, lm.vocab), np.float32)  # (1, 1, V)
        self.present = [n.replace("past_key_values.", "present.") for n in lm.past_names]

    def _bind(self, ids: np.ndarray, pos: np.ndarray, past_len: int, logits: np.ndarray, src: int):
        lm, b = self.lm, self.lm.sess.io_binding()
        t = ids.shape[1]
        b.bind_cpu_input("input_ids", ids)
        if lm.positions:
            b.bind_cpu_input("position_ids", pos)
        b.bind_cpu_input("attention_mask", self.mask[:, : past_len + t])
        shape_in, shape_out = (1, lm.kv_heads, past_len, lm.head_dim), (1, lm.kv_heads, past_len + t, lm.head_dim)
        n_in, n_out = int(np.prod(shape_in)), int(np.prod(shape_out))
        for i, (name, pname) in enumerate(zip(lm.past_names, self.present)):
            if past_len:
                b.bind_input(name, "cpu", 0, np.float32, shape_in, self.kv[src][i][:n_in].ctypes.data)
            else:
                b.bind_cpu_input(name, np.zeros(shape_in, np.float32))
            b.bind_output(pname, "cpu", 0, np.float32, shape_out, self.kv[1 - src][i][:n_out].ctypes.data)
        b.bind_output("logits", "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        return b

    def prefill(self, prompt: list[int]) -> tuple[int, float]:
        """Run the prompt; returns (first new token, seconds). The cache lands in buffer 0."""
        t = len(prompt)
        logits = np.empty((1, t, self.lm.vocab), np.float32)  # (1, T, V)
        b = self._bind(np.array([prompt], np.int64), np.arange(t, dtype=np.int64)[None], 0, logits, src=1)
        t0 = time.perf_counter()
        self.lm.sess.run_with_iobinding(b)
        return int(logits[0, -1].argmax()), time.perf_counter() - t0

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy continuation: (tokens, prefill seconds, decode seconds for `new_tokens` steps)."""
        if len(prompt) + new_tokens > self.max:
            raise ValueError(f"prompt + new tokens ({len(prompt) + new_tokens}) exceed the buffers ({self.max})")
        token, prefill_s = self.prefill(prompt)
        out, src = [], 0
        t0 = time.perf_counter()
        for step in range(new_tokens):
            out.append(token)
            past = len(prompt) + step
            self.ids[0, 0], self.pos[0, 0] = token, past
            b = self._bind(self.ids, self.pos, past, self.step_logits, src)
            self.lm.sess.run_with_iobinding(b)
            token, src = int(self.step_logits[0, 0].argmax()), 1 - src
        return out, prefill_s, time.perf_counter() - t0


def measure_latency(lm: OnnxLM, prompt_ids: list[int], decode_tokens: int, warmup: int, runs: int) -> dict:
    """Prefill ms for the prompt and greedy decode tokens/s after it (batch 1, KV cache): medians,
    the same quantities as compress.evaluate.measure_latency measures for PyTorch."""
    dec = Decoder(lm, len(prompt_ids) + decode_tokens)
    for _ in range(warmup):
        dec.generate(prompt_ids, decode_tokens)
    prefill_s = statistics.median(dec.prefill(prompt_ids)[1] for _ in range(runs))
    tok_s = statistics.median(decode_tokens / dec.generate(prompt_ids, decode_tokens)[2] for _ in range(runs))
    return {"prefill_ms": prefill_s * 1000, "decode_tok_s": tok_s}
