"""bench_rollout's floor must time the very matrix products (and attention kernels) a decode step runs, no
more and no fewer; its ``--against`` must run the engine of the named commit."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

import rollout.kernels
from bench.bench_rollout import engine_at, matrix_products, prefill_share, throughput
from model.configs import reduced
from model.factory import build_model
from rollout.engine import RolloutEngine
from rollout.kernels import cpu
from rollout.sampling import SamplingParams

PRODUCTS = ("aten::linear", "aten::matmul", f"{cpu.NAMESPACE}::decode_attention")


def products_of(fn) -> Counter:
    """The (op, input shapes) of every projection and matrix product ``fn`` runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return Counter((e.name, str(e.input_shapes)) for e in prof.events() if e.name in PRODUCTS)


@pytest.mark.parametrize("layout", ["tiny", "nemotron-h-8b"])
def test_matrix_products_are_those_of_a_decode_step(layout, tokenizer):
    model = build_model(layout, tokenizer, seed=0, **(reduced(layout) if layout != "tiny" else {})).eval()
    engine = RolloutEngine(model, tokenizer, max_batch=3, max_length=32)
    prompts = [tokenizer.encode(t, add_special_tokens=False)[:9] for t in ("What is 12 plus 30?", "Name a prime", "a")]
    engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=0))       # allocates the cache
    batch, length = 3, 9
    positions = torch.full((batch,), length)
    with torch.no_grad():
        step = products_of(lambda: engine._decode_step(torch.zeros(batch, dtype=torch.long), positions))
    floor = products_of(lambda: matrix_products(engine, batch, length, 1))
    assert floor == step
    attention = sum(n for (name, _), n in step.items() if name == f"{cpu.NAMESPACE}::decode_attention")
    assert attention == sum(b.block_type == "full_attention" for b in model.model.layers)   # the C++ kernel


def test_engine_at_imports_the_committed_engine(tmp_path, tiny_model, tokenizer):
    """A repository whose committed rollout package differs from the current one by a class attribute of the
    engine, a constant of its kernels and the source of its C++ kernels: the bench's engine at that commit
    has both, the current engine neither, each runs its own C++ kernels, and the two generate the same
    tokens."""
    shutil.copytree(Path(__file__).parents[1] / "rollout", tmp_path / "rollout",
                    ignore=shutil.ignore_patterns("__pycache__"))
    engine, kernels = tmp_path / "rollout" / "engine.py", tmp_path / "rollout" / "kernels" / "__init__.py"
    engine.write_text(engine.read_text().replace("class RolloutEngine:\n", "class RolloutEngine:\n    committed = True\n", 1))
    kernels.write_text(kernels.read_text() + "\nCOMMITTED = True\n")
    source = tmp_path / "rollout" / "kernels" / "cpu.py"
    source.write_text(source.read_text().replace("#include <vector>\n", "#include <vector>\n// committed\n", 1))
    git = ["git", "-C", str(tmp_path), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "rollout"], ["commit", "-qm", "engine"]):
        subprocess.run(git + args, check=True)
    Committed = engine_at("HEAD", repo=tmp_path)
    assert Committed.committed and not hasattr(RolloutEngine, "committed")
    assert Committed.__init__.__globals__["kernels"].COMMITTED and not hasattr(rollout.kernels, "COMMITTED")
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in ("What is 12 plus 30?", "Name a prime")]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    got, want = (E(tiny_model, tokenizer, max_batch=2, max_length=64).generate(prompts, params)
                 for E in (Committed, RolloutEngine))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    committed_cpu = Committed.__init__.__globals__["kernels"].cpu
    assert committed_cpu.NAMESPACE != cpu.NAMESPACE and committed_cpu._built and cpu._built


def test_throughput_and_prefill_share_come_from_the_median_time_run():
    runs, prefill = [(100, 1.0), (100, 4.0), (100, 2.0)], [0.9, 0.1, 0.5]
    assert throughput(runs) == 50 and prefill_share(runs, prefill) == 0.25
