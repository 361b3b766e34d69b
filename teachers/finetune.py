"""Teacher fine-tuning: QLoRA (or LoRA, or full) in a Lightning module; merging the adapter.

QLoRA: the base loads in 4-bit NF4 with double quantization (bitsandbytes), is prepared
with `prepare_model_for_kbit_training`, and trains LoRA adapters (peft) on every linear
projection. The loss counts the answer tokens only (the prompt is masked with -100).
The artifact holds the adapter (peft format) and a merged teacher: the adapter merged
into the de-quantized base, i.e. exactly the function that was trained, in full precision.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch

from compress import training
from compress.errors import CompressError, Problem
from teachers import loading

LORA_TARGETS = {  # model_type -> every linear projection of a decoder layer
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
METHODS = ("qlora", "lora", "full")


class FinetuneModule(L.LightningModule):
    """Causal-LM loss on the answer tokens of prompt+answer batches."""

    def __init__(self, model, ocfg):
        super().__init__()
        self.model, self.ocfg = model, ocfg
        self.strict_loading = False  # checkpoints hold the trainable weights only

    def _loss(self, batch) -> torch.Tensor:
        return answer_loss(self.model, batch)

    def training_step(self, batch, _):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, _):
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self):
        return training.optimizer_and_schedule(self.model.parameters(), self.ocfg, self._trainer)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def answer_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the labelled (answer) tokens, the causal-LM loss transformers computes from
    `labels`:  L = -1/N sum_{(b,t): y[b,t+1] != -100} log softmax(z[b,t])[y[b,t+1]],  N the labelled tokens.

    The output head runs only at the K positions that predict a labelled token in some row
    (`logits_to_keep`), not at every token: on a label task a prompt of ~100 tokens has one or two answer
    tokens, and SmolLM2's head (576 x 49,152) costs a fifth of the teacher's forward at every position.
    The model's own forward still runs (final-logit soft-capping and the like included)."""
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    positions = (targets != -100).any(0).nonzero().flatten()  # (K,)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=positions).logits  # (B, K, V)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, positions].flatten(),
                                             ignore_index=-100)


# --------------------------------------------------------------------------- model preparation


def linear_names(model) -> list[str]:
    """Distinct leaf names of the model's linear layers (what LoRA can target)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) or type(m).__name__.startswith("Linear")}
    return sorted(names)


def lora_targets(model, cfg) -> list[str] | str:
    targets = list(cfg.lora.target_modules) if cfg.lora.target_modules else \
        LORA_TARGETS.get(model.config.model_type, "all-linear")
    if targets == "all-linear":
        return targets
    have = linear_names(model)
    if not set(targets) & set(have):
        raise CompressError(Problem("teacher.lora.target_modules", targets, "no module matched: the model's "
                                    f"linear layers are named {', '.join(have)}"))
    return targets


def check_4bit(device: torch.device) -> None:
    """Fail clearly, naming the alternative, if bitsandbytes cannot run 4-bit here."""
    why = None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "CUDA was asked for (teacher.device) but no GPU is available"
    else:
        try:
            import bitsandbytes.functional as F

            F.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        except Exception as e:  # missing library, no kernel for this device, ...
            why = f"bitsandbytes cannot quantize to 4-bit on {device.type} ({loading.first_line(e)})"
    if why:
        raise CompressError(Problem("teacher.method", "qlora", f"{why}; use teacher.method=lora (LoRA on the "
                                    "full-precision base) or teacher.method=full"))


def compute_dtype(cfg, device: torch.device) -> torch.dtype:
    name = cfg.quant.compute_dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return loading.DTYPES[name]


def bnb_config(cfg, device: torch.device):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant.quant_type,
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg, device))


@contextmanager
def peft_sees_gptqmodel_only_if_imported():
    """Stop peft from importing GPTQModel just to ask whether a layer is a GPTQ layer.

    peft 0.17-0.19 checks every LoRA target against GPTQModel's (and its AWQ) layer classes and
    imports GPTQModel to do so whenever it is installed (the `gptq` extra). That import rewrites
    HF_HOME (to /tmp) and slows every model of the process about 2x. A layer can only be a
    GPTQModel layer if GPTQModel is already imported, so peft is told exactly that.
    """
    from peft.tuners.lora import awq, gptq

    saved = awq.is_gptqmodel_available, gptq.is_gptqmodel_available
    awq.is_gptqmodel_available = gptq.is_gptqmodel_available = lambda: "gptqmodel" in sys.modules
    try:
        yield
    finally:
        awq.is_gptqmodel_available, gptq.is_gptqmodel_available = saved


def trainable_model(folder: Path, cfg):
    """The teacher ready to train with cfg.method; its tokenizer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    device = loading.pick_device(cfg.device)
    tok = loading.load_tokenizer(folder, cfg, "teacher")
    if cfg.method == "qlora":
        check_4bit(device)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(cfg, device),
                                                     dtype=compute_dtype(cfg, device), device_map={"": str(device)},
                                                     trust_remote_code=cfg.trust_remote_code)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model, _ = loading.load(folder, cfg, "teacher")
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    if cfg.method in ("qlora", "lora"):
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(model, cfg), task_type="CAUSAL_LM")
        with peft_sees_gptqmodel_only_if_imported():
            model = get_peft_model(model, lora)
    model.config.use_cache = False
    return model.train(), tok


def merged_teacher(folder: Path, adapter: Path, cfg, dest: Path) -> None:
    """Merge the adapter into the base it was trained on (de-quantized for QLoRA) and save it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu")  # merging needs no accelerator; keeps GPU memory free
    if cfg.method == "qlora":
        base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(cfg, loading.pick_device(
            cfg.device)), dtype=torch.float32, device_map={"": str(loading.pick_device(cfg.device))},
            trust_remote_code=cfg.trust_remote_code)
        base = base.dequantize().to(device=device, dtype=torch.float32)
    else:
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                    trust_remote_code=cfg.trust_remote_code)
    with peft_sees_gptqmodel_only_if_imported():
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.config.use_cache = True
    merged.save_pretrained(dest, safe_serialization=True)
