"""Hybrid against its Transformer twin: generation throughput, memory, and the bandwidth roofline.

The twin has the hybrid's layer pattern with every Mamba layer replaced by an attention layer, so both
have the same depth, MLPs and width; both run in our rollout engine with random weights. For each
input/output length and batch the bench measures new tokens per second and the engine's state memory
(Mamba states plus KV cache for all slots), computes the roofline of a decode step (weights, Mamba
states and the KV cache at the average context read once per step, at the bandwidth measured here by a
large copy) and sets the decode steps' own rate against it (the engine times prefill and decode apart),
and writes a Markdown and CSV table and a PNG plot.

    python -m bench.bench_hybrid                                  # CPU, reduced width and lengths
    python -m bench.bench_hybrid --full                           # GPU: Nemotron-H-8B size
    python -m bench.bench_hybrid --full --layout nemotron-nano-9b-v2
    python -m bench.bench_hybrid --full --layout nemotron-nano-9b-v2 --shapes 8192/256x64 --profile 30

``--profile N`` then runs the first shape once more per model under ``torch.profiler`` and prints where a
decode step's time goes: the device time of each kernel (on CPU, the self time of each op) summed over the
decode steps, per step, the N largest.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import bench_tokenizer, header, timed
from model.configs import layout, reduced
from model.factory import build_model
from rollout.engine import RolloutEngine
from rollout.sampling import SamplingParams


@dataclass
class Shape:
    input_len: int
    output_len: int
    batch: int


CPU_SHAPES = [Shape(i, o, b) for i, o in ((64, 128), (64, 512), (64, 2048)) for b in (1, 8)]
GPU_SHAPES = [Shape(i, o, b) for i, o in ((1024, 1024), (1024, 8192), (8192, 16384)) for b in (1, 8, 64)] + [
    Shape(65536, 1024, 1), Shape(65536, 1024, 8)]


def twin_pattern(pattern: str) -> str:
    """The hybrid's pattern with every Mamba layer ("M") an attention layer ("*")."""
    return pattern.replace("M", "*")


def parameters(config: dict) -> int:
    return sum(p.numel() for p in build_model("tiny", device="meta", **config).parameters())


def configs(name: str, full: bool) -> dict[str, dict]:
    """The hybrid and its twin, whose MLP width is set so both have about the same parameter count."""
    hybrid = layout(name) if full else reduced(name, hidden_size=128)
    twin = hybrid | {"hybrid_override_pattern": twin_pattern(hybrid["hybrid_override_pattern"])}
    # Parameters are linear in the MLP width: two counts fix the line, and the width that matches follows.
    low, high = (parameters(twin | {"intermediate_size": w}) for w in (hybrid["intermediate_size"],
                                                                      2 * hybrid["intermediate_size"]))
    per_unit = (high - low) / hybrid["intermediate_size"]
    width = hybrid["intermediate_size"] + round((parameters(hybrid) - low) / per_unit)
    return {"hybrid": hybrid, "transformer": twin | {"intermediate_size": max(width, 1)}}


