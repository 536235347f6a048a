# Sourced by the scripts that run on the GPU machine (gpu_run.sh, perf_compile_gpu.sh), from the
# repository root. The GPU image lacks pydantic: the wheels in build/wheels-gpu (carry that folder)
# are installed first. Make them with:
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d build/wheels-gpu pydantic
if ! python3 -c "import pydantic" 2>/dev/null && [ -d build/wheels-gpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site build/wheels-gpu/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
