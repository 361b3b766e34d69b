"""The one measurement record, and the figures derived from a run's records.

A `Record` is one model measured by one backend in one stage. Stages build them with
`Record.of` (raw measurements only); `relate` then sets the derived figures, retention,
retention over the base teacher, speed-up and the bootstrap intervals, for a whole run at once, in one place.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from compress import stats

DERIVED = ("retention", "retention_base", "speedup", "perplexity_ratio", "score_ci", "retention_ci")
"""The fields `relate` sets; a measurement never does."""

@dataclass
class Record:
    """One model, one backend, one stage: what was measured, and what it is."""

    stage: str
    """The pipeline stage that measured it (`evaluate`, `distill`, ...; `eval` for `compress eval`)."""
    role: str
    """`teacher` or `student`: which side of the distillation the model is on."""
    model: str
    """The name the user gave the model (its preset, folder or GGUF name)."""
    backend: str = "torch"
    """What ran it: `torch`, `gptq` (GPTQModel kernels), `onnxruntime`, `llama.cpp`."""
    variant: str = ""
    """Which form of the model: `base`, `qlora`, `pruned`, `recovered`, `gptq`, `onnx-int8`, ... (empty: as built)."""
    output: bool = True
    """True when this is a model the stage hands on (False: an intermediate, e.g. pruned before recovery, or a
    baseline, e.g. the reference teacher exported to ONNX by `export`)."""
    path: str | None = None
    """The folder (or file) measured."""
    accuracy: float | None = None
    """Label tasks: the fraction of eval examples whose best-scoring choice is the gold one."""
    exact_match: float | None = None
    """Generative tasks: the fraction of answers equal to a reference (SQuAD normalisation)."""
    f1: float | None = None
    """Generative tasks: token F1 of each answer against its best reference, averaged."""
    metric: str = "accuracy"
    """The task's primary metric (accuracy, f1 or exact_match): what retention divides."""
    agreement: float | None = None
    """Label tasks: the fraction of eval examples where its prediction equals the reference teacher's;
    generative tasks: the F1 of its answers against the teacher's."""
    example_scores: list[float] | None = None
    """Per eval example, in eval order, its score on the primary metric (1/0 for accuracy and exact_match, F1
    rounded to 4 decimals): what the intervals and the gate's paired test resample. None in runs made before
    they were kept."""
    perplexity: float | None = None
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    size_mb: float | None = None
    params: int | None = None
    peak_mem_mb: float | None = None
    eval_s: float | None = None
    stage_wall_s: float | None = None
    retention: float | None = None
    """primary metric / the reference teacher's (the last teacher measured); set by `relate`."""
    retention_base: float | None = None
    """primary metric / the base teacher's (of `evaluate`); set by `relate`."""
    score_ci: list[float] | None = None
    """[low, high]: the 95% bootstrap interval of the primary metric (`metric`: accuracy, f1 or exact_match;
    the interval of `score`) over the eval examples; set by `relate` (None without `example_scores`)."""
    retention_ci: list[float] | None = None
    """[low, high]: the 95% paired bootstrap interval of retention (each resample of the examples divides the
    record's mean score by the reference teacher's on the same examples); set by `relate`."""
    speedup: float | None = None
    """decode tok/s / the base teacher's, measured in the same run; set by `relate`."""
    perplexity_ratio: float | None = None
    """perplexity / the reference teacher's: how much of its language ability survived (1 = all; a student
    at 1e6 no longer writes text); set by `relate`."""
    extra: dict = field(default_factory=dict)
    """Stage-specific figures (parity, quantization time, notes), flattened into the JSON."""

    @classmethod
    def of(cls, stage: str, role: str, model: str, measured: dict, **what) -> "Record":
        """A record from a measurement dict (`evaluate_fns` and friends); unknown keys go to `extra`."""
        known = {f.name for f in fields(cls)} - {"extra", *DERIVED}
        data = {**measured, **what}
        data.pop("predictions", None)
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(stage=stage, role=role, model=model, **{k: v for k, v in data.items() if k in known},
                   extra=extra)

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        """A record as results.json or metrics.json hold it (flat)."""
        d = dict(d)
        role = str(d.get("role", "student"))
        if "variant" not in d:  # a record written before roles were explicit
            model = str(d.get("model", ""))
            if role.startswith("student-"):  # student-pruned, student-recovered, student-gptq
                d["variant"], d["role"] = role.split("-", 1)[1], "student"
                d.setdefault("output", d["variant"] != "pruned")
            elif model.startswith("student-onnx-"):
                d["variant"] = model[len("student-"):]
            elif role == "teacher" and ":" in model:  # name:method of a fine-tuned teacher
                d["model"], d["variant"] = model.split(":", 1)
            elif role == "teacher" and d.get("stage") == "evaluate":
                d["variant"] = "base"
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}

    @property
    def score(self) -> float | None:
        """The task's primary metric, as measured (None: not measured)."""
        return getattr(self, self.metric, None)

    @property
    def label(self) -> str:
        """`stage role:model (variant) [backend]`, as tables and the gate name a record."""
        variant = f" ({self.variant})" if self.variant else ""
        return f"{self.stage} {self.role}:{self.model}{variant} [{self.backend}]"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def relate(records: list[Record]) -> dict:
    """Set retention, retention_base, speedup, perplexity_ratio, score_ci and retention_ci of every record (in
    place), against this run's teachers: the reference is the last teacher measured (with an accuracy, if any
    has one), the base the `evaluate` stage's. The intervals need `example_scores` (None without).
    Returns both teachers' identities for the results header."""
    teachers = [r for r in records if r.role == "teacher" and r.output]  # not the teacher baselines of export
    base = next((r for r in teachers if r.stage == "evaluate"), teachers[0] if teachers else None)
    ref = next((r for r in reversed(teachers) if r.score is not None), teachers[-1] if teachers else None)
    for r in records:
        r.retention = ratio(r.score, ref.score) if ref else None
        r.perplexity_ratio = ratio(r.perplexity, ref.perplexity) if ref else None
        r.retention_base = ratio(r.score, base.score) if base else None
        r.speedup = ratio(r.decode_tok_s, base.decode_tok_s) if base else None
        r.score_ci = stats.mean_ci(r.example_scores)
        r.retention_ci = stats.ratio_ci(r.example_scores, ref.example_scores) if ref else None
    who = lambda r: None if r is None else {k: getattr(r, k) for k in ("stage", "model", "variant", "backend",  # noqa: E731
                                                                        "metric", "accuracy", "f1", "decode_tok_s")}
    return {"reference": who(ref), "base_teacher": who(base)}
