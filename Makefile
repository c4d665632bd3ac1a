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
	# CPU wheel of torch (GPU users: install your own torch into .venv before `make`).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
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
