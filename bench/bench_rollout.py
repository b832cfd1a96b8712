"""Rollout engine against transformers' ``generate()``: new tokens per second, and state memory.

Both decode greedily for the same prompts with the same model; the ratio is measured in one run, from the
median of ``--repeats`` interleaved timings of each (a shared CPU's speed drifts from minute to minute). With a
random model (``--layout``) no sequence stops, so both generate exactly ``--new-tokens`` per prompt.
With a trained checkpoint (``--checkpoint``) sequences stop at their end-of-turn token at different
lengths, as in RL rollouts: ``generate()`` keeps computing finished rows until the longest is done,
while the engine hands their slots to waiting prompts; only tokens up to each end-of-turn count.
The ``prefill`` column is the share of the engine's time spent in prefill (the prompts through the model and
their first tokens) in its median run: the part that a faster decode step leaves as it is.

On CPU without stops the bench also times the decode's matrix products alone (``matrix_products``): the
layers' projections and the attention over the KV cache, as the engine runs it (``kernels.decode_attention``),
work that ``generate()`` does too. Their throughput over ``generate()``'s is the "ceiling": what a decoder
that spent no time on anything else (the Mamba recurrence, norms, sampling, the loop) would gain. (On a
GPU, launching them one by one is itself overhead that CUDA graphs remove, so there they bound nothing and
are not timed.)

    python -m bench.bench_rollout                                   # tiny layout, batches 1, 16, 64
    python -m bench.bench_rollout --checkpoint runs/tiny/rpo/final  # a trained tiny model, real stops
    python -m bench.bench_rollout --compile                         # the engine's decode step compiled
    python -m bench.bench_rollout --steps-per-sync 1                # the host reads the tokens every step
    python -m bench.bench_rollout --repeats 5                       # more timed runs per cell (default 3)
    python -m bench.bench_rollout --compile --against HEAD~1        # also the engine of an earlier commit
    python -m bench.bench_rollout --layout nemotron-h-8b --hidden 256 --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from bench.common import bench_tokenizer, chat_prompts, header, timed
from model.factory import build_model, load_model, load_tokenizer
from rollout import kernels
from rollout.engine import ATTENTION, MAMBA, RolloutEngine, StateCache
from rollout.sampling import SamplingParams


def hf_generate(model, tokenizer, prompts: list[list[int]], new_tokens: int, stop: bool) -> int:
    """Left-padded batched ``generate()``; returns the number of new tokens up to each end-of-turn."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(model.device)
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=None if stop else new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id if stop else None)
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    return sum(row.index(eos) + 1 if stop and eos in row else len(row) for row in rows)


def engine_generate(engine: RolloutEngine, prompts: list[list[int]], new_tokens: int, stop: bool) -> int:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, stop_token_ids=None if stop else ())
    return sum(len(o.token_ids) for o in engine.generate(prompts, params))


@torch.no_grad()
def matrix_products(engine: RolloutEngine, batch: int, prompt_length: int, new_tokens: int) -> int:
    """Run only the matrix products of greedy decoding ``new_tokens`` for ``batch`` prompts padded to
    ``prompt_length``: per step, every layer's projections and, in attention layers, the attention over the
    KV span the step reads, the step's keys and values written first (the engine's cache, at its size,
    through ``kernels.decode_attention``). The inputs are zeros: the products' cost does not depend on their
    values. Returns the tokens such a decode writes."""
    model, cache = engine.model, engine.cache
    x = torch.zeros(batch, model.config.hidden_size, device=engine.device, dtype=model.dtype)
    for span in range(prompt_length + 1, prompt_length + new_tokens + 1):
        positions = torch.full((batch,), span - 1, device=engine.device)
        for i, block in enumerate(model.model.layers):
            mixer = block.mixer
            if block.block_type == MAMBA:
                mixer.out_proj(mixer.in_proj(x)[:, : mixer.intermediate_size])
            elif block.block_type == ATTENTION:
                q, k, v = (p(x).view(batch, -1, mixer.head_dim) for p in (mixer.q_proj, mixer.k_proj, mixer.v_proj))
                out = kernels.decode_attention(q, cache.keys[i], cache.values[i], positions, mixer.scaling, k, v)
                mixer.o_proj(out.flatten(1))
            else:
                mixer(x)
        model.lm_head(x)
    return batch * new_tokens


def engine_at(rev: str, repo: Path = Path(".")) -> type:
    """``RolloutEngine`` as committed at git revision ``rev`` of ``repo``, with that commit's whole ``rollout``
    package (its kernels and their references too), imported beside the current one: its modules are
    loaded under the usual names, then the current ones put back, so the two engines each keep their own.
    Timing both in one process is the fair test of a change on this CPU, whose speed drifts between runs."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "rollout"], check=True,
                             capture_output=True).stdout
    root = tempfile.mkdtemp()
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(root, filter="data")

    def ours(name: str) -> bool:
        return name == "rollout" or name.startswith("rollout.")

    current = {name: sys.modules.pop(name) for name in list(sys.modules) if ours(name)}
    sys.path.insert(0, root)
    try:
        return importlib.import_module("rollout.engine").RolloutEngine
    finally:
        sys.path.remove(root)
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(current)


def median_run(runs: list[tuple[int, float]]) -> int:
    """Index of the median-time run of (tokens, seconds) runs."""
    return sorted(range(len(runs)), key=lambda i: runs[i][1])[len(runs) // 2]


def throughput(runs: list[tuple[int, float]]) -> float:
    """New tokens per second of the median-time run (every run generates the same tokens)."""
    tokens, seconds = runs[median_run(runs)]
    return tokens / seconds


def prefill_share(runs: list[tuple[int, float]], prefill: list[float]) -> float:
    """The share of prefill (``prefill[i]`` seconds of run i) in the median-time run's wall time."""
    i = median_run(runs)
    return prefill[i] / runs[i][1]


