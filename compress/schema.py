"""Structured config schemas, registered in Hydra's ConfigStore.

Every YAML file under `configs/` is merged into these dataclasses, so a key that
is not declared here, or a value of the wrong type, fails when the config is
composed, before any model is loaded. Each field has its documentation string
right under it (the litgpt convention); `compress presets` and the README point here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    """Build a model with random weights and this shape instead of loading one."""
    architecture: str = "llama"
    """The model class of a random model (`random`): llama, mistral, qwen2, qwen3, phi3 or gemma2, each the
    real transformers class at a tiny shape."""
    dtype: str = "auto"
    """auto (bf16 on a GPU that supports it; on the CPU, the fastest of `eval.cpu_dtypes`, measured), float32,
    bfloat16 or float16."""
    attn_implementation: Optional[str] = None
    """sdpa or eager; None: on the CPU the faster of the two for this model, measured (`eval.calibrate`),
    else transformers' default."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its author."""
    allow_pickle: bool = False
    """Accept pickle weights (.bin/.pt); they are then loaded with `weights_only=True`."""


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input. Off by default: on a CPU the dropout masks (a Bernoulli draw on the
    input of each of the 210 adapters of SmolLM2-135M) took half of a QLoRA step: 100 steps ran 2:48 without
    them against 5:59 with 0.05, and the fine-tuned teacher scored 0.848 against 0.846 (one run each)."""
    target_modules: Optional[List[str]] = None
    """Module names to adapt; None means every linear projection of the architecture."""


@dataclass
class QuantSettings:
    """4-bit quantization of the frozen base for QLoRA (bitsandbytes)."""

    quant_type: str = "nf4"
    """nf4 (NormalFloat4, as in QLoRA) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bit per parameter)."""
    compute_dtype: str = "auto"
    """dtype of the 4-bit matmuls: auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16."""


@dataclass
class TeacherConfig(ModelConfig):
    """A teacher and how `finetune_teacher` adapts it."""

    method: str = "qlora"
    """qlora (4-bit NF4 base + LoRA), lora (LoRA on the full-precision base) or full."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """Adapter settings for qlora and lora."""
    quant: QuantSettings = field(default_factory=QuantSettings)
    """4-bit settings for qlora."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more time."""


@dataclass
class StudentConfig(ModelConfig):
    """A student: a model of its own (`hub_id`/`path`/`random`) or layers of the teacher."""

    from_teacher: bool = False
    """Build the student from the teacher: embeddings, final norm, head and a subset of layers."""
    keep_layers: Any = None
    """Teacher layer indices to keep (0-based); None keeps every `keep_every`-th layer; `auto` keeps as many
    (ceil(layers / keep_every)), chosen by importance: the layers whose removal raises the teacher's LM loss
    on `calibration_examples` training sequences the most (Minitron's depth pruning)."""
    keep_every: int = 3
    """With `keep_layers` unset, keep layers 0, k, 2k, ... (DistilBERT-style initialisation)."""
    calibration_examples: int = 16
    """With `keep_layers=auto`: training sequences (prompt and gold answer) the importance is measured on
    (one teacher forward over them per layer, once per teacher: about 2 minutes for SmolLM2 on 2 cores)."""


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
    """Field or column that holds the label; every label needs an entry in `verbalizers` (without
    `choices_field`: the labels are then the task's shared choices)."""
    choices_field: Optional[str] = None
    """jsonl/csv: field holding each example's own list of choices (multiple choice whose options differ
    per example); `label_field` then holds the correct choice, as its text or its 0-based index in the list.
    Each choice is scored as " " + choice unless `verbalizers` names it. None: labels shared by all examples."""
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
    target_field: Optional[str] = None
    """jsonl: the field holding a generative task's reference answer (or list of answers); set, the model
    generates its answer, scored by exact match and F1."""
    group_field: Optional[str] = None
    """jsonl: examples with the same value here (e.g. a shared passage) never land in two splits."""
    metric: str = "accuracy"
    """The task's primary metric, what retention is computed over: accuracy (label tasks), f1 or
    exact_match (generative tasks; SQuAD normalisation, best over the references)."""
    train_size: int = 2000
    """Labelled examples in the `train` split."""
    unlabeled_size: int = 2000
    """Examples in the `unlabeled` split (labels hidden: the transfer set for pseudo-labels)."""
    synthetic_unlabeled: int = 0
    """Inputs the teacher writes itself, added to the `unlabeled` split for distillation (and recovery):
    sampled from prompts of 3 real inputs, de-duplicated, none sharing an 8-word run with an eval input;
    cached in `<run>/cache/`. 0: off. Not for tasks whose examples have their own choices."""
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
    """Score the task (and agreement with the teacher): label tasks by verbalizer log-likelihood,
    generative tasks by greedy generation (exact match, F1)."""
    max_new_tokens: int = 16
    """Generative tasks: the longest answer generated (greedy; it stops at a newline or EOS)."""
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
    """torch intra-op threads while evaluating; None: on the CPU the fastest of 1, half and all of torch's
    default for this model, measured (`calibrate`), else torch's default."""
    calibrate: bool = True
    """On the CPU, time a few forwards of every (threads, attention, dtype) candidate when a model is loaded
    for measurement and use the fastest; cached per model and machine; the choice is in the record."""
    cpu_dtypes: List[str] = field(default_factory=lambda: ["float32"])
    """dtypes the calibration may choose for a model with `dtype: auto` on the CPU; add bfloat16 to let it
    pick bf16 where that is faster (it changes measured accuracy slightly)."""
    calibration_tokens: int = 128
    """Prompt length of the calibration forwards (each also decodes 8 tokens)."""


