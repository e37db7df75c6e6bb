# The README's two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test mutants fashion-mnist clean check-core-install

setup: $(STAMP)

# Our environment: every extra at the exact versions of constraints.txt (the package itself
# declares ranges). torch and torchvision are pinned together, in the pip command itself and in
# constraints.txt: an unpinned torchvision pulls a CUDA build of torch (gigabytes).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -c constraints.txt torch==2.13.0 torchvision==0.28.0 -e ".[all,dev]"
	$(PY) -c "import site, pathlib; pathlib.Path(site.getsitepackages()[0], 'vptune_tvshim.pth').write_text('import vptune_tvshim; vptune_tvshim.install()\n')"
	$(MAKE) fashion-mnist
	touch $(STAMP)

# Fashion-MNIST from Debian's package where apt is available, else torchvision's downloader.
fashion-mnist:
	@if [ -d $(FMNIST) ]; then echo "Fashion-MNIST: $(FMNIST)"; \
	elif command -v apt-get >/dev/null 2>&1 && (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); then echo "Fashion-MNIST installed from apt"; \
	else $(PY) -m vptune.data.fashion_mnist --download; fi

demo: setup
	$(VENV)/bin/vptune demo

test: setup
	$(PY) -m pytest

# Plants representative bugs in a copy of src/ and checks that the tests catch each (not part of `make test`).
mutants: setup
	$(PY) scripts/mutants.py

# `pip install vptune` without extras into a fresh venv (pinned torch), then train a prompt
# model and check that no optional library is installed or imported (a few minutes; `make test`
# runs the same check on the same distributions, linked instead of installed).
check-core-install:
	tmp=$$(mktemp -d) && $(PYTHON) -m venv $$tmp/venv && \
	$$tmp/venv/bin/pip install --disable-pip-version-check -q -c constraints.txt torch==2.13.0 torchvision==0.28.0 . && \
	mkdir $$tmp/work && cd $$tmp && OMP_NUM_THREADS=1 $$tmp/venv/bin/python $(CURDIR)/tests/core_only_check.py $$tmp/work && \
	rm -rf $$tmp

clean:
	rm -rf $(VENV) build src/*.egg-info
