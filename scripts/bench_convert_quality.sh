#!/usr/bin/env bash
# Perplexity of the demo model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to bf16 as the
# base) after RTN, GPTQ and AWQ at 4 and 3 bits, group 128: the "Convert: quality" table of
# BENCHMARKS.md.  CPU only; ~3 h of CPU time (each calibrated conversion runs 30 layers).
#
#   scripts/bench_convert_quality.sh WORKDIR
#
# Texts (files every Debian/Ubuntu image has, so the numbers can be reproduced offline):
#   evaluation: GPL-3, GFDL-1.3, Apache-2.0, MPL-2.0, LGPL-2.1 (24.7k tokens)
#   calibration: the other licences of /usr/share/common-licenses -- GPL-1, GPL-2, LGPL-3,
#     MPL-1.1, Artistic, BSD, CC0-1.0 (17.5k tokens; 32 x 512 windows, disjoint).  Same
#     domain, as calibrating on wikitext-train for wikitext-test is; GFDL-1.2 and LGPL-2 are
#     left out as near-copies of evaluation texts.  GPL-2 shares boilerplate with GPL-3 and
#     LGPL-2.1: 10.7% of the evaluation's token 8-grams (2.3% of its 32-grams) occur here.
#   CALIB=vim: Vim's user manual chapters 01-29 instead (107k tokens, another domain).
set -euo pipefail
W=${1:?usage: $0 WORKDIR}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$W"
L=/usr/share/common-licenses EVAL=$W/eval_licenses.txt CALIB=$W/calib_${CALIB:-licenses}.txt
cat $L/{GPL-3,GFDL-1.3,Apache-2.0,MPL-2.0,LGPL-2.1} > "$EVAL"
case $CALIB in
  */calib_licenses.txt) cat $L/{GPL-1,GPL-2,LGPL-3,MPL-1.1,Artistic,BSD,CC0-1.0} > "$CALIB" ;;
  */calib_vim.txt) cat /usr/share/vim/vim*/doc/usr_[012]*.txt > "$CALIB" ;;
  *) echo "CALIB must be licenses or vim" >&2; exit 2 ;;
esac
q() { python -m quantrt.cli "$@"; }
[ -d "$W/base" ] || q convert demo "$W/base" --to bf16 --quiet
CAL=(--calib "$CALIB" --calib-samples 32 --calib-seqlen 512 --quiet)
declare -A RUNS=(
  [rtn4]="--to gptq --algo rtn --bits 4"          [rtn4_asym]="--to gptq --algo rtn --bits 4 --asym"
  [rtn3]="--to gptq --algo rtn --bits 3"          [rtn3_asym]="--to gptq --algo rtn --bits 3 --asym"
  [gptq4_act]="--to gptq --bits 4 --act-order"   [gptq3_act]="--to gptq --bits 3 --act-order"
  # awq*: the published recipe (opt-in); awq*_clip: the default AWQ (clip only, q/k clipped)
  [awq4]="--to awq --awq-scales --no-awq-clip-qk"
  [awq3]="--to gptq --algo awq --bits 3 --asym --awq-scales --no-awq-clip-qk"
  [awq4_clip]="--to awq"                          [awq3_clip]="--to gptq --algo awq --bits 3 --asym")
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