@dataclass
class OptimConfig:
    """Optimisation of a training stage."""

    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum * devices)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    schedule: str = "cosine"
    """cosine, linear or constant decay after the warm-up."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    val_every: int = 0
    """Validation loss every N steps on `val_size` held-out train examples (0 disables)."""
    val_size: int = 64
    """Train examples held out for validation when `val_every` > 0."""
    max_length: int = 256
    """Longest training sequence in tokens (prompt + answer); longer prompts are cut from the left."""


@dataclass
class FinetuneConfig(OptimConfig):
    """`finetune_teacher`: supervised fine-tuning of the teacher on the train split."""

    name: str = "default"
    """Preset name (`finetune=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""


@dataclass
class DistillConfig(OptimConfig):
    """`distill`: loss = soft_weight * KD_T + pseudo_weight * CE(pseudo) + hard_weight * CE(labels)
    + hidden_weight * (1 - cos(hidden states))."""

    name: str = "default"
    """Preset name (`distill=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    soft_weight: float = 1.0
    """Weight of the soft-label term (divergence to the teacher's temperature-scaled distribution)."""
    pseudo_weight: float = 1.0
    """Weight of cross-entropy on the teacher's own answers for the `unlabeled` split."""
    hard_weight: float = 0.0
    """Weight of cross-entropy on the gold labels of the `train` split."""
    hidden_weight: float = 0.0
    """Weight of intermediate-layer distillation: 1 - cosine between each student layer's output and
    the teacher hidden state it replaces (needs equal hidden sizes, and the teacher on the fly or the
    answer cache of `topk_cache`)."""
    temperature: float = 2.0
    """Softmax temperature of the soft-label term (> 0); the term is scaled by T^2."""
    divergence: str = "forward_kl"
    """forward_kl, reverse_kl or jsd (generalized JSD with `jsd_beta`)."""
    jsd_beta: float = 0.5
    """Mixture weight of the generalized JSD, in (0, 1)."""
    soft_on: str = "all"
    """Positions of the soft-label term: all (every prompt and answer token) or answer."""
    freeze_embeddings: bool = False
    """Keep the student's token embeddings (and an output head tied to them) fixed; only the layers
    and norms train. Faster steps, and a student cut from the teacher keeps the teacher's token space."""
    topk_cache: int = 0
    """If K > 0, compute the teacher's top-K log-probs once into the artifact and train from them. On a
    label task with `soft_on=answer` and `hard_weight=0` they are read off the pseudo-labelling pass, which
    also keeps the teacher's hidden states on each prompt for `hidden_weight` (in host memory; the answer
    tokens then have no hidden-state term): training never runs the teacher."""
    pseudo_max_new_tokens: int = 32
    """Token limit of the teacher's greedy pseudo-label for tasks without verbalizers (data=text)."""
    pseudo_batch_size: int = 32
    """Prompts per teacher forward in the pseudo-labelling pass (its top-K and hidden states come from the
    same forwards). The pass runs no backward, so it takes larger batches than training: on 2 cores 32 ran
    1.25x faster than 8 (the default teacher, 400 reviews)."""
    on_policy_ratio: float = 0.0
    """Fraction of training batches, in [0, 1], on which the student writes each answer itself (sampled at
    `on_policy_temperature`, as many tokens as the teacher's answer) and the soft term is the divergence to
    the teacher on those tokens; the label terms skip these batches (GKD, Agarwal et al. 2024). For a
    one-token label the student's answer is its own distribution over the first answer token. 0 = off."""
    on_policy_temperature: float = 1.0
    """Sampling temperature of the student's on-policy answers (> 0)."""
    quant_aware_steps: int = 0
    """Quantization-aware distillation: the last N steps train through the int4 weights the export will
    write. Every Linear of the student's decoder computes with its weight rounded as the export's int4
    variant (MatMulNBits, symmetric) rounds it, the gradient passes straight through, and the saved student
    holds the rounded weights, so its int4 form loses nothing more in those weights. 0 = off; more than
    `max_steps` rounds every step. The default preset rounds the last 100 of its 450: the 10-layer student's
    int4 form lost 0.020 to its PyTorch score in one run without them (0.786 against 0.806)."""
    quant_aware_block_size: int = 32
    """Inputs per rounding block of `quant_aware_steps` (a power of 2, >= 16); must equal
    `export.int4_block_size` when the export stage runs."""


@dataclass
class PruneConfig:
    """`prune`: structured pruning of the student (torch-pruning), then recovery distillation.

    Every layer is pruned alike, so the model's config describes the new shapes and the
    pruned model round-trips through `save_pretrained` / `from_pretrained`.
    """

    name: str = "default"
    """Preset name (`prune=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    mlp_ratio: float = 0.5
    """Fraction of each layer's MLP hidden units removed, in [0, 1) (0 keeps the MLP whole)."""
    targets: List[str] = field(default_factory=lambda: ["gate_proj", "up_proj"])
    """Linear layers whose output channels are the MLP's hidden units (module names or name endings);
    the layers that read them (`down_proj`) follow through torch-pruning's dependency graph."""
    heads: str = "none"
    """Attention heads: none, query (the same number of query heads removed from every KV group) or
    kv_groups (whole KV groups with their query heads). Pruned heads write `head_dim` into the config;
    optimum's ONNX export derives head_dim = hidden_size / heads instead, so keep `none` to export."""
    head_ratio: float = 0.0
    """Fraction removed, in [0, 1): of the query heads of each KV group (heads=query) or of the KV
    groups (heads=kv_groups); rounded to whole heads."""
    drop_layers: List[int] = field(default_factory=list)
    """Decoder layers (0-based) removed whole."""
    importance: str = "taylor"
    """taylor (first-order: |w * dL/dw| summed over a channel's or head's weights, gradients of the LM
    loss on calibration batches from the train split) or magnitude (the weights' L2 norm)."""
    round_to: int = 64
    """The kept MLP width is a multiple of this (GPTQ's group size must divide every layer's width)."""
    calibration_batches: int = 8
    """Batches of the train split whose gradients give the Taylor importance."""
    calibration_batch_size: int = 4
    """Examples per calibration batch."""
    recovery_steps: int = 60
    """Steps of recovery distillation from the reference teacher (the `distill` loss settings and
    batch size); 0 skips recovery."""
    recovery_lr: float = 2e-4
    """Peak learning rate of the recovery distillation."""


@dataclass
class QuantizeConfig:
    """`quantize`: GPTQ weight-only quantization of the student (GPTQModel, CPU or GPU).

    GPTQ's speed-ups come from GPU kernels; on a CPU it is a size win (the CPU kernels run
    slower than fp32 on this model). The unquantized model is passed on for `export`.
    """

    name: str = "default"
    """Preset name (`quantize=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    bits: int = 4
    """Bits per weight: 2, 3, 4 or 8."""
    group_size: int = 64
    """Weights sharing one scale and zero point along a layer's input; must divide every quantized layer's
    input width (576 is no multiple of 128: SmolLM2 needs 64 or 32), or -1 for one group per row."""
    desc_act: bool = False
    """Quantize columns in order of decreasing activation size (act-order): better accuracy, slower kernels."""
    sym: bool = True
    """Symmetric quantization (no zero point offset)."""
    damp_percent: float = 0.05
    """Dampening added to the Hessian's diagonal, as a fraction of its mean, in (0, 1)."""
    calibration_samples: int = 32
    """Train-split prompts (with their gold answers) that calibrate GPTQ's layer-wise reconstruction."""
    calibration_batch_size: int = 4
    """Calibration prompts per forward pass."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by the training stages."""

    name: str = "cpu"
    """Preset name (`trainer=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    accelerator: str = "auto"
    """auto, cpu or gpu."""
    devices: str = "1"
    """Devices per node: a count, a list such as [0,1], or auto."""
    strategy: str = "auto"
    """auto, ddp, fsdp or deepspeed."""
    num_nodes: int = 1
    """Machines taking part."""
    precision: str = "auto"
    """auto: bf16-mixed on a bf16 GPU, and for distillation also on a CPU with native bf16 (AMX or
    AVX512-BF16), else 32-true; or any Lightning precision string (32-true keeps distillation in fp32)."""
    checkpoint_every: int = 50
    """Save a Lightning checkpoint every N optimizer steps (trainable weights only)."""
    log_every: int = 5
    """Log losses every N steps."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""


@dataclass
class ExportConfig:
    """`export`: ONNX export (onnxruntime-genai's model builder, or optimum), parity check against PyTorch,
    int8/int4 CPU variants."""

    name: str = "default"
    """Preset name (`export=NAME`)."""
    description: str = ""
    """One line shown by `compress presets`."""
    variants: List[str] = field(default_factory=lambda: ["fp32", "int8"])
    """Models written and evaluated through onnxruntime: fp32 (always exported), int8 (dynamic
    quantization, int8 weights) and int4 (4-bit weight-only MatMulNBits)."""
    exporter: str = "auto"
    """Who writes the fp32 graph: `builder` (onnxruntime-genai's model builder: fused attention and norms, no
    position_ids input; Llama, Mistral, Qwen2/3, Phi-3, Gemma 1-3, Granite, OLMo and more), `optimum`
    (`text-generation-with-past`: every architecture optimum knows, a graph of small ops), or `auto`: the
    builder, and optimum where the builder fails. On the default 10-layer student the builder's int4 graph
    decoded 1.9x as fast (272 against 141 tok/s, 2 threads), the teacher's int8 graph 1.7x
    (benchmarks/results/default_builder_1203.json)."""
    max_abs_diff: float = 1e-2
    """Parity: the largest allowed |logit(ONNX fp32) - logit(PyTorch)| over the parity prompts."""
    min_top1: float = 0.99
    """Parity: the smallest allowed fraction of token positions where both pick the same top-1 token."""
    parity_prompts: int = 16
    """Eval-split prompts (in the task's prompt format) the parity check runs."""
    threads: Optional[int] = None
    """onnxruntime intra-op threads; None uses `eval.threads`, else torch's thread count (a fair ratio)."""
    graph_optimization: str = "all"
    """onnxruntime graph optimization level: disable, basic, extended or all."""
    int8_per_channel: bool = True
    """int8: one scale per output channel (else one per tensor)."""
    int8_reduce_range: bool = True
    """int8: weights in 7 bits (-64..64) rather than 8. ONNX Runtime's uint8 x int8 kernel on CPUs without
    VNNI (AVX2 only) adds each pair of products in int16, which saturates once an activation's zero point is far
    from 0 and a weight uses the full -127..127: SmolLM2-135M, all but down_proj, on an AVX2-only EPYC, perplexity
    3655 vs 52.4 fp32 (318 tokens of reviews; layer 12's v_proj 196% off, activation zero point 210); in 7 bits
    57.3, the same size (315 MB), on any CPU. False only for CPUs with VNNI, where 8 bits cannot saturate."""
    int8_exclude: List[str] = field(default_factory=lambda: ["down_proj"])
    """int8: MatMul nodes whose name contains one of these stay fp32 (matched as substrings; a pattern
    that matches nothing is an error). On SmolLM2-135M (ppl 119.7 on the eval reviews; 8-bit weights, on a CPU
    that did not saturate): every MatMul 224 (239 MB), all but down_proj 129 (315 MB), all but down_proj and
    lm_head 125 (288 MB). On the
    10-layer student an fp32 lm_head is two thirds of the bytes read per decoded token: keeping it
    fp32 decodes about 1.7x slower than quantizing it."""
    int4_block_size: int = 32
    """int4: weights per quantization block (a power of 2, >= 16)."""
    int4_exclude: List[str] = field(default_factory=lambda: ["lm_head"])
    """int4: MatMul nodes whose name contains one of these stay fp32. On SmolLM2-135M (ppl 119.7 on the
    eval reviews): every MatMul 174 (190 MB), all but lm_head 155 (173 MB: a tied head quantized needs
    its own copy), all but lm_head and down_proj 133 (258 MB)."""
    int4_accuracy_level: int = 4
    """int4: MatMulNBits compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8 (fastest on CPU)."""


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
class ReportConfig:
    """What the results table and the report show besides the pipeline's own models."""

    baselines: bool = True
    """After `export`, export the reference teacher the same way (ONNX fp32 and int8) and measure it: rows
    that answer "was distilling worth it, against just quantizing the teacher?"."""


@dataclass
class Config:
    """The whole job: `compress run` composes this from configs/ and the overrides."""

    run: RunConfig = field(default_factory=RunConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    finetune: FinetuneConfig = MISSING
    distill: DistillConfig = MISSING
    trainer: TrainerConfig = MISSING
    export: ExportConfig = MISSING
    pipeline: PipelineConfig = MISSING
    prune: PruneConfig = MISSING
    quantize: QuantizeConfig = MISSING


GROUPS = ("teacher", "student", "data", "eval", "finetune", "distill", "prune", "quantize", "export", "trainer",
          "pipeline")
"""Config groups, in the order `compress presets` lists them."""


def register() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="compress_schema", node=Config)
