#!/usr/bin/env bash
# One prepared check on a CUDA machine (Python 3.12, torch with CUDA 13 preinstalled, CPU-only
# onnxruntime, no network), in under 8 minutes:
#   (a) the CUDA parity tests: pytest tests/test_export.py tests/test_runtime.py -k "cuda or provider or device"
#   (b) benchmarks/score.py at full size on a Flickr30K-sized test split: 1,000 images x 5,000
#       captions, mode full, K = 3, d = 1024: fast-cuda and onnx-cuda on all of it, the per-caption
#       loop on CUDA (1000 x 100 slice) for the speed ratio and on the CPU (200 x 5 slice) as the
#       exactness reference
#   (c) benchmarks/train_step.py on CUDA at batch 128, d = 1024, K = 3, full (original, fast,
#       fast-nockpt, support): samples/s, peak GPU memory, gradient exactness (on a 32-sample check
#       step, which the original also fits)
#   (d) only when asked for (GPU_CHECK_PARTS="d", a call of its own: ~4 minutes, a 37 GB index on
#       disk): benchmarks/search.py's d = 1024 rows (--store-projections float16, and float32
#       recomputing the projections) at 10K and 100K images, on ONNX Runtime CUDA when it starts
# Each part has its own timeout and a failing part does not stop the others; a summary ends it.
#
#   bash scripts/gpu_check.sh            # output tee'd to $OUT/gpu_check.log when OUT is set,
#                                        # JSON results to $OUT/score_flickr.json, $OUT/train_step.json
#   GPU_CHECK_BUDGET=450 (seconds, the whole script), PYTHON=python3,
#   GPU_CHECK_PARTS="a b c" (which parts to run, e.g. "a c" for a rerun of those)
#
# Python packages. torch, numpy, onnx, onnxruntime (CPU), pytest, tqdm are on the machine; the
# runtime's tokeniser is its own (runtime/tokenizer.json), so nothing else is needed. Any extra
# .whl/*.whl carried is installed with --no-deps into /tmp/site, put on PYTHONPATH.
#
# onnxruntime-gpu, for onnx-cuda and the CUDA provider tests (else they report that the provider is
# missing, and the rest runs). onnxruntime-gpu 1.31.x on PyPI is built for CUDA 13 and cuDNN 9
# (Requires-Dist: nvidia-cuda-runtime~=13.0, nvidia-cudnn-cu13, ...), which the torch there
# brings. Its wheel (~256 MB) is too big for one call (64 MiB), so it travels in 55 MB parts,
# one part per call onto the same warm machine (parts already there stay), this script run in
# the call that carries the last one. Here:
#     mkdir -p .whl/ort && cd .whl/ort
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --platform manylinux_2_28_x86_64 onnxruntime-gpu==1.31.*
#     sha256sum onnxruntime_gpu-*.whl > ../ort-gpu.sha256      # the wheel's name and checksum
#     split -b 55M onnxruntime_gpu-*.whl ../ort-gpu.part-      # -> .whl/ort-gpu.part-aa, -ab, ...
#     cd ../.. && rm -r .whl/ort
# then carry .whl/ort-gpu.sha256 and .whl/ort-gpu.part-aa in the first call, -ab in the next, ...
# The parts are put back together in /tmp, checked against ort-gpu.sha256 (when present), and
# installed with `python3 -m pip install --no-deps --target /tmp/ortgpu WHEEL`; /tmp/ortgpu goes
# first on PYTHONPATH, ahead of the CPU-only onnxruntime.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
PARTS=${GPU_CHECK_PARTS:-a b c}
START=$(date +%s)
RESULTS=${OUT:-/tmp/gpu_check}
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
export PYTHONUNBUFFERED=1
declare -A STATUS

left() { echo $((BUDGET - ($(date +%s) - START))); }

# part_timeout WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the parts after it
part_timeout() {
    local t=$(( $(left) - $2 ))
    (( t > $1 )) && t=$1
    echo "$t"
}