def memory_lines(model) -> list[str]:
    """Fixed Mamba state per sequence, and the attention KV it needs at 1k, 4k and 16k tokens."""
    cache = StateCache(model, slots=1, max_length=16)
    state, kv = cache.mamba_bytes_per_sequence(), cache.kv_bytes_per_token()
    return [f"Mamba state per sequence (conv + SSM, any length): {state:,} bytes",
            "attention KV per sequence: " + ", ".join(f"{n // 1024}k tokens {kv * n:,} bytes"
                                                      for n in (1024, 4096, 16384))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="tiny")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of a random layout (sequences stop)")
    parser.add_argument("--hidden", type=int, default=None, help="override hidden_size (reduced-width layouts)")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="the engine's decode step through torch.compile")
    parser.add_argument("--steps-per-sync", type=int, default=8,
                        help="decode steps the engine runs before the host reads their tokens (RolloutEngine's steps_per_sync)")
    parser.add_argument("--against", metavar="REV",
                        help="also time the engine of this git revision (its rollout package), interleaved")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each, interleaved; the medians are compared (a shared CPU's speed drifts)")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        tokenizer, model = load_tokenizer(args.checkpoint), load_model(args.checkpoint, dtype=dtype)
    else:
        tokenizer = bench_tokenizer()
        overrides = {"hidden_size": args.hidden} if args.hidden else {}
        model = build_model(args.layout, tokenizer, dtype=dtype, device=args.device, **overrides)
    model = model.to(args.device).eval()
    stop = bool(args.checkpoint)
    floor = not stop and model.device.type == "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    prompts = chat_prompts(tokenizer, max(batches))
    sizes = dict(max_batch=max(batches), max_length=max(map(len, prompts)) + args.new_tokens,
                 steps_per_sync=args.steps_per_sync)
    engine = RolloutEngine(model, tokenizer, **sizes, compile=args.compile)
    # On a GPU the engine replays CUDA graphs and reads the tokens back once per run of decode steps; the
    # same engine without graphs, and one reading the tokens after every step, run beside it.
    variants = ({"no graphs": RolloutEngine(model, tokenizer, **sizes, cuda_graphs=False),
                 "sync every step": RolloutEngine(model, tokenizer, **{**sizes, "steps_per_sync": 1})}
                if engine.graphs else {})
    if args.against:
        variants[f"at {args.against}"] = engine_at(args.against)(model, tokenizer, **sizes, compile=args.compile)
    print(header(f"rollout engine vs transformers generate(): {args.checkpoint or 'layout ' + args.layout}, "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {'up to ' if stop else ''}{args.new_tokens} new tokens"))
    # Warm-up; a compiled step compiles here, once for a batch of one and once for any larger batch.
    _, warm = timed(lambda: [engine_generate(engine, prompts[:n], 4, stop) for n in (2, 1)])
    what = " (compiling the decode step)" if args.compile else " (recording CUDA graphs)" if engine.graphs else ""
    print(f"engine warm-up{what}: {warm:.1f} s")
    for variant in variants.values():
        for n in (2, 1):
            engine_generate(variant, prompts[:n], 4, stop)
    print(f"{'batch':>5} {'generate() tok/s':>17} {'engine tok/s':>13} {'ratio':>6} {'ratio range':>12} {'prefill':>8}"
          + (f" {'products alone tok/s':>21} {'ceiling':>8}" if floor else "")
          + "".join(f" {name + ' tok/s':>21} {'engine over it':>15}" for name in variants))
    for batch in batches:
        runs = {name: [] for name in ("hf", "engine", "products", *variants)}
        prefill = []    # the engine's seconds in prefill, per timed run
        longest = max(map(len, prompts[:batch]))
        for _ in range(args.repeats):
            with torch.no_grad():
                runs["hf"].append(timed(lambda: hf_generate(model, tokenizer, prompts[:batch], args.new_tokens, stop)))
            before = engine.seconds["prefill"]
            runs["engine"].append(timed(lambda: engine_generate(engine, prompts[:batch], args.new_tokens, stop)))
            prefill.append(engine.seconds["prefill"] - before)
            if floor:
                runs["products"].append(timed(lambda: matrix_products(engine, batch, longest, args.new_tokens)))
            for name, variant in variants.items():
                runs[name].append(timed(lambda: engine_generate(variant, prompts[:batch], args.new_tokens, stop)))
        hf, en = throughput(runs["hf"]), throughput(runs["engine"])
        pairs = [(n_en / t_en) / (n_hf / t_hf) for (n_hf, t_hf), (n_en, t_en) in zip(runs["hf"], runs["engine"])]
        line = (f"{batch:>5} {hf:>17.0f} {en:>13.0f} {en / hf:>5.1f}x {min(pairs):>5.1f}-{max(pairs):.1f}x"
                f" {prefill_share(runs['engine'], prefill):>7.0%}")
        if floor:
            products = throughput(runs["products"])
            line += f" {products:>21.0f} {products / hf:>7.1f}x"
        for name in variants:
            other = throughput(runs[name])
            line += f" {other:>21.0f} {en / other:>14.2f}x"
        print(line, flush=True)
    for line in memory_lines(model):
        print(line)


if __name__ == "__main__":
    main()
