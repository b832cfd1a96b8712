"""The rollout engine against transformers' own forward and generate() on real NemotronH models."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from model.configs import reduced
from model.factory import build_model
from rollout.engine import RolloutEngine, StateCache, gated_rms_norm, length_runs, prefill_groups, rms_norm
from rollout.sampling import Draws, SamplingParams, choose_tokens, pick, sampling_logprobs

TEXTS = ["What is 12 plus 30?", "Name a prime", "<|im_start|>system\n/think<|im_end|>\n<|im_start|>user\n"
         "Why is the sky blue? Explain.<|im_end|>\n<|im_start|>assistant\n<think>", "a"]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]


@pytest.fixture(scope="module")
def hybrid_8b_pattern(tokenizer):
    """Nemotron-H-8B's 52-layer pattern at reduced width, random weights."""
    return build_model("nemotron-h-8b", tokenizer, seed=1, **reduced("nemotron-h-8b")).eval()


def model_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of ``tokens`` after ``prompt`` from one full forward of the training model."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits.float()
    return torch.log_softmax(logits, -1)[0, len(prompt) - 1 : -1].gather(1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("which", ["tiny", "nemotron-h-8b pattern"])
def test_greedy_equals_generate_prompt_by_prompt(which, tiny_model, hybrid_8b_pattern, tokenizer, prompts):
    model = tiny_model.eval() if which == "tiny" else hybrid_8b_pattern
    engine = RolloutEngine(model, tokenizer, max_batch=3, max_length=128)   # 4 prompts, 3 slots: one waits
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=()))
    for prompt, out in zip(prompts, outs):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert out.token_ids == want
        torch.testing.assert_close(torch.tensor(out.logprobs), model_logprobs(model, prompt, out.token_ids),
                                   atol=1e-4, rtol=0)


def test_sampled_logprobs_equal_a_full_forward(tiny_model, tokenizer, prompts):
    engine = RolloutEngine(tiny_model.eval(), tokenizer, max_batch=4, max_length=128)
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0, seed=3, stop_token_ids=()))
    for prompt, out in zip(prompts, outs):
        torch.testing.assert_close(torch.tensor(out.logprobs), model_logprobs(tiny_model, prompt, out.token_ids),
                                   atol=1e-4, rtol=0)


def test_seeded_sampling_does_not_depend_on_batching(tiny_model, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, top_p=0.9, seed=7, stop_token_ids=())
    wide = RolloutEngine(tiny_model, tokenizer, max_batch=4, max_length=128).generate(prompts, params)
    narrow = RolloutEngine(tiny_model, tokenizer, max_batch=1, max_length=128).generate(prompts, params)
    assert [o.token_ids for o in wide] == [o.token_ids for o in narrow]
    # Stop tokens that end the sequences at different steps: running sequences move into the slots that
    # finished ones free, and still continue exactly as when each runs alone.
    free = RolloutEngine(tiny_model, tokenizer, max_batch=1, max_length=128).generate(prompts * 2, params)
    stops = SamplingParams(**{**params.__dict__, "stop_token_ids": (free[0].token_ids[3], free[5].token_ids[11])})
    wide = RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=128).generate(prompts * 2, stops)
    narrow = RolloutEngine(tiny_model, tokenizer, max_batch=1, max_length=128).generate(prompts * 2, stops)
    assert len({len(o.token_ids) for o in wide}) > 3 and {o.finish_reason for o in wide} == {"stop", "length"}
    assert [o.token_ids for o in wide] == [o.token_ids for o in narrow]
    for a, b in zip(wide, narrow):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    other_seed = RolloutEngine(tiny_model, tokenizer, max_batch=4, max_length=128).generate(
        prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [o.token_ids for o in other_seed] != [o.token_ids for o in wide]


def test_engine_times_prefill_and_decode_apart(tiny_model, tokenizer, prompts):
    """The two phases' seconds add up to at most the call's wall time, and only decoding adds decode time."""
    engine = RolloutEngine(tiny_model, tokenizer, max_batch=4, max_length=128)
    start = time.perf_counter()
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=24, temperature=0, stop_token_ids=()))
    wall = time.perf_counter() - start
    assert engine.seconds["prefill"] > 0 and engine.seconds["decode"] > 0
    assert engine.seconds["prefill"] + engine.seconds["decode"] <= wall
    decode = engine.seconds["decode"]
    engine.generate(prompts[:4], SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=()))
    assert engine.seconds["decode"] == decode            # one new token comes from the prefill alone


