# Every target bootstraps .venv itself: torch first from the pinned constraints (a local CPU
# wheel on the project's machines), then the package with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint sweep quality fidelity bench bench-check test-triton-3.6 test-hf5 clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The default sweep (preset tay on the best device), measured afresh, then its table and plots
# into reports/ (shown in the README). SWEEP_DEVICE is read once the venv exists.
SWEEP_DEVICE ?= $(shell $(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
SWEEP_RUN ?= tay-$(SWEEP_DEVICE)
# The real-model cosine column of the table, from `make fidelity` (committed for the CPU).
FIDELITY_CSV ?= reports/fidelity-$(SWEEP_DEVICE).csv
sweep: $(STAMP)
	$(PY) -m effattn sweep tay --run-id $(SWEEP_RUN) --fresh --quiet
	$(PY) -m effattn report reports/runs/$(SWEEP_RUN) --format md csv tex html --out reports/$(SWEEP_RUN) \
		$(if $(wildcard $(FIDELITY_CSV)),--fidelity $(FIDELITY_CSV))
	$(PY) -m effattn plot reports/runs/$(SWEEP_RUN) --out reports/plots --prefix $(SWEEP_RUN)

# The inference table (preset decode): ms per decoded token and the decoding state's MiB at
# context 1K-64K (256K for the states of a fixed size), B = 1 and 8, H=32, Hkv=8, D=128, and the
# prefill of the prompt; reports/decode-cpu.md (+ csv) and reports/plots/decode-cpu-*.png.
DECODE_RUN ?= decode-$(SWEEP_DEVICE)
.PHONY: decode
decode: $(STAMP)
	$(PY) -m effattn sweep decode --run-id $(DECODE_RUN) --fresh --quiet
	$(PY) -m effattn report reports/runs/$(DECODE_RUN) --format md csv --out reports/$(DECODE_RUN)
	$(PY) -m effattn plot reports/runs/$(DECODE_RUN) --out reports/plots --prefix $(DECODE_RUN)

# Do two back-to-back default sweeps repeat? Run 1 (reports/runs/$(SWEEP_RUN)-first), then
# `make sweep` itself, then `effattn compare`: the share of speed-up-vs-sdpa cells that agree
# within +-10%, and of cells whose run-1 95% repeat interval holds run 2's median, in
# reports/$(SWEEP_RUN)-agreement.md (and on the screen).
.PHONY: sweep-agreement
sweep-agreement: $(STAMP)
	$(PY) -m effattn sweep tay --run-id $(SWEEP_RUN)-first --fresh --quiet
	$(MAKE) sweep
	$(PY) -m effattn compare reports/runs/$(SWEEP_RUN)-first reports/runs/$(SWEEP_RUN) \
		--out reports/$(SWEEP_RUN)-agreement.md

# The accuracy half of the LRA tables: the same small model trained with each backend on the
# tasks of preset `quality` (MQAR, ListOps, nearest recall), each run in its own worker; resumes
# when run again. Report in reports/quality-cpu.md (+ .csv), charts in reports/plots/.
QUALITY_PRESET ?= quality
QUALITY_RUN ?= $(QUALITY_PRESET)-cpu
quality: $(STAMP)
	$(PY) -m effattn quality $(QUALITY_PRESET) --run-id $(QUALITY_RUN) \
		--report reports/$(QUALITY_RUN) --plots reports/plots

# Each backend inside a real pretrained model (all-MiniLM-L6-v2) on real text, against exact
# attention: needs transformers 5.x and the model wheel, so it runs in the HF5 venv below.
fidelity: $(VENVHF5)/.installed-stamp
	$(VENVHF5)/bin/python -m effattn fidelity

lint: $(STAMP)
	$(PY) -m ruff check effattn kernels tests benchmarks
	$(PY) -m ruff format --check effattn kernels tests benchmarks

# The GPU machines run Triton 3.6: its CPU interpreter runs the kernel tests too, in a venv of
# its own. numpy < 2.3: Triton 3.6's interpreter calls int() on 1-element arrays, which newer
# numpy refuses ("only 0-dimensional arrays can be converted to Python scalars").
VENV36 ?= .venv-triton36
KERNEL_TESTS := tests/test_triton_flash.py tests/test_triton_block_sparse.py tests/test_sparse_triton.py \
	tests/test_kernels_compile.py tests/test_gpu_bench.py

$(VENV36)/.installed-stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q --upgrade pip
	$(VENV36)/bin/python -m pip install -q -c constraints.txt torch
	$(VENV36)/bin/python -m pip install -q triton==3.6.0 "numpy<2.3" pytest pytest-benchmark hypothesis
	$(VENV36)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-triton-3.6: $(VENV36)/.installed-stamp
	$(VENV36)/bin/python -m pytest -q -W ignore::DeprecationWarning $(KERNEL_TESTS)

# The HuggingFace integration under transformers 5.x too: `effattn[hf]` installs the newest
# transformers, while the dev extra pins < 5 for the peers (5.x removed Transformer-XL). The same
# venv installs the `fidelity` extra (all-MiniLM-L6-v2 shipped as a wheel, pinned in
# pyproject.toml; BERT dispatches through the integration from 5.x on), so the fidelity tests run
# on the real model here. Not the dev extra: its transformers < 5 would replace HF5.
VENVHF5 ?= .venv-hf5
HF5 ?= transformers==5.23.0
HF5_TESTS := tests/test_huggingface.py tests/test_hf_generate.py $(wildcard tests/test_fidelity*.py)

$(VENVHF5)/.installed-stamp: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENVHF5)
	$(VENVHF5)/bin/python -m pip install -q --upgrade pip
	$(VENVHF5)/bin/python -m pip install -q -c constraints.txt torch
	$(VENVHF5)/bin/python -m pip install -q -c constraints.txt "$(HF5)" pytest pytest-benchmark hypothesis
	$(VENVHF5)/bin/python -m pip install -q -c constraints.txt -e '.[fidelity]'
	touch $@

test-hf5: $(VENVHF5)/.installed-stamp
	$(VENVHF5)/bin/python -m pytest -q $(HF5_TESTS)

clean:
	rm -rf $(VENV) $(VENV36) $(VENVHF5) .pytest_cache .ruff_cache .hypothesis *.egg-info

# pytest-benchmark suite (never part of `make test`). EFFATTN_BENCH_N=1024,2048 narrows it.
BENCH_TOLERANCE ?= 10%
bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-group-by=param:n \
		--benchmark-columns=median,iqr,rounds \
		--benchmark-autosave --benchmark-storage=reports/bench \
		--benchmark-json=reports/bench/latest.json

# Fails when any median got slower than the last saved run by more than BENCH_TOLERANCE.
bench-check: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-enable --benchmark-group-by=param:n \
		--benchmark-storage=reports/bench --benchmark-compare \
		--benchmark-compare-fail=median:$(BENCH_TOLERANCE)
