"""`compress plan`: peak memory of the teacher fine-tune (full / LoRA / QLoRA, gradient
checkpointing off and on) and of one distillation step, from the models' shapes and the
configured batch and sequence length; which of them fit a given memory.

Shapes come from config.json (a local `path`, the hub cache, or the random shape), else from
the table of known architectures below; nothing is downloaded. Estimates, per device
(DDP keeps a full copy per device; FSDP/DeepSpeed sharding divides weights, gradients and
optimizer states by the device count, activations not):

- weights: parameters x bytes of the dtype (QLoRA: linear layers in NF4 with double-quantized
  constants, 0.516 bytes each; embeddings, norms and head in fp32 after
  `prepare_model_for_kbit_training`);
- gradients and AdamW states (m, v) in the dtype of the trained parameters (LoRA adapters: fp32);
- activations kept for the backward pass, per token and layer: 7 h + 2 kv + 4 i values (norm
  inputs and outputs, q/k/v, attention output, the four MLP tensors; SDPA attention keeps no
  T x T matrix); with gradient checkpointing only each layer's input plus one layer's set;
- logits: B x T x V in the compute dtype, plus fp32 copies for the log-softmax and its gradient;
- runtime: 0.5 GB for the CUDA context and kernels (on CPU: the Python libraries).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from compress.errors import CompressError, Problem

GB = 1024**3
RUNTIME = 0.5 * GB
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit value + 8-bit absmax per 64 + fp32 per 256 absmax blocks

KNOWN = {  # hub id -> numbers from its config.json, so planning needs no download
    "meta-llama/Llama-2-7b-hf": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000,
                                     tied=False),
    "meta-llama/Llama-2-13b-hf": dict(layers=40, hidden=5120, intermediate=13824, heads=40, kv_heads=40,
                                      vocab=32000, tied=False),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4,
                                               vocab=32000, tied=False),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3,
                                                vocab=49152, tied=True),
}


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv(self) -> int:
        """Width of the key (and of the value) projection."""
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear projection of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, head (unless tied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets) -> int:
        chosen = self.linears() if not targets else {k: v for k, v in self.linears().items() if k in targets}
        return self.layers * sum(r * (a + b) for a, b in chosen.values())

    def act_per_token_layer(self) -> int:
        """Values one decoder layer keeps per token for the backward pass."""
        return 7 * self.hidden + 2 * self.kv + 4 * self.intermediate


def shape(mcfg, role: str, teacher: Shape | None = None) -> Shape:
    """The architecture of a model config, without downloading anything."""
    if role == "student" and mcfg.from_teacher and not mcfg.path and teacher is not None:
        from students.build import n_kept

        return Shape(**{**teacher.__dict__, "layers": n_kept(mcfg, teacher.layers)})
    if mcfg.path and (Path(mcfg.path).expanduser() / "config.json").is_file():
        return _from_config(json.loads((Path(mcfg.path).expanduser() / "config.json").read_text()))
    if mcfg.random is not None:
        r = mcfg.random
        return Shape(r.num_layers, r.hidden_size, r.intermediate_size, r.num_heads, r.num_kv_heads, 259, False)
    if mcfg.hub_id in KNOWN:
        return Shape(**KNOWN[mcfg.hub_id])
    if mcfg.hub_id:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(mcfg.hub_id, "config.json", revision=mcfg.revision)
        if isinstance(cached, str):
            return _from_config(json.loads(Path(cached).read_text()))
    raise CompressError(Problem(f"{role}.hub_id", mcfg.hub_id, "unknown architecture and no config.json here: "
                                f"set {role}.path= a model folder with config.json (nothing is downloaded)"))


def _from_config(c: dict) -> Shape:
    c = c.get("text_config", c)
    heads = c["num_attention_heads"]
    return Shape(c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"], heads,
                 c.get("num_key_value_heads") or heads, c["vocab_size"], bool(c.get("tie_word_embeddings", False)))


def parse_size(text: str) -> float:
    """'24GB', '24 GiB', '80g', '512MB' -> bytes (GB taken as GiB, as nvidia-smi shows them)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([GMT]?)(i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise CompressError(Problem("--gpu-mem", text, "write a size such as 24GB, 80GB or 512MB"))
    return float(m.group(1)) * {"": GB, "G": GB, "M": 1024**2, "T": 1024**4}[m.group(2).upper()]


def _activations(s: Shape, tokens: int, width: int, checkpointing: bool) -> float:
    per_layer = tokens * s.act_per_token_layer() * width
    if checkpointing:  # each layer's input, plus one layer recomputed at a time
        return s.layers * tokens * s.hidden * width + per_layer
    return s.layers * per_layer


def _logits(s: Shape, tokens: int, width: int) -> float:
    return tokens * s.vocab * (width + 4 + 4)  # logits, fp32 log-softmax, its gradient


def finetune_rows(cfg, s: Shape, width: int, runtime: float) -> list[dict]:
    """Peak memory of teacher fine-tuning by method and gradient checkpointing."""
    t, o = cfg.teacher, cfg.finetune
    tokens = o.batch_size * o.max_length
    p, lora = s.params(), s.lora_params(t.lora.r, t.lora.target_modules)
    rows = []
    for method in ("full", "lora", "qlora"):
        if method == "full":
            weights, grads, optim = p * width, p * width, 2 * p * width
        elif method == "lora":
            weights, grads, optim = p * width + lora * 4, lora * 4, 2 * lora * 4
        else:
            weights = s.linear_params() * NF4_BYTES + s.other_params() * 4 + lora * 4
            grads, optim = lora * 4, 2 * lora * 4
        for gc in (False, True):
            act = _activations(s, tokens, width, gc)
            rows.append({"what": f"finetune {method}", "checkpointing": gc, "weights": weights, "grads": grads,
                         "optimizer": optim, "activations": act, "logits": _logits(s, tokens, width),
                         "runtime": runtime})
    return rows


def distill_row(cfg, t: Shape, s: Shape, width: int, runtime: float) -> dict:
    """One distillation step: frozen teacher (forward only) + student with gradients and AdamW."""
    d = cfg.distill
    tokens = d.batch_size * d.max_length
    p = s.params()
    topk = d.topk_cache > 0 and d.soft_weight > 0
    teacher_w = 0 if topk else t.params() * width
    teacher_fwd = 0 if topk else tokens * (t.act_per_token_layer() * width + t.vocab * (width + 4))  # one layer + logits
    return {"what": "distill" + (" (top-K cache)" if topk else ""), "checkpointing": False,
            "weights": teacher_w + p * width, "grads": p * width, "optimizer": 2 * p * width,
            "activations": _activations(s, tokens, width, False) + teacher_fwd,
            "logits": _logits(s, tokens, width) + (tokens * s.vocab * 8 if d.soft_weight > 0 else 0),
            "runtime": runtime}


def plan(cfg, device: str) -> dict:
    """Rows of estimates (bytes) for `device` ('cpu' or 'cuda'), with the shapes used."""
    t = shape(cfg.teacher, "teacher")
    s = shape(cfg.student, "student", t)
    gpu = device.startswith("cuda")
    width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.teacher.dtype, 2 if gpu else 4)
    s_width = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.student.dtype, 2 if gpu else 4)
    rows = finetune_rows(cfg, t, width, RUNTIME) + [distill_row(cfg, t, s, s_width, RUNTIME)]
    for r in rows:
        r["total"] = sum(r[k] for k in ("weights", "grads", "optimizer", "activations", "logits", "runtime"))
    return {"device": "cuda" if gpu else "cpu", "teacher": t, "student": s, "rows": rows,
            "teacher_params": t.params(), "student_params": s.params()}