def test_copies_of_a_prompt_share_one_prefill(tiny_model, tokenizer, prompts):
    """A GRPO batch holds each prompt several times: the copies admitted together run the prompt once
    and continue from its copied state, exactly as each would alone."""
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5, stop_token_ids=())
    grouped = [p for p in prompts[:3] for _ in range(3)]
    engine = RolloutEngine(tiny_model, tokenizer, max_batch=9, max_length=128)
    shared = engine.generate(grouped, params)
    assert engine.prefilled_tokens == sum(len(p) for p in prompts[:3])
    alone = RolloutEngine(tiny_model, tokenizer, max_batch=1, max_length=128).generate(grouped, params)
    assert [o.token_ids for o in shared] == [o.token_ids for o in alone]
    assert len({tuple(o.token_ids) for o in shared[:3]}) > 1       # each copy draws its own tokens
    for a, b in zip(shared, alone):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_prefill_groups_hold_their_padded_layout_within_the_budget():
    assert prefill_groups([5, 5, 5, 5], 10) == [range(0, 2), range(2, 4)]
    assert prefill_groups([2, 2, 6, 1], 12) == [range(0, 2), range(2, 4)]     # 3 x 6 = 18 is past 12
    assert prefill_groups([3, 12, 2], 10) == [range(0, 1), range(1, 2), range(2, 3)]
    assert prefill_groups([4, 4], 1 << 15) == [range(0, 2)] and prefill_groups([], 8) == []


def test_length_runs_cover_the_rows_and_start_where_the_length_falls_to_three_quarters():
    assert length_runs([73, 60, 55, 54, 41, 40, 12]) == [(0, 3, 73), (3, 5, 54), (5, 6, 40), (6, 7, 12)]
    assert length_runs([8, 8, 8]) == [(0, 3, 8)] and length_runs([5]) == [(0, 1, 5)] and length_runs([]) == []


