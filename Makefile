# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: on these machines torch==2.13.0 is a local CPU
# wheel, while any other torch spec pulls gigabytes of CUDA packages.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,tensorboard]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rlhfkit run configs/demo.yaml --out runs/demo

test: setup
	$(VENV)/bin/python -m pytest -q -ra

clean:
	rm -rf runs
