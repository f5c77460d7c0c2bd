#!/usr/bin/env bash
# Perplexity of the demo model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to bf16 as the
# base) after RTN, GPTQ and AWQ at 4 and 3 bits, group 128: the "Convert: quality" table of
# BENCHMARKS.md.  CPU only; ~3 h of CPU time (each calibrated conversion runs 30 layers).
#
#   scripts/bench_convert_quality.sh WORKDIR
#
# Texts (files every Debian/Ubuntu image has, so the numbers can be reproduced offline):
#   evaluation: the GNU/Apache/Mozilla licences in /usr/share/common-licenses (24.7k tokens)
#   calibration: Vim's user manual chapters 01-29 (107k tokens; 32 x 512 windows, disjoint)
set -euo pipefail
W=${1:?usage: $0 WORKDIR}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$W"
EVAL=$W/eval_licenses.txt CALIB=$W/calib_vim.txt
cat /usr/share/common-licenses/{GPL-3,GFDL-1.3,Apache-2.0,MPL-2.0,LGPL-2.1} > "$EVAL"
cat /usr/share/vim/vim*/doc/usr_0*.txt /usr/share/vim/vim*/doc/usr_1*.txt \
    /usr/share/vim/vim*/doc/usr_2*.txt > "$CALIB"
q() { python -m quantrt.cli "$@"; }
[ -d "$W/base" ] || q convert demo "$W/base" --to bf16 --quiet
CAL=(--calib "$CALIB" --calib-samples 32 --calib-seqlen 512 --quiet)
declare -A RUNS=(
  [rtn4]="--to gptq --algo rtn --bits 4"          [rtn4_asym]="--to gptq --algo rtn --bits 4 --asym"
  [rtn3]="--to gptq --algo rtn --bits 3"          [rtn3_asym]="--to gptq --algo rtn --bits 3 --asym"
  [gptq4_act]="--to gptq --bits 4 --act-order"   [gptq3_act]="--to gptq --bits 3 --act-order"
  [awq4]="--to awq"                               [awq3]="--to gptq --algo awq --bits 3 --asym")
for name in "${!RUNS[@]}"; do
  extra=()
  [[ $name == rtn* ]] || extra=("${CAL[@]}")
  [ -d "$W/$name" ] || /usr/bin/time -v python -m quantrt.cli convert "$W/base" "$W/$name" \
      ${RUNS[$name]} --group-size 128 "${extra[@]}" 2> "$W/$name.log"
done
for name in base "${!RUNS[@]}"; do
  [ -f "$W/ppl_$name.json" ] || q eval ppl "$W/$name" --text "$EVAL" --ctx 512 --json \
      > "$W/ppl_$name.json"
  echo "$name $(cat "$W/ppl_$name.json")"
done
