# baton: `make run` sets everything up and runs the default recipe; `make test` sets up and tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/vlp-tiny.yaml

.PHONY: install lock run test test-slow ui status clean bench-gpu gpu-wheels

# constraints.txt: the versions the tests passed with (`make lock` regenerates it from $(VENV))
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (torch from the local wheel cache where pip finds one)"
	@start=$$(date +%s); \
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,cluster,metrics]' && \
	echo "install took $$(( $$(date +%s) - start ))s"
	@touch $(STAMP)

install: $(STAMP)

# after changing dependencies (or upgrading them in $(VENV)) and passing `make test`: pin what passed
lock:
	@{ echo "# Versions the test suite passed with: \`make install\` installs with \`-c constraints.txt\`."; \
	  echo "# Regenerate with \`make lock\` (pip freeze of .venv) after changing dependencies and passing \`make test\`."; \
	  $(PY) -m pip freeze --exclude-editable --disable-pip-version-check; } > constraints.txt.tmp
	@mv constraints.txt.tmp constraints.txt && echo "constraints.txt: $$(grep -c '==' constraints.txt) pins"

run: install
	@start=$$(date +%s); \
	$(VENV)/bin/baton run $(CONFIG) $(ARGS) && \
	echo "pipeline took $$(( $$(date +%s) - start ))s"

status: install
	$(VENV)/bin/baton status $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

test-slow: install
	$(PY) -m pytest -q -p no:cacheprovider -m slow

ui: install
	$(VENV)/bin/baton ui

clean:
	rm -rf artifacts/stages artifacts/mlflow.db artifacts/mlartifacts artifacts/prefect

# Fault injection, long version: >= 20 SIGKILLs aimed at each stage of the micro recipe (checkpoint,
# region-store and result writes included), then a final run compared bitwise with an uninterrupted one.
# One stage at a time (max_concurrency=1), so that no stage completes while another one is the target.
FAULTS_KILLS ?= 20
FAULTS_ARGS  ?= max_concurrency=1 runtime.deterministic=true runtime.checkpoint_every=1 runtime.log_every=2 \
	stages.cnn.train.steps=24 stages.detector.train.steps=20 stages.bert.train.steps=24 \
	stages.vl.train.steps=24 stages.caption.train.steps=20 stages.vqa.train.steps=20

.PHONY: faults-long
faults-long: install
	$(PY) -m tools.faults configs/vlp-micro.yaml $(FAULTS_ARGS) --kills-per-stage $(FAULTS_KILLS) \
		--workdir artifacts/faults --out artifacts/faults-report.json

# One-shot GPU check (tools/bench_gpu.py): anchors vs baton's loop and whole stages, compile, region rows,
# a forked CUDA stage, a CUDA kill/resume; JSON in $(BENCH_OUT)/bench_gpu.json after every item (<= 4 min on
# an H100/H200). On a machine with only torch/torchvision/transformers it installs .whl/ (make gpu-wheels) first.
# `make bench-gpu BENCH_ARGS=--smoke` runs every item at tiny sizes on the CPU.
BENCH_PY   ?= $(if $(wildcard $(PY)),$(PY),python3)
BENCH_OUT  ?= $(if $(OUT),$(OUT),artifacts/bench)
BENCH_ARGS ?=
bench-gpu:
	PY=$(BENCH_PY) bash tools/bench_gpu.sh --out $(BENCH_OUT) $(BENCH_ARGS)

# wheels for the GPU machine (CPython 3.12, x86-64): what stages/ needs beyond torch/torchvision/transformers,
# at the versions of constraints.txt; .whl/ is git-ignored and travels as a `carry` path
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions pycocotools
gpu-wheels:
	@mkdir -p .whl
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for w in $(GPU_WHEELS); do grep -i "^$$(echo $$w | sed 's/[-_]/[-_]/g')==" constraints.txt; done)
	@ls .whl
