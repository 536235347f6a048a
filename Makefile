# Two entry points: `make demo` and `make test`. Each creates .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
ARCH    := $(shell uname -m)
ifeq ($(ARCH),x86_64)
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
else
TORCH_PIN := torch==2.9.1 torchvision==0.24.1
endif

.PHONY: demo test venv clean

$(BIN)/zoomless: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/zoomless

demo: venv
	$(BIN)/zoomless demo

test: venv
	$(BIN)/python -m pytest -x -q

clean:
	rm -rf $(VENV) runs
