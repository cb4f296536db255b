# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: the CPU wheel lies on disk, anything else pulls CUDA builds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= out/demo
DEMO_COUNT ?= 300
DEMO_PHOTOS ?= $(DEMO_OUT)-photos
# Real photographs that ship inside scikit-image's wheel, found at run time: nothing downloads.
PHOTO_NAMES := astronaut.png chelsea.png coffee.png rocket.jpg motorcycle_left.png hubble_deep_field.jpg retina.jpg ihc.png

export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: demo test test-slow install deploy bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO_OUT) $(DEMO_PHOTOS) $(DEMO_PHOTOS).txt
	$(VENV)/bin/mcie build --out $(DEMO_OUT) --count $(DEMO_COUNT) --workers 2 --shard-size 50
	$(VENV)/bin/mcie verify $(DEMO_OUT)
	mkdir -p $(dir $(DEMO_PHOTOS))
	$(PY) -c "import importlib.resources as r, sys; d = r.files('skimage') / 'data'; print('\n'.join(str(d / n) for n in sys.argv[1:]))" $(PHOTO_NAMES) > $(DEMO_PHOTOS).txt
	$(VENV)/bin/mcie build --out $(DEMO_PHOTOS) --source list --source-path $(DEMO_PHOTOS).txt --allow-outside-root \
		--edits-per-image 4 --workers 2 --shard-size 8
	$(VENV)/bin/mcie verify $(DEMO_PHOTOS)
	$(VENV)/bin/mcie train --data $(DEMO_OUT) --config tiny --steps 30 --out $(DEMO_OUT)/ckpt
	mkdir -p $(DEMO_OUT)/edit
	tar -xf $(DEMO_OUT)/shards/train-000000.tar -C $(DEMO_OUT)/edit --wildcards '*.source.png'
	@echo "demo edit: the tiny 30-step checkpoint makes noise; this shows the command path, not quality"
	$(VENV)/bin/mcie edit --checkpoint $(DEMO_OUT)/ckpt --steps 10 --out $(DEMO_OUT)/edit/edited.png \
		--image $$(ls $(DEMO_OUT)/edit/*.source.png | head -1) \
		--instruction "Make the circle blue, then remove the star, and also add the word SALE."
	@echo "demo: dataset, report, tiny checkpoint and an edit are in $(DEMO_OUT)/; real-photo pairs and their report in $(DEMO_PHOTOS)/"
	@echo "demo: look at the photo pairs: $(DEMO_PHOTOS)/contact_sheet.jpg (accepted), $(DEMO_PHOTOS)/contact_sheet_others.jpg (borderline, rejected)"

# `make test`: everything but the end-to-end tests marked slow (servers, clusters, kill -9,
# the GPU script's CPU dry run), ≈ 8 min on 2 cores; CI (.ci/run) runs both targets.
test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

# Needs PREFECT_API_URL pointing at a running `prefect server start --host 127.0.0.1`.
deploy: $(STAMP)
	$(VENV)/bin/prefect work-pool create mcie-process --type process --overwrite
	$(VENV)/bin/prefect --no-prompt deploy --all

bench: $(STAMP)
	$(PY) bench/build.py

clean:
	rm -rf out .prefect .ray .pytest_cache
