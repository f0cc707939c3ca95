#!/usr/bin/env bash
# The benchmarks a session lent an accelerator runs as they are: in <= 8 minutes, without
# TensorFlow, every table written as JSON.
#
#   benchmarks/device.sh [DIR]           # on the device; JSON and logs in DIR ($OUT, else
#                                        # /tmp/device-bench)
#   SMOKE=1 benchmarks/device.sh [DIR]   # every part at its smallest, on the CPU (minutes):
#                                        # checks the script end to end before device time
#
# 1. benchmarks/steps.py --scale=accelerator in float32, then in bfloat16: the hot steps
#    against the device's matmul peak (steps_float32.json, steps_bfloat16.json).
# 2. benchmarks/compare_torch.py at accelerator batch sizes, JAX against PyTorch CUDA on the
#    same GPU, full float32 on both (compare_torch.json, written after every row, so a part
#    cut short by its time limit keeps the rows it finished). The ProxylessNAS architecture
#    step's cost table is FLOPs here: measuring latencies would take the part's minutes.
# Each part runs under its own time limit; the exit status is 1 if any part failed or ran out.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/device-bench}}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX takes GPU memory as it needs it: torch shares it
export TF_CPP_MIN_LOG_LEVEL=1

if [ "${SMOKE:-0}" = 1 ]; then
  platform=cpu scale=smoke limits=(600 600 900) repeats=1  # CPU compiles: slow, not timed
  compare=(--synthesis_batch_size=2 --supernet_batch_size=2 --space=spos_tiny
           --proxyless_batch_size=2 --proxyless_space=proxyless_tiny --darts_preset=smoke
           --darts_mode=finite_difference --repeats=1 --warmup=0)
else
  platform=cuda scale=accelerator limits=(150 100 220) repeats=3
  compare=(--synthesis_batch_size=256 --supernet_batch_size=256 --proxyless_batch_size=64
           --darts_batch_size=64 --repeats=5 --warmup=2)
fi

status=0
part() {  # part LIMIT_S NAME COMMAND...: the command's output also in DIR/NAME.log
  local limit=$1 name=$2
  shift 2
  echo "== $name (at most $limit s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit status $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

for dtype in float32 bfloat16; do
  limit=${limits[0]}
  [ "$dtype" = bfloat16 ] && limit=${limits[1]}
  part "$limit" "steps_$dtype" env JAX_PLATFORMS=$platform python benchmarks/steps.py \
    --scale=$scale --compute_dtype=$dtype --repeats=$repeats --json="$out/steps_$dtype.json"
done
part "${limits[2]}" compare_torch env JAX_PLATFORMS=$platform python benchmarks/compare_torch.py \
  "${compare[@]}" --proxyless_cost_model=flops --json="$out/compare_torch.json"
ls -l "$out"
exit $status
