"""pipeline.yaml and blend files are validated at load, with the file and key in every error."""

from __future__ import annotations

import pytest
import yaml

from stages.config import load_config
from stages.schema import ConfigError
from tests.conftest import ROOT


def _pipeline(tmp_path, mutate=None, blend=None):
    doc = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    blend_doc = blend or {"num_examples": 10, "sources": [{"name": "math", "kind": "generator"}]}
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(blend_doc))
    for stage in doc["stages"]:
        stage["blend"] = "blend.yaml"
    for profile in doc["profiles"].values():
        for stage in (profile or {}).get("stages", {}).values():
            stage["blend"] = "blend.yaml"
        (profile or {}).pop("accelerate_config", None)
    if mutate:
        mutate(doc)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_shipped_pipeline_loads_in_every_profile():
    for profile in yaml.safe_load((ROOT / "pipeline.yaml").read_text())["profiles"]:
        config = load_config(ROOT / "pipeline.yaml", profile, check_files=profile == "tiny")
        assert [s.name for s in config.stages][:2] == ["sft_reasoning", "sft_chat"]


def test_full_size_profile_overrides_the_base():
    config = load_config(ROOT / "pipeline.yaml", "nemotron-h-8b")
    first = config.stage("sft_reasoning")
    assert first.trainer.max_steps > 30000 and first.trainer.bf16
    assert config.model.dtype == "bfloat16" and config.accelerate_config.endswith("zero3.yaml")
    assert first.blend_spec.sources[0].kind == "hub"
    tiny = load_config(ROOT / "pipeline.yaml", "tiny")
    assert tiny.stage("sft_reasoning").trainer.max_steps < 5000 and tiny.model.name == "tiny"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["stages"][0]["trainer"].update(learning_rat=0.1), "stages[0].trainer.learning_rat: unknown key"),
    (lambda d: d["stages"][0]["trainer"].update(max_steps="many"), "stages[0].trainer.max_steps: expected int"),
    (lambda d: d["stages"][1].update(kind="ppo"), "stages[1].kind: 'ppo' is not one of"),
    (lambda d: d.update(sed=1), ".sed: unknown key"),
    (lambda d: d["rollout"].update(cuda_graph=False), ".rollout.cuda_graph: unknown key"),
    (lambda d: d["model"].pop("name"), ".model.name: required key is missing"),
    (lambda d: d["profiles"]["tiny"].update(stages={"sft_chatt": {}}), "profiles.tiny.stages.sft_chatt: unknown stage"),
    (lambda d: d["stages"][0].update(blend="missing.yaml"), "missing.yaml: blend file not found"),
    (lambda d: d["stages"][1].update(name="sft_reasoning"), "duplicate stage name"),
    (lambda d: d["stages"][3].pop("grpo"), "stages[3].grpo: required for kind 'grpo'"),
    (lambda d: d["stages"][0].update(grpo={}), "stages[0].grpo: only for kind 'grpo'"),
    (lambda d: d["stages"][3]["grpo"].update(loss_type="ppo"), "stages[3].grpo.loss_type: 'ppo' is not one of"),
])
def test_bad_pipeline_names_the_key(tmp_path, mutate, message):
    path = _pipeline(tmp_path, mutate)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and str(tmp_path) in str(error.value)


def test_unknown_profile_and_stage(tmp_path):
    path = _pipeline(tmp_path)
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config(path, "huge")
    with pytest.raises(ConfigError, match="unknown stage 'dpo'"):
        load_config(path).stage("dpo")


@pytest.mark.parametrize("blend, message", [
    ({"num_examples": 10, "sources": [{"name": "x", "kind": "jsonl", "path": "nope.jsonl"}]},
     "sources[0].path: data file not found"),
    ({"num_examples": 10, "sources": [{"name": "poetry", "kind": "generator"}]}, "unknown generator 'poetry'"),
    ({"num_examples": 10, "sources": [{"name": "math", "kind": "generator", "reasoning_on": 1.5}]},
     "sources[0].reasoning_on: must be within"),
    ({"num_examples": 10, "sources": [{"name": "math", "kind": "generator", "wieght": 2}]},
     "sources[0].wieght: unknown key"),
    ({"num_examples": 10, "sources": [{"name": "x", "kind": "hub"}]}, "sources[0].path: required"),
])
def test_bad_blend_names_the_file_and_key(tmp_path, blend, message):
    path = _pipeline(tmp_path, blend=blend)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and "blend.yaml" in str(error.value)


def test_stage_hash_changes_with_its_config():
    a = load_config(ROOT / "pipeline.yaml")
    b = load_config(ROOT / "pipeline.yaml")
    b.stage("sft_chat").trainer.learning_rate *= 2
    assert a.stage_hash("sft_reasoning") == b.stage_hash("sft_reasoning")
    assert a.stage_hash("sft_chat") != b.stage_hash("sft_chat")
    c = load_config(ROOT / "pipeline.yaml")
    c.rollout.cuda_graphs = not a.rollout.cuda_graphs      # how the engine runs reruns nothing
    assert [a.stage_hash(s.name) for s in a.stages] == [c.stage_hash(s.name) for s in c.stages]