# run_part NAME WANT RESERVE COMMAND...: run under its timeout; record PASS / FAIL (rc) / TIMEOUT / SKIPPED
run_part() {
    local name=$1 want=$2 reserve=$3
    shift 3
    local t
    if [[ " ${PARTS} " != *" ${name%%-*} "* ]]; then
        STATUS[$name]="not asked for (GPU_CHECK_PARTS)"
        return
    fi
    t=$(part_timeout "$want" "$reserve")
    echo
    echo "=== $name: timeout ${t}s, $(left)s of the budget left: $*"
    if (( t < 20 )); then
        STATUS[$name]="SKIPPED (no time left)"
        echo "skipped: no time left"
        return
    fi
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$t" "$@"
    rc=$?
    if (( rc == 124 || rc == 137 )); then
        STATUS[$name]="TIMEOUT after ${t}s"
    elif (( rc == 0 )); then
        STATUS[$name]="PASS ($(( $(date +%s) - t0 ))s)"
    else
        STATUS[$name]="FAIL (exit $rc, $(( $(date +%s) - t0 ))s)"
    fi
    echo "=== $name: ${STATUS[$name]}"
}

install_wheels() {
    local extra=""
    if compgen -G ".whl/ort-gpu.part-*" > /dev/null; then
        echo "onnxruntime-gpu parts: $(cd .whl && echo ort-gpu.part-*)"
        local name="" sum=""
        if [ -f .whl/ort-gpu.sha256 ]; then
            read -r sum name < .whl/ort-gpu.sha256
            name=$(basename "${name#\*}")
        fi
        mkdir -p /tmp/ortgpu-wheel
        local whl=/tmp/ortgpu-wheel/${name:-ort-gpu.whl}
        cat .whl/ort-gpu.part-* > "$whl"
        if [ -n "$sum" ] && [ "$(sha256sum "$whl" | cut -d' ' -f1)" != "$sum" ]; then
            echo "onnxruntime-gpu: the parts do not add up to the wheel of .whl/ort-gpu.sha256 (a part missing?); not installed"
        else
            if [ -z "$name" ]; then  # no checksum file: name the wheel from its own dist-info
                name=$("$PY" - "$whl" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
tag = next(ln.split(":", 1)[1].strip() for ln in z.read(f"{info}/WHEEL").decode().splitlines() if ln.startswith("Tag:"))
print(f"{info[:-len('.dist-info')]}-{tag}.whl")
EOF
)
                mv "$whl" "/tmp/ortgpu-wheel/$name" && whl="/tmp/ortgpu-wheel/$name"
            fi
            if [ "$(cat /tmp/ortgpu/.gpu_check_installed 2> /dev/null)" = "$(basename "$whl")" ]; then
                extra=/tmp/ortgpu  # a rerun on the same warm machine
                echo "onnxruntime-gpu: $(basename "$whl") already in /tmp/ortgpu"
            elif timeout 180 "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
                    --upgrade --target /tmp/ortgpu "$whl"; then
                extra=/tmp/ortgpu
                basename "$whl" > /tmp/ortgpu/.gpu_check_installed
                echo "onnxruntime-gpu: installed $(basename "$whl") into /tmp/ortgpu"
            else
                echo "onnxruntime-gpu: pip could not install $(basename "$whl")"
            fi
        fi
        rm -rf /tmp/ortgpu-wheel
    fi
    if compgen -G ".whl/*.whl" > /dev/null; then
        if timeout 120 "$PY" -m pip install -q --no-deps --no-index --no-compile --disable-pip-version-check \
                --upgrade --target /tmp/site .whl/*.whl; then
            extra=${extra:+$extra:}/tmp/site
            echo "installed into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
        fi
    fi
    if [ -n "$extra" ]; then
        export PYTHONPATH=$extra${PYTHONPATH:+:$PYTHONPATH}
    fi
}

probe() {  # what this machine offers; whether ORT's CUDA provider starts on a one-node graph
    nvidia-smi -L 2>&1 | head -2
    "$PY" - <<'EOF'
import sys, tempfile, os
print("python", sys.version.split()[0])
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name() if torch.cuda.is_available() else "")
except Exception as e:
    print("torch: cannot import:", e)
for mod in ("numpy", "onnx", "tqdm", "pytest"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        print(mod, "MISSING", f"({type(e).__name__})")
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, os.path.dirname(ort.__file__), ort.get_available_providers())
    if "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):
            try:
                ort.preload_dlls()
            except Exception as e:
                print("preload_dlls:", e)
        import onnx
        from onnx import TensorProto, helper
        g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        path = os.path.join(tempfile.mkdtemp(), "probe.onnx")
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        s = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        print("ORT CUDA provider starts:", s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers())
except Exception as e:
    print("onnxruntime probe failed:", type(e).__name__, e)
EOF
}

main() {
    echo "gpu_check: $(date -u +%FT%TZ), budget ${BUDGET}s, results in $RESULTS"
    install_wheels
    probe

    run_part "a-cuda-tests" 120 270 "$PY" -m pytest -q -rs -p no:cacheprovider \
        tests/test_export.py tests/test_runtime.py -k "cuda or provider or device" \
        --junitxml "$RESULTS/pytest_cuda.xml"

    run_part "b-score-flickr" 250 100 "$PY" benchmarks/score.py --size full --n-img 1000 --n-cap 5000 \
        --embed-size 1024 --mode full --steps 3 --scorers loop,loop-cuda,fast-cuda,onnx-cuda \
        --slice loop=200x5 --slice loop-cuda=100 \
        --json "$RESULTS/score_flickr.json" --overwrite

    run_part "c-train-step" 150 0 "$PY" benchmarks/train_step.py --device cuda --batch-size 128 \
        --embed-size 1024 --steps 3 --mode full --check-batch 32 --iters 3 --max-seconds 70 \
        --json "$RESULTS/train_step.json" --overwrite

    run_part "d-search-cuda" 420 0 "$PY" benchmarks/search.py --configs full+proj:float16,full \
        --sizes 10000,100000 --queries 10 --work /tmp --json "$RESULTS/search_cuda.json" --overwrite

    echo
    echo "=== summary ($(( $(date +%s) - START ))s)"
    for part in a-cuda-tests b-score-flickr c-train-step d-search-cuda; do
        printf '%-16s %s\n' "$part" "${STATUS[$part]:-not run}"
    done
    "$PY" - "$RESULTS" <<'EOF'
import json, os, sys
root = sys.argv[1]
for file, label in (("score_flickr.json", "score"),):
    try:
        rep = json.load(open(os.path.join(root, file)))
    except FileNotFoundError:
        print(f"{label}: no results")
        continue
    for size, r in rep.get("sizes", {}).items():
        for name, s in r.get("scorers", {}).items():
            if s.get("status") == "ok":
                x = f", {s['x_loop']:.2f}x the loop" if s.get("x_loop") else ""
                print(f"{label} {name:<10} {s['pairs_per_s']:10.1f} pairs/s{x}, {s['gflops_per_s']:.0f} GFLOP/s, "
                      f"peak {s['mem_peak_mb']:.0f} MB, max|diff| {s.get('max_abs_diff', float('nan')):.2e} "
                      f"{s.get('check')} ({s['imgs']}x{s['caps']} timed)")
            else:
                print(f"{label} {name:<10} {s.get('status', '?').upper()}: {s.get('error', '')[:200]}")
        if "ideal_speedup" in r:
            print(f"{label}: ideal speed-up (FLOPs original / fast) {r['ideal_speedup']:.2f}x")
    print(f"{label} exactness:", rep.get("verdict", "(run cut short)"))
try:
    rep = json.load(open(os.path.join(root, "train_step.json")))
    for name, s in rep.get("scorers", {}).items():
        sps = f"{s['samples_per_s']:.1f} samples/s" if s.get("samples_per_s") else "-"
        grad = f", grad max|diff| {s['grad_max_abs_diff']:.2e} {s['grad_check']}" if "grad_max_abs_diff" in s else ""
        peak = f", peak {s['mem_peak_mb']:.0f} MB" if s.get("mem_peak_mb") is not None else ""
        print(f"train {name:<12} {s.get('status', '?').upper():<8} {sps}{peak}{grad}"
              + (f" ({s.get('error', '')[:120]})" if s.get("status") != "ok" else ""))
except FileNotFoundError:
    print("train: no results")
try:
    for r in json.load(open(os.path.join(root, "search_cuda.json"))):
        st = r["steps_ms"]
        print(f"search {r['config']:<18} {r['images']:>7,} images on {r['device']}: p50 {r['p50_ms']:.1f} ms, "
              f"p95 {r['p95_ms']:.1f} ms, matcher {st['matcher']:.1f} ms, {r['speedup']:.0f}x exhaustive")
except FileNotFoundError:
    print("search: no results (part d runs only when asked for)")
EOF
}

main 2>&1 | tee "$LOG"
