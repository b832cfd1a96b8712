"""The rollout engine: fast generation for hybrid Mamba-2/attention models (``NemotronHForCausalLM``).

Why not ``generate()``: a hybrid model decodes fast only if each sequence keeps one fixed-size Mamba
state. Here every sequence owns a *slot* in preallocated buffers (conv and SSM states for the Mamba
layers, a KV cache for the few attention layers); nothing grows by concatenation. Decode steps pick
their tokens on the device and run back to back, the host reading the tokens after each run of
``steps_per_sync`` steps; a sequence that finished in the run then frees its slot and the next waiting
prompt takes it (continuous batching), so one long trace never holds a whole batch. New prompts are
prefilled packed into one row, each from a zero state; copies of one prompt admitted together (GRPO samples each prompt several times) run it once and share its state.
The n running sequences always hold slots 0..n-1 (when one finishes, the last moves into its slot), so
a decode step reads and writes every buffer through a view of its first n rows, never a gathered copy.

The engine holds its own copy of the weights, refreshed in memory from the trainer by ``load_weights``.
The Mamba math comes from ``rollout.kernels``: Triton on GPU; on CPU C++ kernels (``rollout.kernels.cpu``)
for a Mamba layer's prefill and decode step between its projections and for the decode attention, the
PyTorch references where those do not fit. On a GPU
each decode step, token choice included, replays as one CUDA graph (``rollout.graphs``); with
``compile=True`` the steps of a ``generate()`` call after the first at each batch size call that step's
compiled graph directly, without Dynamo (``rollout.replay``).
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel
from tqdm import tqdm

from rollout import kernels
from rollout.graphs import DecodeGraphs
from rollout.kernels.ssd_scan import _owners
from rollout.replay import Replay
from rollout.sampling import Draws, SamplingParams, pick
from rollout.weights import copy_parameters, full_parameters, is_sharded, unsharded_copy

MAMBA, ATTENTION = "linear_attention", "full_attention"


@dataclass
class Completion:
    """One generated sequence. ``logprobs[i]`` is the log-probability of ``token_ids[i]`` under the
    sampling distribution; ``forced[i]`` marks tokens the engine wrote itself (the ``</think>`` that
    ends a spent thinking budget), whose log-probability is the model's own."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    forced: list[bool]
    text: str
    finish_reason: str          # "stop" (stop token or string) or "length"


@dataclass
class _Sequence:
    prompt_ids: list[int]
    draws: Draws | None         # its sampling draws; None when greedy
    thinking: bool
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    to_force: deque = field(default_factory=deque)
    thought: int = 0
    finish_reason: str | None = None


