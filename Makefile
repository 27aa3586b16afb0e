# Every target creates or refreshes the local virtual environment .venv itself, so `make test` and
# `make train` work as the first command on a fresh clone (Python 3.10+ and a package index needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0: on the development/CI machines pip takes a CPU wheel from local disk (fast); elsewhere
# it is the regular PyPI build. Override for another build, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# The peer the tests and the CPU benchmark compare with. Only its loss module is used, which needs torch alone;
# without its dependencies, since they pull a torchvision (and with it a torch) of another build.
OPEN_CLIP ?= open_clip_torch==3.3.0
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# The editable install is "strict": the package as a tree of links on sys.path, so that `import fastpair` finds
# it even where the working directory holds another folder named fastpair (a clone, seen from the folder above
# it), which the default mode's import hook lets shadow the package. Each file is linked, so a file added to
# the package needs a new link tree: the install depends on the list of the package's files.
PACKAGE_FILES := $(sort $(wildcard fastpair/*.py fastpair/py.typed kernels/*.py training/*.py))
FILE_LIST := $(VENV)/.package-files

.PHONY: venv test docs dist-check train bench bench-host bench-quick bench-gradcache lint gpu-compile gpu-check clean FORCE

$(FILE_LIST): FORCE
	@mkdir -p $(VENV)
	@echo "$(PACKAGE_FILES)" | cmp -s - $@ || echo "$(PACKAGE_FILES)" > $@

$(STAMP): pyproject.toml Makefile $(FILE_LIST)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e ".[dev,bench,train,docs]" --config-settings editable_mode=strict
	$(PIP) --no-deps "$(OPEN_CLIP)"
	@touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

# The documentation site (mkdocs-material, the API reference from the docstrings) into build/site; --strict:
# a broken link or an unresolved reference fails the build.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir build/site

# The package as a user installs it: the sdist, the wheel built from it, the wheel installed outside the
# checkout, and its three packages imported from there (not from the editable install).
WHEEL_DIR := build/wheel-check
dist-check: $(STAMP)
	rm -rf dist $(WHEEL_DIR)
	$(PY) -m build --no-isolation --outdir dist . > /dev/null
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target $(WHEEL_DIR) dist/*.whl
	cd /tmp && PYTHONPATH=$(CURDIR)/$(WHEEL_DIR) $(CURDIR)/$(PY) -c "import fastpair, fastpair.kernels, \
	fastpair.training, os; assert fastpair.__file__.startswith('$(CURDIR)/$(WHEEL_DIR)'), fastpair.__file__; \
	assert os.path.exists(os.path.join(os.path.dirname(fastpair.__file__), 'py.typed')); \
	print('wheel', fastpair.__version__, 'imports fastpair, fastpair.kernels, fastpair.training')"
	tar -tzf dist/fastpair-*.tar.gz | grep -q "/LICENSE$$" && tar -tzf dist/fastpair-*.tar.gz | grep -q "/docs/design.md$$"

# The paper's protocol on the built-in synthetic data: label-free training, baselines, fusion probe.
train: $(STAMP)
	$(VENV)/bin/fastpair-train --out runs/synthetic --overwrite

# CPU benchmark: providers x shapes, then the report (bench/results/*.json, .md, .png and docs/benchmarks.md's table).
bench: $(STAMP)
	$(PY) -m bench.run --device cpu --update-docs

# The small-batch step's host cost: kernels counted, host time with Triton's launches stubbed, as a ratio to the
# plain PyTorch step (about a minute; run it on a quiet machine), into bench/results/host-cpu-<date>.{json,md}.
bench-host: $(STAMP)
	$(PY) -m bench.host

# The same at N=1024 only (a smoke run of a few minutes), into the git-ignored bench/results/raw.
bench-quick: $(STAMP)
	$(PY) -m bench.run --device cpu --quick --out bench/results/raw

# GradCache against the plain step: activations and time per sample at batch 256 ... 8192 (about 15 minutes
# on 2 cores), into bench/results/gradcache-cpu-<date>.{json,md,png}.
bench-gradcache: $(STAMP)
	$(PY) -m bench.gradcache

# What a GPU compiler makes of every Triton kernel, without a GPU: every launch variant the API's options
# produce, at every tile configuration the autotuner can pick, compiled for sm_80, sm_90a and sm_100a
# (registers, spills, tensor-core instructions, occupancy) into bench/results/compile-<date>.{md,json}.
# make test compiles a subset of it and holds it to budgets (tests/test_compile_budgets.py).
gpu-compile: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m bench.compile

lint: $(STAMP)
	$(PY) -m ruff check fastpair kernels training bench tests

# On a CUDA machine, with the Python that holds its CUDA build of torch (no venv, no downloads): the whole
# test suite (Triton tests run on the GPU there), then the GPU benchmark into bench/results/. The benchmark
# runs even when a test fails (a GPU session is short: its figures must not be lost to one failure); the
# target then exits with the tests' status.
# The suite runs on 8 pytest-xdist workers when that machine has xdist: the last serial GPU run took
# 7 min 40 s, most of it (probably) Triton compiling kernel variants, which parallelizes.
GPU_PYTHON ?= python3
# The benchmark's share of gpu-check: its shapes stop once 200 s are spent (the N=2^20 step, then bf16 D=512
# from N=256 up, come first), so that the whole target fits a short GPU session (not yet timed).
GPU_BENCH_ARGS ?= --budget-s 200
GPU_TEST_ARGS ?= $(shell $(GPU_PYTHON) -c "import xdist" 2>/dev/null && echo "-n 8")
gpu-check:
	$(GPU_PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m pytest tests -q -p no:cacheprovider $(GPU_TEST_ARGS); status=$$?; \
	$(GPU_PYTHON) -m bench.run --device cuda $(GPU_BENCH_ARGS) || exit $$?; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks build dist *.egg-info
