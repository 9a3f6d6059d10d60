# Two entry points that work on a fresh machine:  make demo  and  make test
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean-venv

# Debian packages: chromium + chromedriver (studio browser test), DejaVu fonts (text world), Tesseract (text-eval).
APT_PACKAGES := chromium chromium-driver fonts-dejavu-core tesseract-ocr tesseract-ocr-eng

$(VENV)/.mmgen-installed: pyproject.toml
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "note: not root or no apt-get; install these Debian packages yourself: $(APT_PACKAGES)"; fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no resolver later wanders off to another build
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,studio,bench]"
	touch $@

setup: $(VENV)/.mmgen-installed

demo: setup
	$(VENV)/bin/mmgen image --prompts-file examples/shapes_prompts.txt --seed 0 -o outputs/demo
	@echo
	@echo "Images written to outputs/demo/ (000.png ... one per line of examples/shapes_prompts.txt)."
	@echo "What checkpoints/seed (the SEED model that also sees) reads in the first three:"
	$(VENV)/bin/mmgen caption --with-names outputs/demo/000.png outputs/demo/001.png outputs/demo/002.png
	@echo "Try your own:  $(VENV)/bin/mmgen image 'a large red circle at the top left on a black background' -o x.png"
	@echo "Python API:    see README.md (TextToImagePipeline.from_pretrained('checkpoints/shapes'))"
	@echo "Web studio:    $(VENV)/bin/mmgen studio   then open http://127.0.0.1:7860"

test: setup
	$(VENV)/bin/pytest

bench: setup
	$(PY) benchmarks/decode.py --quick
	$(PY) benchmarks/zipvl.py --quick
