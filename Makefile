# The README's two set-up commands: `make demo` (the whole job on the embedded tiny default) and
# `make test` (the test suite, exactly what CI runs). Both start from a fresh clone with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
DEMO ?= demo
# Test files run in this many processes (pytest-xdist), each file's tests in one of them (module fixtures,
# the image test's Docker engine, are built once). 2 pays on CI's two cores: 7.7 min instead of 12.
TEST_WORKERS ?= 2

.PHONY: demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml docker/install.sh docker/constraints.txt
	LOKR_VENV=$(VENV) PYTHON=$(PYTHON) TORCH_INDEX_URL= LOKR_EXTRAS=dev LOKR_EDITABLE=1 bash docker/install.sh
	touch $@

# SkyPilot, which tests/test_skypilot.py reads sky/lokr-job.yaml with, in a venv of its own inside this one:
# every skypilot release requires click<8.2, which lokr-job's huggingface_hub and wandb cannot run with.
$(VENV)/sky/.installed: sky/requirements.txt
	rm -rf $(VENV)/sky
	$(PYTHON) -m venv $(VENV)/sky
	$(VENV)/sky/bin/python -m pip install -r sky/requirements.txt
	$(VENV)/sky/bin/python -m pip check
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(VENV)/bin/lokr-job tiny $(DEMO)/tiny
	$(VENV)/bin/lokr-job run --config $(DEMO)/tiny/config/config.json --workdir $(DEMO)/work
	@echo "adapter: $(DEMO)/work/output/pytorch_lora_weights.safetensors"

test: $(VENV)/.installed $(VENV)/sky/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# The developer's loop: everything but the end-to-end tests that run the CLI in subprocesses (about 3 min).
test-fast: $(VENV)/.installed $(VENV)/sky/.installed
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) $(DEMO)
