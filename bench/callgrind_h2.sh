#!/bin/sh
# Instructions per request (valgrind --tool=callgrind, deterministic): the difference between two runs of
# bench/inprocess_h2.py --once KIND, of N1 and N2 requests, divided by N2 - N1 (setup and import cancel out: both runs
# build the client's bytes for N2 requests, and the hash seed is fixed).
#   bench/callgrind_h2.sh [KIND...]      (default: h1 h2-m1 h2-m10)
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N1=${N1:-200}
N2=${N2:-1200}
count() {
    PYTHONHASHSEED=${PYTHONHASHSEED:-0} valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        "$PY" bench/inprocess_h2.py --once "$1" --requests "$2" --prepare "$N2" 2>&1 \
        | sed -n 's/.*Collected : *\([0-9]*\).*/\1/p'
}
for kind in ${*:-h1 h2-m1 h2-m10}; do
    a=$(count "$kind" "$N1")
    b=$(count "$kind" "$N2")
    echo "$kind: $(( (b - a) / (N2 - N1) )) instructions/request"
done
