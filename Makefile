# Post-training pipeline for hybrid Mamba-Transformer models.
#   make pipeline      every stage in order on the embedded default (profile tiny, CPU)
#   make test          the test suite
# Both create .venv from pyproject.toml on first use.
#
# Launch settings pass through to `accelerate launch`, e.g. a second node of a 2-node run:
#   make sft-reasoning PROFILE=nemotron-h-8b NUM_MACHINES=2 MACHINE_RANK=1 NUM_PROCESSES=16 \
#        MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500

PROFILE ?= tiny
CONFIG ?= pipeline.yaml
ACCELERATE_CONFIG ?=
NUM_PROCESSES ?=
NUM_MACHINES ?=
MACHINE_RANK ?=
MAIN_PROCESS_IP ?=
MAIN_PROCESS_PORT ?=
RERUN_FROM ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

LAUNCH = $(PY) -m stages.launch --config $(CONFIG) --profile $(PROFILE) \
	--accelerate-config "$(ACCELERATE_CONFIG)" --num-processes "$(NUM_PROCESSES)" \
	--num-machines "$(NUM_MACHINES)" --machine-rank "$(MACHINE_RANK)" \
	--main-process-ip "$(MAIN_PROCESS_IP)" --main-process-port "$(MAIN_PROCESS_PORT)"

.PHONY: setup constraints rerun-from pipeline sft-reasoning sft-chat rpo grpo report bench-hybrid gpu-checks test test-slow eval

setup: $(STAMP)

# torch is pinned to the CPU build (and the triton its tests ran with) where no CUDA driver is present;
# with one, pip picks a CUDA build and its triton. Every other package comes at the version in
# constraints.txt. bubblewrap is the code reward's sandbox; it is installed when the system's package
# manager allows.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0 triton==3.9.0; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	@command -v bwrap >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
		&& apt-get install -y -q bubblewrap >/dev/null; } \
		|| echo "note: install bubblewrap (apt-get install bubblewrap) so the code reward can sandbox code"
	touch $@

pipeline: sft-reasoning sft-chat rpo grpo report

# Record the versions now in .venv as those setup installs (after upgrading them and passing make test).
# No setup prerequisite: setup would first put every package back at the versions being replaced.
constraints:
	{ grep '^#' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|triton)=='; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

# RERUN_FROM=<stage>: move that stage's results and every later stage's to <run_dir>/superseded/ once,
# before any stage of this make command runs, so they train again (e.g. after changing their config).
rerun-from: $(STAMP)
	$(if $(RERUN_FROM),$(PY) -m stages rerun-from $(RERUN_FROM) --config $(CONFIG) --profile $(PROFILE))

sft-reasoning: rerun-from
	$(LAUNCH) sft_reasoning

sft-chat: rerun-from
	$(LAUNCH) sft_chat

rpo: rerun-from
	$(LAUNCH) rpo

grpo: rerun-from
	$(LAUNCH) grpo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# Hybrid vs Transformer generation (CPU: reduced width; add BENCH_ARGS=--full on a GPU).
bench-hybrid: $(STAMP)
	$(PY) -m bench.bench_hybrid $(BENCH_ARGS)

# Every GPU check of the rollout engine (CUDA machine; bench/gpu_checks.sh says what each step measures).
# make gpu-checks MAMBA_SRC=<mamba-ssm source tree> adds mamba-ssm's prefill scan as the baseline where it is not installed.
gpu-checks: $(STAMP)
	PYTHON=$(PY) bash bench/gpu_checks.sh

# The run report (eval table after every stage, plots) in the run directory; also the end of `make pipeline`.
report: $(STAMP)
	$(PY) -m stages report --config $(CONFIG) --profile $(PROFILE)

# Evaluate any checkpoint on the held-out embedded tasks: make eval CHECKPOINT=runs/tiny/base
eval: $(STAMP)
	$(PY) -m stages eval --config $(CONFIG) --profile $(PROFILE) --checkpoint $(CHECKPOINT)
