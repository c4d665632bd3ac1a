# Two commands on a fresh machine:
#   make demo   set up .venv and run the main job (embedded decoder + in-process policy + bundled model)
#   make test   set up .venv and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install proto serve bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch: without an NVIDIA driver, the CPU wheel from PyTorch's CPU index (a bare `pip install torch` pulls the
	# multi-GB CUDA build); with one, PyPI's. Either way a torch already in .venv is kept (GPU users: install yours
	# first). If the CPU index cannot be reached, pip's configured sources are used.
	$(BIN)/python -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch==2.13.0; \
	  else $(BIN)/pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
	    || $(BIN)/pip install -q torch==2.13.0; fi; }
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvpilot demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python -m kvpilot.protogen

serve: $(STAMP)
	$(BIN)/kvpilot serve

clean:
	rm -rf $(VENV) build *.egg-info
