"""pipeline.yaml as typed data: dataclasses filled from YAML and validated before anything trains.

Unknown keys, wrong types, unknown stage names and missing data files stop the run with a
``ConfigError`` that names the file and the dotted key. A profile overrides the base document by deep
merge; its ``stages`` mapping is keyed by stage name.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_blends.blend import BlendSpec, load_blend
from stages.schema import ConfigError, from_dict

@dataclass
class ModelSpec:
    name: str  # a layout in model.configs (random init) or a checkpoint path / hub name
    tokenizer: str | None = None  # path or hub name; None: the checkpoint's own, or trained locally for a layout
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer_vocab_size: int = 512  # only for a locally trained tokenizer


@dataclass
class TrainerSpec:
    """The subset of TRL/transformers training arguments a stage exposes (passed through by name)."""
    max_steps: int
    learning_rate: float = 1e-3
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    bf16: bool = False
    gradient_checkpointing: bool = False
    packing: bool = False
    group_by_length: bool = True  # batches of similar length: less padding, same per-token math
    dataloader_num_workers: int = 0


@dataclass
class EvalSpec:
    sources: list[str] = field(default_factory=lambda: ["math", "science", "code", "ifeval", "safety"])
    modes: list[Literal["think", "no_think"]] = field(default_factory=lambda: ["think", "no_think"])
    n_per_source: int = 50
    max_new_tokens: int = 160
    max_length: int = 1024  # longest prompt the eval engine takes
    batch_size: int = 64
    seed: int = 1234
    # Besides the greedy answer, the mean reward of this many samples per prompt (0: none). Greedy shows
    # only each prompt's most likely reply; RL moves probabilities, which sampling sees before the argmax
    # flips, and k samples per prompt average out the noise of one draw.
    samples: int = 0
    sample_temperature: float = 0.8


@dataclass
class GRPOSpec:
    """GRPO settings beyond the trainer's; names follow TRL's GRPOConfig where they map onto it."""
    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    thinking_budget: int | None = None  # the engine closes </think> itself after this many thinking tokens
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None  # DAPO's clip-higher; None: same as epsilon
    beta: float = 0.0  # KL coefficient; 0 loads no reference model
    importance_sampling: bool = True  # correct for engine-vs-trainer log-probability differences
    importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate",
                                      "sequence_mask"] = "token_truncate"
    importance_sampling_cap: float = 2.0
    mask_truncated_completions: bool = True
    dynamic_sampling: bool = True  # replace groups whose rewards are all equal with fresh prompts
    max_resample_rounds: int = 3
    engine_max_batch: int = 64
    length_groups: int = 4  # the training forward runs rows of similar length together, split to pad the least
    share_prompts: bool = True  # the training forward runs each distinct prompt once for all rows that carry it


@dataclass
class RPOSpec:
    """Reward-aware preference optimization in rounds; each round's final policy is the next reference."""
    loss: Literal["dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl"] = "rpo_bwd_kl"
    beta: float = 0.1  # β: KL strength
    eta: float = 1.0  # η: reward scale
    average_log_probs: bool = False  # per-token average instead of the sum over the response
    sft_weight: float = 0.0  # weight of an NLL term on the chosen response
    rounds: int = 3
    default_rewards: list[float] = field(default_factory=lambda: [1.0, 0.0])  # (chosen, rejected) if a row has none
    # On-policy pairs, from the blend's generator sources: K samples per prompt, best vs worst.
    prompts_per_round: int = 64
    samples_per_prompt: int = 4
    reward_margin: float = 0.5  # keep a pair only if its reward gap is larger
    max_new_tokens: int = 128
    temperature: float = 1.0
    engine_max_batch: int = 64


@dataclass
class RolloutSpec:
    """How the rollout engine runs, for every stage that generates. Speed only: not part of a stage's
    fingerprint, so changing it reruns nothing."""
    cuda_graphs: bool = True  # on a GPU, replay the decode step as CUDA graphs (rollout/graphs.py)