def bandwidth(device: str) -> float:
    """Bytes per second of a large copy on this device (read plus write)."""
    size = 1 << 28 if device == "cuda" else 1 << 26
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs = [timed(lambda: dst.copy_(src))[1] for _ in range(5)]
    return 2 * size / sorted(runs)[len(runs) // 2]


def roofline_tokens_per_second(engine: RolloutEngine, shape: Shape, bw: float) -> float:
    """Decode tokens/s if each step read the weights, the Mamba states and the KV at the mean context once
    (set against the decode steps' own rate: prefill is compute-bound and timed apart)."""
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    cache = engine.cache
    context = shape.input_len + shape.output_len / 2
    per_seq = cache.mamba_bytes_per_sequence() + cache.kv_bytes_per_token() * context
    return shape.batch / ((weights + shape.batch * per_seq) / bw)


def warm_engine(model, tokenizer, shape: Shape, new_tokens: int) -> tuple[RolloutEngine, list[list[int]]]:
    """An engine sized for ``shape`` with ``new_tokens`` per prompt, its cache allocated and warmed up, and
    the shape's random prompts."""
    engine = RolloutEngine(model, tokenizer, max_batch=shape.batch, max_length=shape.input_len + new_tokens)
    prompts = torch.randint(10, len(tokenizer), (shape.batch, shape.input_len), generator=torch.Generator().manual_seed(0))
    engine.generate(prompts[:, :8].tolist(), SamplingParams(max_new_tokens=2, temperature=0))
    return engine, prompts.tolist()


def measure(model, tokenizer, shape: Shape, bw: float) -> dict:
    engine, prompts = warm_engine(model, tokenizer, shape, shape.output_len)
    params = SamplingParams(max_new_tokens=shape.output_len, temperature=0, stop_token_ids=())
    decode_before = engine.seconds["decode"]
    outs, seconds = timed(lambda: engine.generate(prompts, params))
    new_tokens = sum(len(o.token_ids) for o in outs)
    # Each prompt's first token comes out of its prefill; the rest out of decode steps, timed apart.
    decode = (new_tokens - len(outs)) / max(engine.seconds["decode"] - decode_before, 1e-9)
    cache = engine.cache
    state_bytes = cache.mamba_bytes_per_sequence() + cache.kv_bytes_per_token() * (shape.input_len + shape.output_len)
    roofline = roofline_tokens_per_second(engine, shape, bw)
    return {"tokens_per_s": new_tokens / seconds, "decode_tokens_per_s": decode,
            "state_mib_per_seq": state_bytes / 2**20, "roofline_tokens_per_s": roofline,
            "of_roofline": decode / roofline}


def decode_profile(model, tokenizer, shape: Shape, top: int) -> str:
    """The ``top`` kernels (ops on CPU) by time per decode step, over the decode steps of one ``generate()``
    at ``shape`` with at most 33 new tokens: those that start inside the engine's ``rollout.decode`` ranges.
    Each range ends by reading its tokens back, so the kernels it launched end inside it too."""
    new = min(shape.output_len, 33)
    engine, prompts = warm_engine(model, tokenizer, shape, new)
    cuda = next(model.parameters()).is_cuda
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0, stop_token_ids=()))
    events = prof.events()
    ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == "rollout.decode"]
    steps = new - 1     # the first token of each prompt comes out of its prefill
    spent, calls = Counter(), Counter()
    for e in events:
        if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda and any(
                lo <= e.time_range.start < hi for lo, hi in ranges):
            spent[e.name] += e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
            calls[e.name] += 1
    wall = sum(hi - lo for lo, hi in ranges) / steps / 1e3
    lines = [f"{'device time per kernel' if cuda else 'self time per op'} over {steps} decode steps: "
             f"{sum(spent.values()) / steps / 1e3:.3f} ms per step in all, {wall:.3f} ms per step of wall time "
             "(under the profiler)", f"{'ms/step':>9} {'calls/step':>10}  name"]
    names = {"rollout.decode": "rollout.decode's own time: Python between the ops"}
    lines += [f"{us / steps / 1e3:9.3f} {calls[name] / steps:10.1f}  {names.get(name, name)[:100]}"
              for name, us in spent.most_common(top)]
    return "\n".join(lines)


