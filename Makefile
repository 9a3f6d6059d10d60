# Two entry points that work on a fresh machine:  make demo  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean-venv

$(VENV)/.mmgen-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no resolver later wanders off to another build
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test]"
	touch $@

setup: $(VENV)/.mmgen-installed

demo: setup
	$(VENV)/bin/mmgen image --prompts-file examples/shapes_prompts.txt --seed 0 -o outputs/demo
	@echo
	@echo "Images written to outputs/demo/ (000.png ... one per line of examples/shapes_prompts.txt)."
	@echo "Try your own:  $(VENV)/bin/mmgen image 'a large red circle at the top left on a black background' -o x.png"
	@echo "Python API:    see README.md (TextToImagePipeline.from_pretrained('checkpoints/shapes'))"

test: setup
	$(VENV)/bin/pytest

bench: setup
	$(PY) benchmarks/decode.py --quick
