"""One process of ``test_sharded_stages``: a rollout engine built from, and refreshed from, a policy whose
weights are sharded across two CPU processes (gloo), by FSDP2 or by DeepSpeed ZeRO-3.

Writes, per process, what the test compares: the engine's tokens and log-probabilities before and after an
optimizer step, the same from an engine of the unsharded model, and whether the engine's weights after
``load_weights`` equal the policy's gathered ones.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from model.factory import build_model, load_tokenizer
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams
from rollout.weights import full_parameters

PROMPTS = [[1, 5, 9, 13, 2], [3, 8], [4, 4, 7, 30, 31, 6, 2]]
PARAMS = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=())


def fsdp2(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    return model, torch.optim.SGD(model.parameters(), lr=0.5), lambda loss: loss.backward()


def fsdp1(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group("gloo")
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.5), lambda loss: loss.backward()


def zero3(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=3)
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=1, train_batch_size=2)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    wrapped, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    return wrapped, optimizer, accelerator.backward


def generate(engine: RolloutEngine) -> list[dict]:
    return [{"tokens": o.token_ids, "logprobs": o.logprobs} for o in engine.generate(PROMPTS, PARAMS)]


def main(mode: str, tokenizer_dir: str, out: str) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    whole = build_model("tiny", tokenizer, seed=0).eval()
    reference = RolloutEngine(whole, tokenizer, max_batch=4, max_length=64)
    result = {"reference_before": generate(reference)}
    policy, optimizer, backward = {"fsdp1": fsdp1, "fsdp2": fsdp2, "zero3": zero3}[mode](build_model("tiny", tokenizer, seed=0))
    bare = getattr(policy, "module", policy)     # DeepSpeed wraps the model, FSDP2 shards it in place
    result["sharded"] = all(isinstance(p, DTensor) or p.numel() == 0 for p in bare.parameters())
    engine = RolloutEngine(policy, tokenizer, max_batch=4, max_length=64)     # as the trainer holds it
    result["before"] = generate(engine)

    rank = dist.get_rank()
    ids = torch.tensor([PROMPTS[rank] + PROMPTS[2]])     # each process its own batch
    backward(policy(input_ids=ids, labels=ids).loss)
    optimizer.step()
    engine.load_weights(policy)
    gathered = {name: tensor.clone() for name, tensor in full_parameters(bare)}
    own = dict(engine.model.named_parameters())
    result["engine_equals_gathered"] = all(torch.equal(own[name], t) for name, t in gathered.items())
    result["weights_moved"] = max((gathered[name] - p).abs().max().item() for name, p in whole.named_parameters())
    reference.load_weights(gathered)
    result["after"], result["reference_after"] = generate(engine), generate(reference)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