def measure_pair(models: dict[str, torch.nn.Module], tokenizer, shape: Shape, bw: float, device: str,
                 repeats: int) -> dict[str, dict]:
    """Both models on one shape, alternating (A B B A ...) so drift in the machine's speed hits both alike.

    Each model is on the device only while it runs, so the pair needs one model's memory at a time.
    Returns per model the mean of its runs; a model whose state does not fit is left out.
    """
    runs: dict[str, list[dict]] = {name: [] for name in models}
    names = list(models)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            model = models[name].to(device)
            try:
                runs[name].append(measure(model, tokenizer, shape, bw))
            except torch.OutOfMemoryError:
                print(f"# {name} {shape}: does not fit, skipped", flush=True)
                torch.cuda.empty_cache()
            finally:
                models[name] = model.to("cpu")
    means = {}
    for name, results in runs.items():
        if results:
            means[name] = results[0] | {k: sum(r[k] for r in results) / len(results)
                                        for k in ("tokens_per_s", "decode_tokens_per_s", "of_roofline")}
    return means


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (model, batch) in sorted({(r["model"], r["batch"]) for r in rows}):
        mine = sorted((r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["output_len"])
        xs = [r["output_len"] for r in mine]
        left.plot(xs, [r["tokens_per_s"] for r in mine], marker="o", label=f"{model}, batch {batch}")
        right.plot(xs, [r["state_mib_per_seq"] for r in mine], marker="o", label=f"{model}, batch {batch}")
    for axis, label in ((left, "new tokens / s"), (right, "state MiB per sequence")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("output tokens")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_shapes(text: str) -> list[Shape]:
    """``"64/128x1,64/2048x8"``: input/output lengths and batch of each shape."""
    shapes = []
    for item in text.split(","):
        try:
            lengths, batch = item.split("x")
            input_len, output_len = lengths.split("/")
            shapes.append(Shape(int(input_len), int(output_len), int(batch)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shapes: {item!r} is not INPUT/OUTPUTxBATCH, e.g. 64/128x8") from None
    return shapes


def table(rows: list[dict], shapes: list[Shape]) -> list[str]:
    """One Markdown row per shape, with the hybrid/Transformer ratio; "-" for a model that did not fit.
    tok/s counts prefill and decode; decode tok/s and of roofline, the decode steps alone."""
    lines = ["| input | output | batch | hybrid tok/s | transformer tok/s | hybrid / transformer | "
             "hybrid decode tok/s | transformer decode tok/s | hybrid MiB/seq | transformer MiB/seq | "
             "hybrid of roofline | transformer of roofline |", "|" + "---|" * 12]
    for shape in shapes:
        pair = {r["model"]: r for r in rows if (r["input_len"], r["output_len"], r["batch"]) == tuple(shape.__dict__.values())}
        if not pair:
            continue

        def cells(key: str, form: str) -> list[str]:
            return [format(pair[m][key], form) if m in pair else "-" for m in ("hybrid", "transformer")]

        ratio = (f"{pair['hybrid']['tokens_per_s'] / pair['transformer']['tokens_per_s']:.2f}x" if len(pair) == 2
                 else "-")
        lines.append("| " + " | ".join([str(shape.input_len), str(shape.output_len), str(shape.batch),
                                        *cells("tokens_per_s", ".0f"), ratio, *cells("decode_tokens_per_s", ".0f"),
                                        *cells("state_mib_per_seq", ".2f"), *cells("of_roofline", ".0%")]) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="nemotron-h-8b")
    parser.add_argument("--full", action="store_true", help="full-size layouts and lengths (a GPU)")
    parser.add_argument("--shapes", type=parse_shapes, help="INPUT/OUTPUTxBATCH,... instead of the default shapes")
    parser.add_argument("--out", default="bench/results/hybrid")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs per model and shape, in the order hybrid, twin, twin, hybrid, ...")
    parser.add_argument("--profile", type=int, metavar="N",
                        help="then profile the decode steps of the first shape per model: the N largest kernels")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.full else torch.float32
    tokenizer = bench_tokenizer()
    bw = bandwidth(device)
    shapes = args.shapes or (GPU_SHAPES if args.full else CPU_SHAPES)
    title = f"hybrid vs Transformer twin, layout {args.layout}{'' if args.full else ' at reduced width'}"
    lines = [header(title), f"# measured copy bandwidth: {bw / 1e9:.1f} GB/s"]
    models = {}
    for name, config in configs(args.layout, args.full).items():
        # Built on the device (random init of a full-size layout is minutes on a CPU), kept on the CPU
        # while the other runs.
        models[name] = build_model(args.layout, tokenizer, dtype=dtype, device=device, **config).eval().cpu()
        params = sum(p.numel() for p in models[name].parameters())
        lines.append(f"# {name}: pattern {config['hybrid_override_pattern']}, MLP width {config['intermediate_size']}, "
                     f"{params / 1e6:.2f}M parameters")
    rows = []
    for shape in shapes:
        for name, result in measure_pair(models, tokenizer, shape, bw, device, args.repeats).items():
            rows.append({"model": name, **shape.__dict__, **result})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = "\n".join(lines + [""] + table(rows, shapes)) + "\n"
    (out / "hybrid.md").write_text(report)
    with (out / "hybrid.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "hybrid.png")
    print(report)
    print(f"written: {out}/hybrid.md, hybrid.csv, hybrid.png")
    for name, model in models.items() if args.profile else ():
        model = model.to(device)
        print(f"\n# {name} decode profile, {shapes[0]}\n{decode_profile(model, tokenizer, shapes[0], args.profile)}",
              flush=True)
        models[name] = model.to("cpu")


if __name__ == "__main__":
    main()
