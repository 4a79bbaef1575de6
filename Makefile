# Two entry points for a fresh machine:
#   make train   set up (first time only) and run a real CVPO training run on an embedded local Ray
#   make test    set up (first time only) and run the whole test suite, in two test processes
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train test system-deps clean

setup: $(STAMP)

# safety-gymnasium 1.0.0 pins gymnasium 0.28.1 / mujoco 2.3.3, which conflict with ray[rllib] 2.60, so it is
# added without its declared dependencies; rllib_cvpo.envs.compat makes it run on the pinned versions.
$(STAMP): pyproject.toml constraints.txt
	@$(MAKE) --no-print-directory system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]" -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt safety-gymnasium
	touch $(STAMP)

# Headless MuJoCo rendering (MUJOCO_GL=egl) needs libEGL and a Mesa EGL driver.
system-deps:
	@if ldconfig -p | grep -q 'libEGL.so.1' && ldconfig -p | grep -q 'libEGL_mesa.so.0'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing EGL libraries for headless rendering"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libegl-mesa0 libgl1 libgles2 >/dev/null; \
	else echo "warning: libEGL not found; install libegl1 and libegl-mesa0 for headless video rendering"; fi

train: setup
	$(BIN)/rllib-cvpo train

test: setup
	$(BIN)/python -m pytest -q -n 2 --maxschedchunk 1

clean:
	rm -rf $(VENV) *.egg-info