class StateCache:
    """Per-slot decoding state of every layer, allocated once: Mamba conv and SSM states, attention KV."""

    def __init__(self, model: Any, slots: int, max_length: int, state_dtype: torch.dtype = torch.float32):
        """On CPU the keys are stored position-major, ``[slots, kv_heads, head_dim, max_length]`` behind a
        transposed view, as ``kernels.decode_attention_cpp`` reads them."""
        config, param = model.config, next(model.parameters())
        self.max_length = max_length
        self.conv: dict[int, torch.Tensor] = {}
        self.ssm: dict[int, torch.Tensor] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for i, block in enumerate(model.model.layers):
            mixer = block.mixer
            if block.block_type == MAMBA:
                # [slots, conv_dim, width - 1] as the kernels take it, stored tap-major: a tap's channels
                # are contiguous, which the compiled CPU step reads without strided loads
                self.conv[i] = param.new_zeros(slots, mixer.conv_kernel_size - 1, mixer.conv_dim).transpose(1, 2)
                self.ssm[i] = param.new_zeros(slots, mixer.num_heads, mixer.head_dim, mixer.ssm_state_size,
                                              dtype=state_dtype)
            elif block.block_type == ATTENTION:
                shape = (slots, config.num_key_value_heads, max_length, mixer.head_dim)
                self.keys[i] = (param.new_zeros(*shape[:2], mixer.head_dim, max_length).transpose(2, 3)
                                if param.device.type == "cpu" else param.new_zeros(shape))
                self.values[i] = param.new_zeros(shape)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=param.device)

    def buffers(self) -> list[torch.Tensor]:
        """Every layer's state buffer (conv, SSM, keys, values), as the decode step reads them."""
        return [*self.conv.values(), *self.ssm.values(), *self.keys.values(), *self.values.values()]

    def mamba_bytes_per_sequence(self) -> int:
        """Conv plus SSM state of one sequence: fixed, whatever its length."""
        return sum(t[0].numel() * t.element_size() for t in (*self.conv.values(), *self.ssm.values()))

    def copy(self, sources: Sequence[int], targets: Sequence[int]) -> None:
        """Copy the state of slots ``sources`` (their cached tokens only) into the distinct slots ``targets``."""
        sources, targets = (torch.tensor(s, device=self.lengths.device) for s in (sources, targets))
        span = int(self.lengths[sources].max())
        kv = [buffer[:, :, :span] for buffer in (*self.keys.values(), *self.values.values())]
        # index_copy_ of an index_select: on CPU about 1.7x as fast as assigning to advanced indexing
        for buffer in (*self.conv.values(), *self.ssm.values(), *kv, self.lengths):
            buffer.index_copy_(0, targets, buffer.index_select(0, sources))

    def kv_bytes_per_token(self) -> int:
        """KV cache of one token of one sequence over all attention layers."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (*self.keys.values(), *self.values.values()))


def _fp32(norm: Any, x: torch.Tensor) -> bool:
    """Whether a norm runs wholly in fp32, where a fused call computes the module's bits on any release."""
    return x.dtype == norm.weight.dtype == torch.float32


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """``NemotronHRMSNorm``. A decode step runs a norm per layer, and at decode sizes each call's overhead is
    its cost, so the module's seven calls become one: on a GPU the Triton kernel, which rounds where the
    module does; on CPU in fp32 a fused PyTorch call. On CPU in lower precision, the module itself: where it
    rounds changed between transformers releases (to bf16 before the weight multiply up to 5.17, after it
    from 5.18), and the engine must round where the training model does (the kernel's tests compare it
    with the installed module)."""
    if x.is_cuda:
        return kernels.rms_norm(x, norm.weight, eps=norm.variance_epsilon)
    if not _fp32(norm, x):
        return norm(x)
    return F.rms_norm(x, x.shape[-1:], norm.weight, norm.variance_epsilon)


