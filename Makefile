# openvla_ros: the two commands of the quick start (`make demo`, `make test`) set up what they need.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The stamp records which lock file the venv was built from, so editing it triggers a rebuild.
STAMP := $(VENV)/.openvla-ros-installed
PIP_VERSION := 26.3

.PHONY: setup test bench fuzz demo demo-quick clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -m "not bench" test

bench: setup
	$(PY) -m pytest -m bench test -s

# The fuzz suite alone (also part of `make test`), its figures written to runs/fuzz_figures.json;
# HYPOTHESIS_PROFILE=nightly make fuzz for a long search.
fuzz: setup
	@mkdir -p runs && rm -f runs/fuzz_figures.json
	FUZZ_FIGURES=runs/fuzz_figures.json $(PY) -m pytest test/test_fuzz_properties.py test/test_server_fuzz.py test/test_ros_hostile_inputs.py
	@cat runs/fuzz_figures.json

# The whole loop: record -> fine-tune -> evaluate -> deploy through ROS 2 (resumable, runs/demo/loop).
demo: setup
	$(VENV)/bin/openvla-ros demo --loop

# One prediction of a fresh tiny checkpoint (seconds).
demo-quick: setup
	$(VENV)/bin/openvla-ros demo

clean-venv:
	rm -rf $(VENV)
