"""Training step of the tiny model at two Mamba chunk sizes: same losses and gradients, different speed.

transformers' PyTorch SSD scan (used where mamba-ssm's kernels are not installed, as on CPU) builds
per-chunk [chunk, chunk] decay matrices, so its cost grows with the chunk size while the math does
not change. Both models get the same weights and batch (right-padded chat examples of the embedded
tasks); their forward+backward passes are timed alternately and the ratio printed.

    python -m bench.bench_train_step                      # chunk 64 against 16, batch 32
    python -m bench.bench_train_step --chunks 128,16 --batch 16
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import bench_tokenizer, header, timed
from data_blends import generators
from data_blends.chat import conversation, tokenize_conversation
from model.factory import build_model


def sft_batch(tokenizer, batch: int) -> dict[str, torch.Tensor]:
    """``batch`` right-padded training rows of math (with the trace) and code, labels on assistant tokens."""
    rows = generators.generate("math", "train", batch // 2) + generators.generate("code", "train", batch - batch // 2)
    encoded = [tokenize_conversation(tokenizer, conversation(row, think=i % 3 != 0)) for i, row in enumerate(rows)]
    width = max(len(e["input_ids"]) for e in encoded)
    ids = torch.full((batch, width), tokenizer.pad_token_id)
    labels = torch.full((batch, width), -100)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        ids[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), 1
        labels[i, :n] = torch.where(torch.tensor(e["assistant_masks"]) == 1, ids[i, :n], -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step(model, batch: dict[str, torch.Tensor]) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def grad_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between the gradients of two models of the same layout."""
    return max((p.grad - q.grad).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default="64,16", help="baseline chunk size, then the candidate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    tokenizer = bench_tokenizer()
    base_chunk, new_chunk = (int(c) for c in args.chunks.split(","))
    base = build_model("tiny", tokenizer, chunk_size=base_chunk)
    new = build_model("tiny", tokenizer, chunk_size=new_chunk)
    new.load_state_dict(base.state_dict())
    batch = sft_batch(tokenizer, args.batch)
    losses = [step(m, batch) for m in (base, new)]
    gap = grad_gap(base, new)
    times: dict[int, list[float]] = {base_chunk: [], new_chunk: []}
    for _ in range(args.repeats):  # alternate, so a change in the machine's speed hits both alike
        for chunk, model in ((base_chunk, base), (new_chunk, new)):
            times[chunk].append(timed(lambda: step(model, batch))[1])
    print(header("tiny model training step (forward + backward) by Mamba chunk size"))
    print(f"batch {args.batch} x {batch['input_ids'].shape[1]} tokens; loss gap {abs(losses[0] - losses[1]):.1e}, "
          f"largest gradient gap {gap:.1e}")
    for chunk, values in times.items():
        print(f"chunk {chunk:>4}: median {statistics.median(values) * 1000:.0f} ms per step")
    print(f"speed-up of chunk {new_chunk} over chunk {base_chunk}: "
          f"{statistics.median(times[base_chunk]) / statistics.median(times[new_chunk]):.2f}x")


if __name__ == "__main__":
    main()