def test_a_prefill_budget_splits_the_prefill_and_changes_no_token(tiny_model, tokenizer, prompts):
    """Prompts prefilled in several calls (copies of a prompt still sharing theirs) continue exactly as
    when all are prefilled in one."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, stop_token_ids=())
    grouped = [p for p in prompts for _ in range(2)]
    whole = RolloutEngine(tiny_model, tokenizer, max_batch=8, max_length=128)
    split = RolloutEngine(tiny_model, tokenizer, max_batch=8, max_length=128, max_prefill_tokens=2 * len(prompts[1]))
    calls = []
    split._prefill_packed = lambda seqs, run=split._prefill_packed: calls.append(len(seqs)) or run(seqs)
    want, got = whole.generate(grouped, params), split.generate(grouped, params)
    assert len(calls) > 2 and sum(calls) == len(prompts) and split.prefilled_tokens == whole.prefilled_tokens
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_draws_pick_tokens_in_proportion_to_their_probability():
    """Evenly spaced draws through [0, 1) hit each token as often as its probability says, to within one
    draw; a token that top-k removed is never picked, not even by the largest draw below 1."""
    logits = torch.tensor([[2.0, 0.5, 1.0, 0.0, -1.0]]).repeat(1000, 1)
    params = SamplingParams(top_k=4)
    logprobs = sampling_logprobs(logits, params)
    draws = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    counts = torch.bincount(choose_tokens(logprobs, params, draws), minlength=5)
    assert (counts - 1000 * logprobs[0].exp()).abs().max() <= 1 and counts[4] == 0
    edge = torch.full((1000,), torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0)).item())
    assert set(choose_tokens(logprobs, params, edge).tolist()) == {3}
    first, again, other = Draws(3), Draws(3), Draws(4)
    stream = [first.at(i) for i in range(2 * Draws.block + 5)]        # across block boundaries
    assert stream == [again.at(i) for i in range(len(stream))] and other.at(0) != stream[0]
    assert len(set(stream)) == len(stream) and all(0 <= d < 1 for d in stream)


def test_stop_token_stop_string_and_length(tiny_model, tokenizer, prompts):
    engine = RolloutEngine(tiny_model, tokenizer, max_batch=4, max_length=128)
    free = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=()))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop = free.token_ids[5]
    first = free.token_ids.index(stop)
    cut = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[: first + 1]
    assert cut.text == tokenizer.decode(free.token_ids[:first], skip_special_tokens=False)
    target = tokenizer.decode(free.token_ids[8:10], skip_special_tokens=False)
    by_text = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=(),
                                                          stop_strings=(target,)))[0]
    assert by_text.finish_reason == "stop" and target not in by_text.text
    assert by_text.text == free.text[: free.text.find(target)]


def test_thinking_budget_closes_the_think_block(tiny_model, tokenizer):
    think = tokenizer.encode("<|im_start|>assistant\n<think>", add_special_tokens=False)
    no_think = tokenizer.encode("<|im_start|>assistant\n<think></think>", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("</think>")
    engine = RolloutEngine(tiny_model, tokenizer, max_batch=2, max_length=128)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=0, stop_token_ids=(), thinking_budget=6)
    with_budget, without = engine.generate([think, no_think], params)
    assert with_budget.token_ids[6] == end and with_budget.forced[6] and sum(with_budget.forced) == 1
    assert end not in with_budget.token_ids[:6]
    assert not any(without.forced)


def test_runs_of_decode_steps_change_no_token(tiny_model, tokenizer, prompts):
    """Decode steps run back to back between host reads: sequences that stop, hit max_new_tokens or spend
    their thinking budget inside a run end exactly as when the host looks after every step."""
    think = tokenizer.encode("<|im_start|>assistant\n<think>", add_special_tokens=False)
    batch = [think, *prompts, think]
    free = RolloutEngine(tiny_model, tokenizer, max_batch=1, max_length=128).generate(
        batch, SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, stop_token_ids=()))
    params = SamplingParams(max_new_tokens=30, temperature=1.0, seed=2, thinking_budget=9,
                            stop_token_ids=(free[1].token_ids[4], free[3].token_ids[13]))
    each = RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=128, steps_per_sync=1).generate(batch, params)
    runs = RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=128, steps_per_sync=7).generate(batch, params)
    assert {o.finish_reason for o in runs} == {"stop", "length"} and any(any(o.forced) for o in runs)
    for a, b in zip(each, runs):
        assert (a.token_ids, a.forced, a.finish_reason) == (b.token_ids, b.forced, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_compiled_runs_of_steps_equal_eager_ones(tiny_model, tokenizer, prompts):
    """The compiled step goes through Dynamo on the first step of each batch size (with or without forced
    tokens) of a generate() call only, and the later steps replay its graph (``rollout.replay``): through
    sampled draws, forced ``</think>`` tokens, stops and a shrinking batch, its runs write what the eager
    step writes. A second call goes through Dynamo again: it may sample otherwise."""
    think = tokenizer.encode("<|im_start|>assistant\n<think>", add_special_tokens=False)
    batch = [think, *prompts, think]
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=2, thinking_budget=9)
    eager, engine = (RolloutEngine(tiny_model, tokenizer, max_batch=3, max_length=128, steps_per_sync=7,
                                   compile=compile) for compile in (False, True))
    calls, shapes = [], set()
    step, decode = engine._step, engine._decode

    def run(seqs, params):
        calls.append("run")
        shapes.add((len(seqs), any(s.to_force for s in seqs)))
        return decode(seqs, params)

    engine._step = lambda *args: calls.append("step") or step(*args)
    engine._decode = run
    eager, compiled = eager.generate(batch, params), engine.generate(batch, params)
    assert calls.count("run") > len(shapes) and calls.count("step") == len(shapes)
    assert any((n, True) in shapes and (n, False) in shapes for n, _ in shapes)
    calls.clear()
    engine.generate(batch[:1], params)
    assert calls.count("step") >= 1
    assert any(any(o.forced) for o in compiled)
    for a, b in zip(eager, compiled):
        assert (a.token_ids, a.forced, a.finish_reason) == (b.token_ids, b.forced, b.finish_reason)
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_pick_gives_forced_tokens_the_models_own_logprob():
    logits = torch.tensor([[2.0, 0.5, 1.0, 0.0], [0.0, 1.0, 3.0, 0.5]])
    params = SamplingParams(temperature=0.5, top_k=2)
    draws = torch.tensor([0.3, 0.9], dtype=torch.float64)
    tokens, logprobs = pick(logits, params, draws, torch.tensor([3, -1]))
    sampled = choose_tokens(sampling_logprobs(logits, params), params, draws)
    assert tokens.tolist() == [3, sampled[1].item()]
    torch.testing.assert_close(logprobs[0], torch.log_softmax(logits[0], -1)[3])    # filtered out by top-k
    torch.testing.assert_close(logprobs[1], sampling_logprobs(logits, params)[1, tokens[1]])
    assert torch.equal(pick(logits, params, draws, None)[0], sampled)


def test_load_weights_follows_the_trainer_in_memory(tokenizer, prompts):
    policy = build_model("tiny", tokenizer, seed=0).eval()
    engine = RolloutEngine(policy, tokenizer, max_batch=4, max_length=128)
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=())
    before = engine.generate(prompts, params)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    stale = engine.generate(prompts, params)
    assert [o.logprobs for o in stale] == [o.logprobs for o in before]     # the engine owns its copy
    engine.load_weights(policy)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        torch.testing.assert_close(torch.tensor(out.logprobs), model_logprobs(policy, prompt, out.token_ids),
                                   atol=1e-4, rtol=0)


def test_compiled_decode_step_equals_generate_and_follows_load_weights(tokenizer, prompts):
    """``compile=True``: the same tokens and log-probabilities, through a shrinking batch (4 prompts on 3
    slots, the last one alone) and after a weight refresh, which the compiled step must see."""
    policy = build_model("tiny", tokenizer, seed=0).eval()
    engine = RolloutEngine(policy, tokenizer, max_batch=3, max_length=128, compile=True)
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=())
    for _ in range(2):
        for prompt, out in zip(prompts, engine.generate(prompts, params)):
            want = policy.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                   pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            assert out.token_ids == want
            torch.testing.assert_close(torch.tensor(out.logprobs), model_logprobs(policy, prompt, out.token_ids),
                                       atol=1e-4, rtol=0)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.load_weights(policy)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_compiled_step_compiles_once_for_one_row_and_once_for_more(tokenizer, prompts, temperature):
    """After a batch of three and a batch of one, runs of other batch sizes, step counts and KV spans reuse
    those two graphs, greedy or sampled. A size that Dynamo's duck sizing ties to another would compile
    again: the first run's 3 steps and batch of 3 against the conv state's width - 1, also 3, if the conv
    buffer behind its view were left dynamic; its 3 steps against its batch of 3, and a later run of one
    step, if the step count reached the guards through the views each step takes of its run's sampling
    draws."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    engine = RolloutEngine(build_model("tiny", tokenizer, seed=0).eval(), tokenizer, max_batch=4, max_length=128,
                           compile=True)
    for n, new_tokens in ((3, 4), (1, 4), (2, 20), (2, 10), (4, 12)):   # runs of 3 steps, of 8, of 1
        params = SamplingParams(max_new_tokens=new_tokens, temperature=temperature, stop_token_ids=())
        engine.generate(prompts[:n], params)
        if n == 1:
            warm = counters["stats"]["unique_graphs"]
    assert warm == 2 and counters["stats"]["unique_graphs"] == warm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_equal_the_models_own_bit_for_bit(tiny_model, dtype):
    block = copy.deepcopy(tiny_model.model.layers[0]).to(dtype)
    for norm in (block.norm, block.mixer.norm):
        torch.nn.init.normal_(norm.weight)
    torch.manual_seed(0)
    hidden, inner = block.norm.weight.shape[0], block.mixer.norm.weight.shape[0]
    x, y, gate = (torch.randn(5, width, dtype=dtype) for width in (hidden, inner, inner))
    assert torch.equal(rms_norm(block.norm, x), block.norm(x))
    assert torch.equal(gated_rms_norm(block.mixer.norm, y, gate), block.mixer.norm(y, gate))


def test_state_memory_is_fixed_per_sequence(tiny_model):
    short, long = StateCache(tiny_model, slots=2, max_length=64), StateCache(tiny_model, slots=2, max_length=4096)
    assert short.mamba_bytes_per_sequence() == long.mamba_bytes_per_sequence() > 0
    config = tiny_model.config
    attention_layers = config.layers_block_type.count("full_attention")
    assert short.kv_bytes_per_token() == 2 * attention_layers * config.num_key_value_heads * config.head_dim * 4


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top1 = sampling_logprobs(logits, SamplingParams(top_k=1))
    assert torch.isfinite(top1).tolist() == [[True, False, False, False]]
    nucleus = sampling_logprobs(logits, SamplingParams(top_p=0.8))
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False]]    # 0.665 < 0.8 <= 0.910
    torch.testing.assert_close(nucleus.exp().sum(), torch.tensor(1.0))
    hot = sampling_logprobs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(hot, torch.log_softmax(logits / 2, -1))
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