def table(result: dict, mem: float | None, cfg):
    from rich.table import Table

    gb = lambda x: f"{x / GB:.2f}"  # noqa: E731
    title = (f"memory plan on {result['device']}: teacher {cfg.teacher.name} ({result['teacher_params'] / 1e9:.2f} B "
             f"params), student {cfg.student.name} ({result['student_params'] / 1e9:.2f} B); finetune batch "
             f"{cfg.finetune.batch_size} x {cfg.finetune.max_length} tokens, distill batch {cfg.distill.batch_size} x "
             f"{cfg.distill.max_length}; GiB per device")
    tab = Table(title=title)
    cols = ["what", "grad ckpt", "weights", "grads", "optimizer", "activations", "logits", "runtime", "total"]
    for c in cols + (["fits " + f"{mem / GB:.0f} GiB"] if mem else []):
        tab.add_column(c, justify="left" if c in ("what", "grad ckpt") else "right")
    for r in result["rows"]:
        cells = [r["what"], "on" if r["checkpointing"] else "off"] + \
                [gb(r[k]) for k in ("weights", "grads", "optimizer", "activations", "logits", "runtime", "total")]
        if mem:
            cells.append("[green]yes[/]" if r["total"] <= mem else "[red]no[/]")
        tab.add_row(*cells)
    return tab


def verdict(result: dict, mem: float, cfg) -> str:
    fits = [r for r in result["rows"] if r["total"] <= mem and r["what"].startswith("finetune")]
    methods = []
    for r in fits:
        name = r["what"].split()[1] + (" + gradient checkpointing" if r["checkpointing"] else "")
        if r["what"].split()[1] not in [m.split()[0] for m in methods]:
            methods.append(name)
    distill = next(r for r in result["rows"] if r["what"].startswith("distill"))
    head = f"in {mem / GB:.0f} GiB per device: "
    ft = ("teacher fine-tuning fits with " + ", ".join(methods)) if methods else \
        "no fine-tuning method fits; use more or larger devices, a shorter finetune.max_length or a smaller batch"
    current = next(r for r in result["rows"] if r["what"] == f"finetune {cfg.teacher.method}"
                   and r["checkpointing"] == cfg.teacher.gradient_checkpointing)
    now = f" (configured: teacher.method={cfg.teacher.method}, {current['total'] / GB:.1f} GiB: " + \
          ("fits)" if current["total"] <= mem else "does not fit)")
    ds = "; distillation fits" if distill["total"] <= mem else \
        "; distillation does not fit: try distill.topk_cache=64 (teacher not loaded) or a smaller distill.batch_size"
    return head + ft + now + ds
