# The README's two set-up commands: `make demo` (the whole job on the embedded tiny default) and
# `make test` (the test suite, exactly what CI runs). Both start from a fresh clone with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
DEMO ?= demo

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml docker/install.sh docker/constraints.txt
	LOKR_VENV=$(VENV) PYTHON=$(PYTHON) TORCH_INDEX_URL= LOKR_EXTRAS=dev LOKR_EDITABLE=1 bash docker/install.sh
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(VENV)/bin/lokr-job tiny $(DEMO)/tiny
	$(VENV)/bin/lokr-job run --config $(DEMO)/tiny/config/config.json --workdir $(DEMO)/work
	@echo "adapter: $(DEMO)/work/output/pytorch_lora_weights.safetensors"

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) $(DEMO)
