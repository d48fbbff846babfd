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
# The Beam jobs (embed-memory, precompute-neighbours) run on any engine (docs/SCALE_OUT.md):
#   make embed-memory RUNNER=dataflow PROJECT=my-proj REGION=europe-west4 TEMP=gs://bucket/tmp
#   make precompute-neighbours RUNNER=spark JOB_ENDPOINT=127.0.0.1:8099
#   make embed-memory RUNNER=portable JOB_ENDPOINT=127.0.0.1:8099   (any Beam job service)
# BEAM_ARGS adds other Beam flags, e.g. BEAM_ARGS="--direct_running_mode=multi_processing
# --direct_num_workers=4" or "--sdk_container_image=IMAGE --machine_type=g2-standard-8".
RUNNER ?=
PROJECT ?=
REGION ?=
TEMP ?=
JOB_ENDPOINT ?=
BEAM_ARGS ?=
# import-embeddings: the release folder (img_emb/, text_emb/, metadata/), e.g.
#   make import-embeddings INPUT=laion400m-embeddings WORKDIR=runs/laion \
#        ARGS="--model ViT-B-32 --pretrained openai"
INPUT ?=
BEAM_FLAGS = $(if $(RUNNER),--runner=$(RUNNER) $(if $(PROJECT),--project=$(PROJECT)) \
             $(if $(REGION),--region=$(REGION)) $(if $(TEMP),--temp_location=$(TEMP))) \
             $(if $(JOB_ENDPOINT),--job_endpoint=$(JOB_ENDPOINT)) $(BEAM_ARGS)
STAGE_BEAM =
STAGE_INPUT =
export NO_ALBUMENTATIONS_UPDATE := 1
RECO = $(VENV)/bin/reco
# --preset only when PRESET is given (make train PRESET=tiny): an existing run keeps the preset
# recorded in WORKDIR/config.yaml, and a different one given explicitly is refused
PRESET_FLAG = $(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET))
STAGE = $(RECO) $@ $(PRESET_FLAG) --workdir $(WORKDIR) $(STAGE_BEAM) $(STAGE_INPUT) $(ARGS)

.PHONY: install world embed-memory import-embeddings build-index precompute-neighbours train evaluate ablations \
        query demo react-retrieve react-download react-train compare bench bench-gpu test test-slow clean experiment-longtail

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

world embed-memory import-embeddings build-index precompute-neighbours train evaluate ablations \
query demo react-retrieve react-download react-train compare bench: install
	$(STAGE)

embed-memory precompute-neighbours: STAGE_BEAM = $(foreach f,$(BEAM_FLAGS),--beam-option=$(f))
import-embeddings: STAGE_INPUT = $(if $(INPUT),--input $(INPUT))

# issue 21: ViT-B-32 embed img/s, faiss-gpu kNN of 1M queries, trainer steps/s on a GPU ("no GPU:
# skipped" without one); results in bench-results/results.json and bench-results/gpu/gpu.json
bench-gpu: install
	$(RECO) bench --only gpu --full --out bench-results $(ARGS)

test: install
	@$(VENV)/bin/python -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

test-slow: install
	@$(VENV)/bin/python -m pytest -q -m slow $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

# issue 20: learned heads vs mean fusion on a long-tail world, over world seeds (experiments/);
# LONGTAIL=longtail for the 2,000-species world (longtail_small: 400 species); both in the README
SEEDS ?= 0,1,2
LONGTAIL ?= longtail_small
experiment-longtail: install
	$(VENV)/bin/python -m experiments.longtail --preset $(LONGTAIL) --seeds $(SEEDS) \
	    --out runs/$(LONGTAIL) $(ARGS)

clean:
	rm -rf runs .cache
