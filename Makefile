# reco: every stage target calls exactly one `reco` subcommand.
#   make demo            install, then run the whole chain on the embedded default (demo preset)
#   make test            install, then run the test suite (tiny preset; ~15 min on 2 cores)
# Stage targets honour PRESET (demo|tiny), WORKDIR, ARGS (extra CLI flags), e.g.
#   make train PRESET=tiny ARGS="--set train.steps=100"
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PRESET ?= demo
WORKDIR ?= runs/$(PRESET)
ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
RECO = $(VENV)/bin/reco
STAGE = $(RECO) $@ --preset $(PRESET) --workdir $(WORKDIR) $(ARGS)

.PHONY: install world embed-memory build-index precompute-neighbours train evaluate ablations \
        query demo react-retrieve react-train compare bench test test-slow clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

world embed-memory build-index precompute-neighbours train evaluate ablations query demo \
react-retrieve react-train compare bench: install
	$(STAGE)

test: install
	@$(VENV)/bin/python -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-slow: install
	@$(VENV)/bin/python -m pytest -q -m slow $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

clean:
	rm -rf runs .cache
