# Two commands for a fresh machine (see README):
#   make demo   — set everything up, then run the main job (python -m fusedgrad demo)
#   make test   — set everything up, run the test suite (without the slow tests),
#                 then build a wheel and check it in a fresh venv (scripts/check_install.sh)
# Also: make test-slow (only the slow tests), make check-install, make check-clang
# (clang++ -fsyntax-only over csrc/, when clang is installed), make bench.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fusedgrad-setup

.PHONY: setup demo test test-slow check-install check-clang bench build

setup: $(STAMP)

# torch is installed first and pinned, so no later step can make pip resolve
# an unpinned (CUDA, multi-GB) torch.
$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# Builds fusedgrad/_C*.so in place against the venv's torch (no build
# isolation, so nothing fetches a torch of its own); ninja makes rebuilds after
# editing csrc/ incremental, and one line is printed per compiled file. The
# commands run from the repository root, where the package is importable. (To
# install it elsewhere: pip install --no-build-isolation .)
build: setup
	$(BIN)/python setup.py --quiet build_ext --inplace

demo: setup build
	$(BIN)/python -m fusedgrad demo

test: setup build
	$(BIN)/python -m pytest -m "not slow" -q
	PYTHON=$(BIN)/python bash scripts/check_install.sh

test-slow: setup build
	$(BIN)/python -m pytest -m slow -q

check-install: setup build
	PYTHON=$(BIN)/python bash scripts/check_install.sh

check-clang: setup
	PYTHON=$(BIN)/python bash scripts/check_clang.sh

bench: setup build
	$(BIN)/python -m fusedgrad bench