def gated_rms_norm(norm: Any, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``NemotronHRMSNormGated``: x * silu(gate), normalized per group of ``norm.group_size`` channels;
    one kernel on a GPU, fused in fp32 and the module itself in lower precision on CPU, as ``rms_norm``."""
    if x.is_cuda:
        return kernels.gated_rms_norm(x, gate, norm.weight, eps=norm.variance_epsilon, group_size=norm.group_size)
    if not _fp32(norm, x):
        return norm(x, gate)
    groups = (x * F.silu(gate)).unflatten(-1, (-1, norm.group_size))
    return norm.weight * F.rms_norm(groups, groups.shape[-1:], eps=norm.variance_epsilon).flatten(-2)


class Padding(NamedTuple):
    """Packed prompts as rows of a [nseq, longest, ...] batch padded at the end, longest first, and back:
    lets the attention prefill run every prompt at once instead of one by one. Each way is one
    ``index_select`` over the packed tokens."""

    source: torch.Tensor  # [nseq * longest] the token at each padded position (token 0 past a prompt's end)
    valid: torch.Tensor   # [nseq, longest] bool: a token, not padding
    target: torch.Tensor  # [ntokens] the padded position of each token
    order: torch.Tensor   # [nseq] the prompt in each row

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, ntokens: int) -> Padding:
        """The layout of the prompts at int64 offsets ``cu_seqlens``, which must cover ``ntokens``."""
        device = cu_seqlens.device
        starts, lengths = cu_seqlens[:-1], cu_seqlens.diff()
        order = torch.argsort(lengths, descending=True, stable=True)           # the prompt of each row
        rows = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=device))
        longest = int(lengths.max())
        steps = torch.arange(longest, device=device)
        valid = steps < lengths[order, None]
        owner = _owners(cu_seqlens, ntokens)
        target = rows[owner] * longest + torch.arange(ntokens, device=device) - starts[owner]
        return cls(torch.where(valid, starts[order, None] + steps, 0).flatten(), valid, target, order)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """[1, ntokens, ...] -> [nseq, longest, ...]. Past a prompt's end a row holds copies of token 0:
        finite values that causal attention never reads, which saves a pass over every padded tensor."""
        return t.flatten(0, 1).index_select(0, self.source).unflatten(0, self.valid.shape)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[nseq, longest, ...] -> [1, ntokens, ...]: each token from its padded position."""
        return padded.flatten(0, 1).index_select(0, self.target)[None]


def prefill_groups(lengths: Sequence[int], budget: int) -> list[range]:
    """Consecutive runs of prompts, each prefilled in one call whose padded layout (prompts times the
    longest) holds at most ``budget`` tokens; a prompt longer than the budget goes alone."""
    if not lengths:
        return []
    groups, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        longest = max(longest, length)
        if i > start and (i + 1 - start) * longest > budget:
            groups.append(range(start, i))
            start, longest = i, length
    return groups + [range(start, len(lengths))]


def length_runs(lengths: Sequence[int], shrink: float = 0.75) -> list[tuple[int, int, int]]:
    """Runs of the rows of a longest-first padded batch (``lengths`` non-increasing), each as (first row,
    end row, the run's longest length): a run ends before the first row at most ``shrink`` times as long as
    the run's first. Causal attention over a run pads its rows only to that run's longest, and its cost goes
    as rows times length squared: for 64 prompts of 27 to 73 tokens, four runs do 59% of the work of one."""
    runs: list[tuple[int, int, int]] = []
    for row, length in enumerate(lengths):
        if not runs or length <= shrink * runs[-1][2]:
            runs.append((row, row + 1, length))
        else:
            runs[-1] = (runs[-1][0], row + 1, runs[-1][2])
    return runs


def unwrap(model: Any) -> Any:
    """The bare model inside a DDP / accelerate wrapper. FSDP version 1 is refused: its parameters are views
    of each process's flat shard, which the engine would copy as they are (``rollout.weights`` reads FSDP2)."""
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError("the rollout engine cannot read a model under FSDP version 1; use fsdp_version: 2 in the "
                         "accelerate config (as configs/accelerate/fsdp.yaml does), or DeepSpeed ZeRO-3")
    while hasattr(model, "module"):
        model = model.module
    return model


class RolloutEngine:
    """Generates for batches of prompts with continuous batching over ``max_batch`` state slots."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 64, max_length: int = 4096,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, compile: bool = False,
                 cuda_graphs: bool = True, max_prefill_tokens: int = 32768, steps_per_sync: int = 8):
        """``max_prefill_tokens``: the most prompt tokens one prefill call runs, counted as its padded
        layout (prompts times the longest). Admitted prompts past it are prefilled in further calls, so a
        batch of long prompts does not hold activations for all of them at once (64 prompts of 8k tokens
        would need about 24 GB for one Mamba layer's input projection of Nemotron Nano 2 in bf16).

        ``steps_per_sync``: decode steps run back to back before the host reads their tokens. Each step
        picks its tokens on the device and feeds them to the next, so the host neither waits for the
        device nor walks the sequences every step; a sequence that stops inside a run of steps is seen
        (and its slot freed) at the run's end, and the tokens it wrote past its stop are dropped.

        ``compile``: run the decode step, token choice included, through ``torch.compile`` (dynamic
        shapes, so a shrinking batch and a growing context reuse one graph). Each decode step is a few
        hundred small ops; compiled, the elementwise ones fuse into a few loops. The first step pays the
        compile time.

        ``cuda_graphs``: on a CUDA device and unless ``compile``, replay each decode step, token choice
        included, as one CUDA graph (``rollout.graphs``), recorded at the first step of each batch size."""
        model = unwrap(model)
        device = device or next(model.parameters()).device
        self.model = (unsharded_copy(model, device, dtype or next(model.parameters()).dtype) if is_sharded(model)
                      else copy.deepcopy(model).to(device=device, dtype=dtype))
        self.model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_batch, self.max_length, self.max_prefill_tokens = max_batch, max_length, max_prefill_tokens
        if steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
        self.steps_per_sync = steps_per_sync
        self.cache: StateCache | None = None
        self.prefilled_tokens = 0   # prompt tokens run through the model so far (shared prompts count once)
        # Wall seconds so far in prefill (with each prompt's first token) and in decode steps. Both phases
        # end by reading their tokens back to the host, so no extra synchronisation is needed to time them.
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.think_end = tokenizer.encode("</think>", add_special_tokens=False)
        self.decay, self.taps = self._weight_terms()
        if self.device.type == "cpu":
            kernels.build_cpu_kernels()
        if compile:
            self._mark_static([*self.decay.values(), *self.taps.values()])
        cuda_graphs = cuda_graphs and self.device.type == "cuda" and not compile
        self.graphs = DecodeGraphs(self) if cuda_graphs else None
        # On CPU the C++ wrapper calls the compiled step's kernels from C++ instead of from Python: about 9%
        # less time per decode step of the tiny model at batches 1, 16 and 64, for a longer first compile.
        self.replay = Replay({"cpp_wrapper": self.device.type == "cpu"}) if compile else None
        self._step = (torch.compile(self._decode_and_pick, dynamic=True, backend=self.replay) if compile
                      else self._decode_and_pick)
        self._replays: dict[tuple[int, bool], Any] = {}     # see _decode

    def _weight_terms(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Terms of each Mamba layer's weights, computed once per weight version instead of per step:
        A = -exp(A_log), and the conv weight tap-major [width, conv_dim], as the conv state is stored (the
        decode step passes its transposed view: compiled on CPU, each tap's weights are then one vector load)."""
        mixers = {i: block.mixer for i, block in enumerate(self.model.model.layers) if block.block_type == MAMBA}
        return ({i: -torch.exp(mixer.A_log.float()) for i, mixer in mixers.items()},
                {i: mixer.conv1d.weight[:, 0].t().contiguous() for i, mixer in mixers.items()})

    @staticmethod
    def _mark_static(tensors: Iterable[torch.Tensor]) -> None:
        """Buffers of fixed size that the compiled step reads: their sizes are constants to the compiler.
        Left dynamic, a size that happens to equal the first batch's (KV heads, slots) would be tied to
        it, and every other batch size would compile again. A view's base is marked too (the conv states
        are views of tap-major buffers): Dynamo guards on its sizes as well."""
        for tensor in tensors:
            for t in (tensor, tensor._base):
                if t is not None:
                    torch._dynamo.mark_static(t)

    @property
    def compiled(self) -> bool:
        return self.replay is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def load_weights(self, source: Any) -> None:
        """Copy the trainer's current weights (a model, sharded or not, or a state dict) into the engine, in
        memory. From a ZeRO-3 or FSDP2 model it is a collective: every process calls it at the same point."""
        try:
            copy_parameters(self.model, source.items() if isinstance(source, dict) else full_parameters(unwrap(source)))
        except KeyError as error:
            raise KeyError(f"load_weights: {error.args[0]}") from None
        for terms, values in zip((self.decay, self.taps), self._weight_terms()):
            for i, value in values.items():     # in place: a compiled step keeps reading these tensors
                terms[i].copy_(value)

    # ---- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams,
                 progress: bool = False, first_index: int = 0) -> list[Completion]:
        """Completions in the order of ``prompts`` (token ids, or text encoded without special tokens).

        Prompt i samples from its own seed, ``params.seed`` and ``first_index + i``: processes that each
        generate a slice of a batch, passing where their slice starts, sample what one process would."""
        ids = [self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else list(p)
               for p in prompts]
        if any(not p for p in ids):
            raise ValueError("generate: empty prompt")
        need = max(len(p) for p in ids) + params.max_new_tokens
        if need > self.max_length:
            raise ValueError(f"generate: prompt plus max_new_tokens is {need} tokens, over max_length "
                             f"{self.max_length} of the engine")
        if self.cache is None:
            self.cache = StateCache(self.model, self.max_batch, self.max_length)
            if self.compiled:
                self._mark_static(self.cache.buffers())
        self._replays.clear()   # a graph bakes in the sampling settings, which may differ from the last call's
        stops = set(params.stop_token_ids if params.stop_token_ids is not None else [self.tokenizer.eos_token_id])
        sampled = params.temperature > 0
        seqs = [_Sequence(p, Draws(params.seed * 1_000_003 + i) if sampled else None, thinking=self._opens_thinking(p))
                for i, p in enumerate(ids, start=first_index)]
        waiting, running = deque(seqs), []
        bar = tqdm(total=len(seqs), desc="rollout", disable=not progress, leave=False)
        while waiting or running:
            admitted = [waiting.popleft() for _ in range(min(len(waiting), self.max_batch - len(running)))]
            for slot, seq in enumerate(admitted, start=len(running)):
                seq.slot = slot
            if admitted:  # their first token may already end them
                new = self._timed("prefill", self._first_tokens, admitted, params)
                running = self._compact(running + self._accept(admitted, *new, stops, params, bar))
            if running:
                new = self._timed("decode", self._decode, running, params)
                running = self._compact(self._accept(running, *new, stops, params, bar))
        bar.close()
        return [self._completion(s, stops, params) for s in seqs]

    def _timed(self, phase: str, run: Any, *args: Any) -> Any:
        """``run(*args)``, its wall time added to ``self.seconds[phase]``; under ``torch.profiler`` it is
        also a range named ``rollout.<phase>``, which ``bench_hybrid --profile`` reads."""
        start = time.perf_counter()
        with torch.profiler.record_function(f"rollout.{phase}"):
            out = run(*args)
        self.seconds[phase] += time.perf_counter() - start
        return out

    def _opens_thinking(self, prompt: list[int]) -> bool:
        """Whether the prompt leaves a ``<think>`` block open for the model to reason in."""
        text = self.tokenizer.decode(prompt[-16:], skip_special_tokens=False)
        return text.rfind("<think>") > text.rfind("</think>")

    def _schedule(self, seqs: list[_Sequence], steps: int,
                  params: SamplingParams) -> tuple[torch.Tensor | None, list[list[int]] | None]:
        """The sequences' next ``steps`` sampling draws [steps, len(seqs)] on the device (None when greedy)
        and, on the host, the tokens the engine writes itself at those steps [len(seqs)][steps] (-1 where
        the model chooses; None when no sequence has any)."""
        draws = (torch.tensor([[s.draws.at(len(s.tokens) + j) for s in seqs] for j in range(steps)],
                              dtype=torch.float64, device=self.device) if params.temperature > 0 else None)
        if not any(s.to_force for s in seqs):
            return draws, None
        return draws, [[s.to_force[j] if j < len(s.to_force) else -1 for j in range(steps)] for s in seqs]

    def _steps(self, seqs: list[_Sequence], params: SamplingParams) -> int:
        """Decode steps to run before the host looks: at most ``steps_per_sync``, and none past a sequence's
        ``max_new_tokens`` or past the end of its thinking budget (so the ``</think>`` the engine writes
        then is known when the next run of steps is scheduled)."""
        steps = self.steps_per_sync
        for seq in seqs:
            steps = min(steps, params.max_new_tokens - len(seq.tokens))
            if seq.thinking and not seq.to_force and params.thinking_budget is not None:
                steps = min(steps, params.thinking_budget - seq.thought)
        return max(steps, 1)

    def _accept(self, seqs: list[_Sequence], tokens: list[list[int]], logprobs: list[list[float]],
                forced: list[list[bool]], stops: set[int], params: SamplingParams, bar: tqdm) -> list[_Sequence]:
        """Append each sequence's new tokens [len(seqs)][steps] up to the first that ends it; returns the
        sequences still running."""
        still = []
        for seq, *new in zip(seqs, tokens, logprobs, forced):
            for token, logprob, was_forced in zip(*new):
                if was_forced:
                    seq.to_force.popleft()
                seq.tokens.append(token)
                seq.logprobs.append(logprob)
                seq.forced.append(was_forced)
                self._track_thinking(seq, params)
                if self._ends_on_stop_token(seq, stops) or self._hit_stop_string(seq, params):
                    seq.finish_reason = "stop"
                elif len(seq.tokens) >= params.max_new_tokens:
                    seq.finish_reason = "length"
                if seq.finish_reason is not None:
                    bar.update()
                    break
            else:
                still.append(seq)
        return still

    def _track_thinking(self, seq: _Sequence, params: SamplingParams) -> None:
        """Count thinking tokens; when the budget is spent, queue ``</think>`` to be written next."""
        if not seq.thinking:
            return
        if seq.tokens[-len(self.think_end):] == self.think_end:
            seq.thinking = False
        elif not seq.to_force:
            seq.thought += 1
            if params.thinking_budget is not None and seq.thought >= params.thinking_budget:
                seq.to_force.extend(self.think_end)

    def _compact(self, running: list[_Sequence]) -> list[_Sequence]:
        """Move the sequences in slots past ``len(running)`` into the slots finished ones left free, so the
        running sequences hold slots 0..n-1; returns them in slot order (``running`` comes in slot order,
        so it is returned as is when nothing finished)."""
        n = len(running)
        movers = [s for s in running if s.slot >= n]
        if not movers:
            return running
        free = sorted(set(range(n)) - {s.slot for s in running})
        self.cache.copy([s.slot for s in movers], free[: len(movers)])
        for seq, slot in zip(movers, free):
            seq.slot = slot
        return sorted(running, key=lambda s: s.slot)

    @staticmethod
    def _ends_on_stop_token(seq: _Sequence, stops: set[int]) -> bool:
        return seq.tokens[-1] in stops and not seq.forced[-1]

    def _hit_stop_string(self, seq: _Sequence, params: SamplingParams) -> bool:
        """Whether a stop string just appeared in the completion's recent text."""
        if not params.stop_strings:
            return False
        window = max(len(s) for s in params.stop_strings) + 8
        tail = self.tokenizer.decode(seq.tokens[-window:], skip_special_tokens=False)
        return any(s in tail for s in params.stop_strings)

    def _completion(self, seq: _Sequence, stops: set[int], params: SamplingParams) -> Completion:
        body = seq.tokens[:-1] if self._ends_on_stop_token(seq, stops) else seq.tokens
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        cut = [text.find(s) for s in params.stop_strings if s in text]
        return Completion(seq.prompt_ids, seq.tokens, seq.logprobs, seq.forced, text[: min(cut)] if cut else text,
                          seq.finish_reason or "length")

    # ---- the model, prefill and decode --------------------------------------------------------------------

    def _prefill(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Run each distinct prompt once and fill the slots; returns the logits [len(seqs), vocab] after
        each prompt. Sequences with the same prompt (a GRPO group) share one prefill: the first one's
        state is copied into the others' slots."""
        first: dict[tuple[int, ...], int] = {}
        leader = [first.setdefault(tuple(s.prompt_ids), i) for i, s in enumerate(seqs)]
        distinct = [seqs[i] for i in first.values()]
        groups = prefill_groups([len(s.prompt_ids) for s in distinct], self.max_prefill_tokens)
        logits = torch.cat([self._prefill_packed([distinct[j] for j in group]) for group in groups])
        if len(distinct) < len(seqs):
            copies = [i for i, j in enumerate(leader) if i != j]
            self.cache.copy([seqs[leader[i]].slot for i in copies], [seqs[i].slot for i in copies])
        row = {i: r for r, i in enumerate(first.values())}
        return logits[[row[j] for j in leader]]

    def _prefill_packed(self, seqs: list[_Sequence]) -> torch.Tensor:
        """Prefill the sequences' prompts packed into one row; returns the logits after each prompt."""
        device = self.device
        ids = torch.tensor([t for s in seqs for t in s.prompt_ids], device=device)[None]
        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=device)
        cu = F.pad(lengths.cumsum(0), (1, 0))
        slots = torch.tensor([s.slot for s in seqs], device=device)
        layout = Padding.of(cu, ids.shape[1])
        runs, rows = length_runs(sorted((len(s.prompt_ids) for s in seqs), reverse=True)), slots[layout.order]
        # Past the last Mamba or attention layer nothing is cached, so only each prompt's last token goes on.
        layers = self.model.model.layers
        cached = 1 + max((i for i, b in enumerate(layers) if b.block_type in (MAMBA, ATTENTION)), default=-1)
        hidden = self._layers(self.model.model.embeddings(ids),
                              lambda i, mixer, x: self._mamba_prefill(i, mixer, x, cu, slots),
                              lambda i, attn, x: self._attention_prefill(i, attn, x, layout, runs, rows),
                              layers=range(cached))
        self.cache.lengths[slots] = lengths
        self.prefilled_tokens += ids.shape[1]
        hidden = self._layers(hidden[0, cu[1:] - 1], None, None, layers=range(cached, len(layers)))
        return self._logits(hidden)

    def _first_tokens(self, seqs: list[_Sequence],
                      params: SamplingParams) -> tuple[list[list[int]], list[list[float]], list[list[bool]]]:
        """Prefill the admitted sequences and pick each one's first token; returns it as ``_decode`` returns
        a run of one step."""
        draws, _ = self._schedule(seqs, 1, params)
        tokens, logprobs = pick(self._prefill(seqs), params, None if draws is None else draws[0], None)
        return tokens[:, None].tolist(), logprobs[:, None].tolist(), [[False]] * len(seqs)

    def _decode(self, seqs: list[_Sequence],
                params: SamplingParams) -> tuple[list[list[int]], list[list[float]], list[list[bool]]]:
        """Run ``_steps`` decode steps, each feeding every sequence's last token (sequence i holds slot i)
        and picking its next on the device; returns the new tokens, their log-probabilities and whether the
        engine forced them, each [len(seqs)][steps], read back to the host once."""
        steps = self._steps(seqs, params)
        draws, forced = self._schedule(seqs, steps, params)
        forced_ids = None if forced is None else torch.tensor(forced, device=self.device).t().contiguous()
        tokens = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        positions = self.cache.lengths[: len(seqs)]
        draws, forced_ids = (self._run_rows(t) for t in (draws, forced_ids))
        new_tokens, new_logprobs = [], []
        # Compiled: the graph an earlier step of this generate() ran on a batch of this size, with or without
        # forced tokens, called directly (rollout.replay); only the first such step goes through Dynamo. (Whether
        # there are draws is fixed by the call's sampling settings.)
        shape = (len(seqs), forced_ids is None)
        again = self._replays.get(shape)
        for j in range(steps):
            inputs = (tokens, *(None if t is None else t[j] for t in (draws, forced_ids)))
            if again is None:
                tokens, logprobs = out = self._step(*inputs, positions, params)
                again = self.replay.again(inputs, out) if self.compiled else None
                if again is not None:
                    self._replays[shape] = again
            else:
                tokens, logprobs = again(*inputs)
            positions += 1
            new_tokens.append(tokens)
            new_logprobs.append(logprobs)
        was_forced = [[False] * steps] * len(seqs) if forced is None else [[t >= 0 for t in row] for row in forced]
        return torch.stack(new_tokens, 1).tolist(), torch.stack(new_logprobs, 1).tolist(), was_forced

    def _run_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """For the compiled step, a run's per-step inputs [steps, ...] padded to ``steps_per_sync`` rows, so
        that each step's row is a view of a tensor of one size whatever the run's length, that size marked
        static: Dynamo guards on a view's base, and would compile the step again for a run of one step, or
        for a run whose step count it had tied to an equal batch size. Uncompiled, they are left as they are."""
        if t is None or not self.compiled:
            return t
        if len(t) < self.steps_per_sync:
            t = F.pad(t, (0, 0) * (t.dim() - 1) + (0, self.steps_per_sync - len(t)))
        torch._dynamo.mark_static(t, 0)
        return t

    def _decode_and_pick(self, tokens: torch.Tensor, draws: torch.Tensor | None, forced: torch.Tensor | None,
                         positions: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step and the choice of the next tokens (replayed as one CUDA graph where recorded). The
        first three arguments are new tensors at every step of a run; ``positions`` is updated in place."""
        if self.graphs is not None:
            return self.graphs(tokens, draws, forced, positions, params)
        return pick(self._decode_step(tokens, positions), params, draws, forced)

    def _decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The model on one token per sequence, reading and writing the first rows of the cache in place;
        row i writes its key and value at ``positions[i]`` and attends to the positions up to it."""
        hidden = self._layers(self.model.model.embeddings(tokens),
                              lambda i, mixer, x: self._mamba_step(i, mixer, x),
                              lambda i, attn, x: self._attention_step(i, attn, x, positions))
        return self._logits(hidden)

    def _layers(self, hidden: torch.Tensor, mamba: Any, attention: Any,
                layers: Iterable[int] | None = None) -> torch.Tensor:
        """The residual stack (or the given layers of it); Mamba and attention mixers run through the given
        stateful functions."""
        for i in range(len(self.model.model.layers)) if layers is None else layers:
            block = self.model.model.layers[i]
            x = rms_norm(block.norm, hidden.to(block.norm.weight.dtype))
            if block.block_type == MAMBA:
                x = mamba(i, block.mixer, x)
            elif block.block_type == ATTENTION:
                x = attention(i, block.mixer, x)
            else:
                x = block.mixer(x)
            hidden = hidden + x
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(rms_norm(self.model.model.norm_f, hidden)).float()

    @staticmethod
    def _mamba_split(mixer: Any, projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """in_proj's output as (gate, conv input x|B|C, dt)."""
        return projected.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)

    @staticmethod
    def _ssm_inputs(mixer: Any, xbc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conv output as (x, B, C)."""
        return xbc.split([mixer.intermediate_size, *2 * [mixer.n_groups * mixer.ssm_state_size]], dim=-1)

    def _fused_mamba(self, i: int, mixer: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Layer i's states (tap-major conv state, SSM state; written in place) and weights: the arguments of
        the fused CPU kernels (``kernels.mamba_step_cpp``, ``kernels.mamba_prefill_cpp``) after in_proj's
        output and, for a prefill, the prompts' layout."""
        return ((self.cache.conv[i].transpose(1, 2), self.taps[i], mixer.conv1d.bias, self.cache.ssm[i],
                 self.decay[i], mixer.D, mixer.dt_bias, mixer.norm.weight),
                dict(eps=mixer.norm.variance_epsilon, group_size=mixer.norm.group_size,
                     dt_limit=mixer.time_step_limit))

    def _mamba_prefill(self, i: int, mixer: Any, x: torch.Tensor, cu: torch.Tensor, slots: torch.Tensor):
        projected = mixer.in_proj(x)
        if kernels.fits_mamba_step(projected, self.cache.ssm[i]):
            args, kwargs = self._fused_mamba(i, mixer)
            return mixer.out_proj(kernels.mamba_prefill_cpp(projected[0], cu, slots, *args, **kwargs)[None])
        total = x.shape[1]
        gate, xbc, dt = self._mamba_split(mixer, projected)
        xbc, conv_states = kernels.causal_conv1d(xbc, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, cu_seqlens=cu)
        self.cache.conv[i][slots] = conv_states.to(self.cache.conv[i].dtype)
        xs, B, C = self._ssm_inputs(mixer, xbc)
        groups = (1, total, mixer.n_groups, mixer.ssm_state_size)
        y, states = kernels.ssd_scan(
            xs.reshape(1, total, mixer.num_heads, mixer.head_dim), dt, self.decay[i],
            B.reshape(groups), C.reshape(groups), mixer.D, mixer.dt_bias, chunk_size=mixer.chunk_size,
            dt_limit=mixer.time_step_limit, cu_seqlens=cu)
        self.cache.ssm[i][slots] = states.to(self.cache.ssm[i].dtype)
        return mixer.out_proj(gated_rms_norm(mixer.norm, y.reshape(1, total, -1), gate).to(x.dtype))

    def _mamba_step(self, i: int, mixer: Any, x: torch.Tensor) -> torch.Tensor:
        projected = mixer.in_proj(x)
        if kernels.fits_mamba_step(projected, self.cache.ssm[i]):
            args, kwargs = self._fused_mamba(i, mixer)
            return mixer.out_proj(kernels.mamba_step_cpp(projected, *args, **kwargs))
        batch = x.shape[0]
        gate, xbc, dt = self._mamba_split(mixer, projected)
        xbc = kernels.causal_conv1d_update(xbc, self.cache.conv[i], self.taps[i].t(), mixer.conv1d.bias,
                                           slot_idx=None)
        xs, B, C = self._ssm_inputs(mixer, xbc)
        groups = (batch, mixer.n_groups, mixer.ssm_state_size)
        y = kernels.selective_state_update(
            self.cache.ssm[i], xs.reshape(batch, mixer.num_heads, mixer.head_dim), dt,
            self.decay[i], B.reshape(groups), C.reshape(groups), mixer.D, mixer.dt_bias,
            slot_idx=None, dt_limit=mixer.time_step_limit)
        return mixer.out_proj(gated_rms_norm(mixer.norm, y.reshape(batch, -1), gate).to(x.dtype))

    def _attention_prefill(self, i: int, attn: Any, x: torch.Tensor, layout: Padding,
                           runs: list[tuple[int, int, int]], rows: torch.Tensor):
        """The packed prompts as rows of a batch padded at the end, longest first (``layout``; ``rows``: the
        cache slot of each row): with padding only after its tokens, a row's causal attention over them is
        that of the prompt alone. Each run of rows of ``length_runs`` is one call, over its own longest."""
        q, k, v = (layout.pad(p(x)).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))                  # [prompts, heads, longest, d]
        # Past its prompt a slot holds padding; decoding reads only up to each row's position and writes over it.
        self.cache.keys[i][rows, :, : k.shape[2]] = k
        self.cache.values[i][rows, :, : v.shape[2]] = v
        prompts, heads, longest, head_dim = q.shape
        out = q.new_empty(prompts, longest, heads, head_dim)
        for first, end, length in runs:     # past a run's longest its rows are padding, which unpad never reads
            run = slice(first, end), slice(None), slice(length)
            out[first:end, :length] = F.scaled_dot_product_attention(
                q[run], k[run], v[run], is_causal=True, scale=attn.scaling, enable_gqa=True).transpose(1, 2)
        return attn.o_proj(layout.unpad(out.flatten(2)))

    def _attention_step(self, i: int, attn: Any, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence, row i in cache slot i, its key and value written at its position, which
        bounds the positions it reads: no mask is made, and the step's shapes do not change with the context."""
        q, k, v = (p(x).unflatten(-1, (-1, attn.head_dim)) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = kernels.decode_attention(q, self.cache.keys[i], self.cache.values[i], positions, attn.scaling, k, v)
        return attn.o_proj(out.flatten(1))
