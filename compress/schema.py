"""Structured config schemas, registered in Hydra's ConfigStore.

Every YAML file under `configs/` is merged into these dataclasses, so a key that
is not declared here, or a value of the wrong type, fails when the config is
composed, before any model is loaded. Each field has its documentation string
right under it (the litgpt convention); `compress presets` and the README point here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RandomInit:
    """Shape of a Llama model built locally with random weights (no download)."""

    num_layers: int = 2
    """Decoder layers."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_heads: int = 4
    """Query heads; must divide `hidden_size`."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide `num_heads`."""
    intermediate_size: int = 128
    """Width of the MLP's hidden layer."""
    max_positions: int = 2048
    """Longest sequence the model accepts (prompts are byte-level tokens here)."""
    seed: int = 0
    """Seed of the random weights: the same seed and shape give the same model."""


@dataclass
class ModelConfig:
    """Where a model comes from and how it is loaded.

    Resolution order: `path` (a local folder or a .gguf file) if set, else `random`
    if set, else `hub_id` (with the bundled GGUF as the offline fallback if
    `gguf_package` is set).
    """

    name: str = MISSING
    """Preset name, as selected on the command line (`teacher=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    hub_id: Optional[str] = None
    """Model id on the Hugging Face Hub, e.g. `meta-llama/Llama-2-7b-hf`."""
    revision: Optional[str] = None
    """Hub branch, tag or commit; None for the default branch."""
    path: Optional[str] = None
    """A local model folder (Hugging Face format) or a `.gguf` file; overrides `hub_id`."""
    gguf_package: Optional[str] = None
    """Python package that ships a GGUF copy of this model, used when the hub is unreachable."""
    gguf_file: Optional[str] = None
    """File name of that GGUF copy inside `gguf_package`."""
    random: Optional[RandomInit] = None
    """Build a Llama model with random weights and this shape instead of loading one."""
    dtype: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its author."""
    allow_pickle: bool = False
    """Accept pickle weights (.bin/.pt); they are then loaded with `weights_only=True`."""


@dataclass
class StudentConfig(ModelConfig):
    """A student: a model of its own (`hub_id`/`path`/`random`) or layers of the teacher."""

    from_teacher: bool = False
    """Build the student from the teacher: embeddings, final norm, head and a subset of layers."""
    keep_layers: Optional[List[int]] = None
    """Teacher layer indices to keep (0-based); None keeps every `keep_every`-th layer."""
    keep_every: int = 3
    """With `keep_layers` unset, keep layers 0, k, 2k, ... (DistilBERT-style initialisation)."""


@dataclass
class DataConfig:
    """A task: labelled texts scored by verbalizer log-likelihood, plus text for perplexity."""

    name: str = MISSING
    """Preset name (`data=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    format: str = "jsonl"
    """rotten_tomatoes, bigbench (a BIG-bench task.json), jsonl, csv or text (perplexity only)."""
    hub_id: Optional[str] = None
    """Dataset id on the Hugging Face Hub, used when `path` is unset and the hub is reachable."""
    path: Optional[str] = None
    """Local data file; overrides `hub_id` and any bundled fallback."""
    text_field: str = "text"
    """Field (jsonl) or column (csv) that holds the input text."""
    label_field: str = "label"
    """Field or column that holds the label; every label needs an entry in `verbalizers`."""
    verbalizers: Dict[str, str] = field(default_factory=dict)
    """Label -> the words the model should continue with, e.g. fresh: ' positive'."""
    instruction: str = "{text}"
    """User message; `{text}` is replaced by the (truncated) input text."""
    answer_prefix: str = ""
    """Text after the chat template's assistant turn begins, before the verbalizer."""
    use_chat_template: bool = True
    """Wrap the instruction in the tokenizer's chat template when it has one."""
    max_chars: int = 400
    """Inputs are cut to this many characters (at a word boundary) before prompting."""
    train_size: int = 2000
    """Labelled examples in the `train` split."""
    unlabeled_size: int = 2000
    """Examples in the `unlabeled` split (labels hidden: the transfer set for pseudo-labels)."""
    eval_size: int = 500
    """Labelled examples in the `eval` split, never seen in training."""
    perplexity_path: Optional[str] = None
    """Plain-text file for perplexity; None uses the `eval` split's texts."""
    seed: int = 1234
    """Seed of the shuffle that makes the splits; the same seed gives the same splits."""


@dataclass
class EvalConfig:
    """What is measured after every stage, and how."""

    name: str = "default"
    """Preset name (`eval=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    batch_size: int = 8
    """Sequences per forward pass when scoring accuracy and perplexity."""
    accuracy: bool = True
    """Score task accuracy (and agreement with the teacher) by verbalizer log-likelihood."""
    perplexity: bool = True
    """Measure perplexity on held-out text."""
    perplexity_blocks: int = 16
    """Number of held-out text blocks scored for perplexity."""
    perplexity_block_tokens: int = 128
    """Tokens per perplexity block."""
    latency: bool = True
    """Measure prefill time and decode speed (batch 1, greedy)."""
    prefill_tokens: int = 128
    """Prompt length for the prefill timing."""
    decode_tokens: int = 64
    """New tokens generated for the decode timing."""
    warmup_runs: int = 1
    """Untimed runs before timing."""
    latency_runs: int = 5
    """Timed runs; the median is reported."""
    threads: Optional[int] = None
    """torch intra-op threads while evaluating; None keeps torch's default."""


@dataclass
class PipelineConfig:
    """Which stages run, in order."""

    name: str = MISSING
    """Preset name (`pipeline=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    stages: List[str] = field(default_factory=list)
    """Stage names from the stage table (`compress presets` lists them)."""


@dataclass
class RunConfig:
    """Where a run's artifacts go."""

    root: str = "runs"
    """Folder that holds runs."""
    name: Optional[str] = None
    """Run folder name under `root`; None uses a timestamp. Rerun with the same name to resume."""
    seed: int = 0
    """Global seed for torch and python."""


@dataclass
class Config:
    """The whole job: `compress run` composes this from configs/ and the overrides."""

    run: RunConfig = field(default_factory=RunConfig)
    teacher: ModelConfig = MISSING
    student: StudentConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    pipeline: PipelineConfig = MISSING


GROUPS = ("teacher", "student", "data", "eval", "pipeline")
"""Config groups, in the order `compress presets` lists them."""


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="compress_schema", node=Config)
