"""Student construction: a model of its own, or the teacher cut to a subset of its layers."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from compress.errors import CompressError, Problem
from compress.hub import build_once, cache_root, text_hash
from teachers import loading


def resolve(cfg, teacher_dir: Path, dest: Path | None = None, data=None, splits=None) -> Path:
    """A local folder holding the student `cfg` describes.

    A student derived from the teacher is built into `dest`, or when `dest` is None into
    the cache (keyed by the teacher folder and the kept layers). `keep_layers=auto` measures which
    layers to keep on the task (`data`, `splits`: its prompts and answers).
    """
    if not (cfg.from_teacher and not cfg.path):
        return loading.resolve(cfg, "student")
    n = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    if cfg.keep_layers == "auto":
        if splits is None:
            raise CompressError(Problem("student.keep_layers", "auto", "choosing layers by importance needs the "
                                        "task's examples; give a list of layer indices here"))
        texts = calibration_texts(teacher_dir, data, splits, cfg.calibration_examples)
        layers = important_layers(teacher_dir, n_kept(cfg, n), texts)
    else:
        layers = kept_layers(cfg, n)
    return derive_from_teacher(teacher_dir, layers, dest)


def n_kept(cfg, num_layers: int) -> int:
    """How many of the teacher's layers the student keeps."""
    if cfg.keep_layers == "auto":
        return -(-num_layers // cfg.keep_every)
    return len(kept_layers(cfg, num_layers))


def kept_layers(cfg, num_layers: int) -> list[int]:
    """Teacher layer indices the student keeps: `keep_layers`, else 0, k, 2k, ..."""
    layers = list(cfg.keep_layers) if cfg.keep_layers else list(range(0, num_layers, cfg.keep_every))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers) or not layers:
        raise CompressError(Problem("student.keep_layers", layers, f"need distinct layer indices in "
                                    f"[0, {num_layers - 1}] (the teacher has {num_layers} layers)"))
    return sorted(layers)


def calibration_texts(teacher_dir: Path, data, splits, n: int) -> list[str]:
    """Up to n training sequences as the model reads them: the prompt and its gold answer (the train split),
    else the prompt alone (the unlabeled split)."""
    from transformers import AutoTokenizer

    from compress.evaluate import build_prompt

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    examples = (splits.train or splits.unlabeled)[:n]
    return [build_prompt(tok, e.text, data) + splits.answer(e) for e in examples]


def important_layers(teacher_dir: Path, n_keep: int, texts: list[str]) -> list[int]:
    """The `n_keep` decoder layers whose removal costs the most, in order (Minitron's depth importance).

    importance(i) = LM loss on `texts` with layer i skipped - LM loss with every layer,
    each measured once on the whole teacher. Scores and choice are cached per teacher folder
    and texts in `<cache>/layer_importance/` and printed.
    """
    from compress.console import say

    key = text_hash(json.dumps([loading.folder_fingerprint(teacher_dir), texts]))[:16]
    path = cache_root() / "layer_importance" / f"{teacher_dir.name}-{key}.json"
    if path.exists():
        scores = json.loads(path.read_text())["importance"]
    else:
        scores = layer_importance(teacher_dir, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps({"teacher": str(teacher_dir), "texts": len(texts), "importance": scores}))
        tmp.rename(path)
    keep = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:n_keep])
    say(f"  student layers by importance (LM loss increase when dropped, {len(texts)} examples): kept {keep}; "
        f"least important dropped: {sorted(range(len(scores)), key=lambda i: scores[i])[:3]}")
    return keep


def layer_importance(teacher_dir: Path, texts: list[str], batch_size: int = 8) -> list[float]:
    """Per decoder layer: mean next-token loss on `texts` without that layer minus with all of them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.console import progress

    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    batches = [tok(texts[i: i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=256)
               for i in range(0, len(texts), batch_size)]
    decoder = model.get_decoder()
    layers = decoder.layers

    @torch.inference_mode()
    def loss() -> float:
        total, count = 0.0, 0
        for enc in batches:
            ids, attn = enc["input_ids"], enc["attention_mask"]  # (B, T)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1]  # (B, T-1, V)
            target = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten(),
                                                       ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
        return total / max(count, 1)

    scores = []
    with progress() as bar:
        task = bar.add_task("teacher: layer importance", total=len(layers) + 1)
        base = loss()
        bar.advance(task)
        try:
            for i in range(len(layers)):
                decoder.layers = torch.nn.ModuleList([m for j, m in enumerate(layers) if j != i])
                scores.append(loss() - base)
                bar.advance(task)
        finally:
            decoder.layers = layers
    return scores


def derive_from_teacher(teacher_dir: Path, layers: list[int], dest: Path | None = None) -> Path:
    """Copy embeddings, final norm, head and the kept decoder layers (renumbered) into a new folder."""
    from safetensors.torch import load_file, save_file

    config = json.loads((teacher_dir / "config.json").read_text())

    def build(tmp: Path) -> None:
        renumber = {old: new for new, old in enumerate(layers)}
        state = {}
        for f in sorted(teacher_dir.glob("*.safetensors")):
            for name, tensor in load_file(f).items():
                new_name = _renumber(name, renumber)
                if new_name is not None:
                    state[new_name] = tensor.contiguous()
        if not any(".layers." in k for k in state):
            raise CompressError(Problem("student.from_teacher", True, "the teacher's decoder layers are not "
                                        "named `model.layers.N`; derive-from-teacher supports Llama-style "
                                        "models only: choose a student preset with its own weights"))
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config["num_hidden_layers"] = len(layers)
        if isinstance(config.get("layer_types"), list):
            config["layer_types"] = [config["layer_types"][i] for i in layers]
        config["compress_kept_layers"] = layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in teacher_dir.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "generation_config",
                                                   "chat_template", "vocab", "merges"))):
                shutil.copy2(f, tmp / f.name)

    if dest is not None:  # built once: a resumed stage, or another rank, finds it complete
        return build_once(dest, build)
    key = text_hash(json.dumps([loading.folder_fingerprint(teacher_dir), layers]))[:16]
    return build_once(cache_root() / "students" / f"{teacher_dir.name}-L{len(layers)}-{key}", build)


def _renumber(name: str, renumber: dict[int, int]) -> str | None:
    """`model.layers.6.mlp...` -> `model.layers.2.mlp...`; None for a dropped layer."""
    parts = name.split(".")
    if "layers" not in parts:
        return name
    i = parts.index("layers") + 1
    old = int(parts[i])
    if old not in renumber:
        return None
    parts[i] = str(renumber[old])
    return ".".join(parts)
