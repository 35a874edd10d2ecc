# Sourced by the *_session.sh scripts on the device: strict mode, $OUT, the carried wheels (.whl) installed
# into /tmp/site and put on PYTHONPATH with the repository, and the GPU's clocks and power before the run.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
