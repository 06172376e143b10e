# openvla_ros: the two commands of the quick start (`make demo`, `make test`) set up what they need.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# The stamp records which lock file the venv was built from, so editing it triggers a rebuild.
STAMP := $(VENV)/.openvla-ros-installed
PIP_VERSION := 26.3
# A second venv with ROS 2 Jazzy's rclpy and messages instead of Kilted's, for the ROS tests.
JAZZY_VENV ?= .venv-jazzy
JAZZY_PY := $(JAZZY_VENV)/bin/python
JAZZY_STAMP := $(JAZZY_VENV)/.openvla-ros-installed

.PHONY: setup setup-jazzy test test-kilted test-jazzy bench fuzz demo demo-quick clean-venv

setup: $(STAMP)

setup-jazzy: $(JAZZY_STAMP)

$(STAMP): requirements.lock setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# The same requirements as .venv without the Kilted ros-* wheels, plus requirements-jazzy.lock.
$(JAZZY_STAMP): requirements.lock requirements-jazzy.lock setup.py
	@test -x $(JAZZY_PY) || $(PYTHON) -m venv $(JAZZY_VENV)
	$(JAZZY_PY) -m pip install --quiet --upgrade pip==$(PIP_VERSION)
	grep -v '^ros-' requirements.lock > $(JAZZY_VENV)/requirements.txt
	$(JAZZY_PY) -m pip install --quiet -r $(JAZZY_VENV)/requirements.txt -r requirements-jazzy.lock
	$(JAZZY_PY) -m pip install --quiet --no-deps -e .
	@touch $(JAZZY_STAMP)

# Everything on ROS 2 Kilted, then the ROS tests (marked `ros`) again on ROS 2 Jazzy.
test: test-kilted test-jazzy

test-kilted: setup
	$(PY) -m pytest -m "not bench" test

test-jazzy: setup-jazzy
	$(JAZZY_PY) -m pytest -m "ros and not bench" test

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
	rm -rf $(VENV) $(JAZZY_VENV)