@dataclass
class StageSpec:
    name: str
    kind: Literal["sft", "rpo", "grpo"]
    blend: str  # path of a blend YAML, relative to pipeline.yaml
    trainer: TrainerSpec
    eval: EvalSpec = field(default_factory=EvalSpec)
    grpo: GRPOSpec | None = None  # required for kind grpo
    rpo: RPOSpec | None = None  # required for kind rpo
    blend_spec: BlendSpec | None = None  # filled at load time from `blend`


@dataclass
class PipelineConfig:
    run_dir: str
    model: ModelSpec
    stages: list[StageSpec]
    seed: int = 0
    accelerate_config: str | None = None
    profile: str = "tiny"
    rollout: RolloutSpec = field(default_factory=RolloutSpec)

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"unknown stage {name!r}; stages: {[s.name for s in self.stages]}")

    def previous(self, name: str) -> StageSpec | None:
        index = [s.name for s in self.stages].index(self.stage(name).name)
        return self.stages[index - 1] if index > 0 else None

    def stage_hash(self, name: str) -> str:
        """A fingerprint of everything that decides a stage's result: its spec, the model, the seed, and
        the previous stage's fingerprint (a stage trained again makes every later stage stale)."""
        stage = dataclasses.asdict(self.stage(name))
        stage.pop("blend")  # where the blend file lies does not matter, its content (blend_spec) does
        previous = self.previous(name)
        payload = _without_none({"stage": stage, "model": dataclasses.asdict(self.model), "seed": self.seed,
                                 "after": self.stage_hash(previous.name) if previous else None})
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_none(value: Any) -> Any:
    """Drop unset (None) settings, so adding an optional setting does not change existing stages' hashes."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def deep_merge(base: Any, override: Any) -> Any:
    """Override mappings key by key; anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(override)


def _apply_profile(doc: dict, profile: str, path: Path) -> dict:
    profiles = doc.pop("profiles", {}) or {}
    if profile not in profiles:
        raise ConfigError(f"{path}: unknown profile {profile!r}; profiles: {sorted(profiles)}")
    override = copy.deepcopy(profiles[profile] or {})
    stage_overrides = override.pop("stages", {}) or {}
    stages = doc.get("stages", [])
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    for name, stage_override in stage_overrides.items():
        if name not in names:
            raise ConfigError(f"{path}: profiles.{profile}.stages.{name}: unknown stage (stages: {names})")
        stages[names.index(name)] = deep_merge(stages[names.index(name)], stage_override)
    return deep_merge(doc, override) | {"profile": profile}


def load_config(path: str | Path, profile: str = "tiny", check_files: bool = True) -> PipelineConfig:
    """Load, merge the profile, validate types and keys, and load every stage's blend."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    config = from_dict(PipelineConfig, _apply_profile(doc, profile, path), str(path))
    seen = set()
    for i, stage in enumerate(config.stages):
        where = f"{path}: stages[{i}]"
        if stage.name in seen:
            raise ConfigError(f"{where}.name: duplicate stage name {stage.name!r}")
        seen.add(stage.name)
        for kind in ("grpo", "rpo"):
            if stage.kind == kind and getattr(stage, kind) is None:
                raise ConfigError(f"{where}.{kind}: required for kind {kind!r}")
            if stage.kind != kind and getattr(stage, kind) is not None:
                raise ConfigError(f"{where}.{kind}: only for kind {kind!r} (this stage is {stage.kind!r})")
        blend_path = (path.parent / stage.blend).resolve()
        stage.blend = str(blend_path)
        stage.blend_spec = load_blend(blend_path, check_files=check_files)
    if config.accelerate_config is not None:
        accel = (path.parent / config.accelerate_config)
        if check_files and not accel.exists():
            raise ConfigError(f"{path}: accelerate_config: file not found: {accel}")
        config.accelerate_config = str(accel.resolve())
    config.run_dir = str((path.parent / config.run_dir).resolve())
    return config
