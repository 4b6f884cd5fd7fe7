#!/usr/bin/env bash
# ratios.sh measures the performance goals side by side, in one run on one
# machine, and prints them as a markdown table:
#
#   served/in-process  BenchmarkOverhead conc=16: images/s over gRPC over
#                      images/s of the server's own runner called in
#                      process (same batcher and engine), in alternating
#                      windows (goal >= 0.95)
#   added p50          BenchmarkOverhead conc=1: median of paired
#                      differences, gRPC call minus in-process call
#                      (goal <= 1 ms)
#   tuned/best fixed   BenchmarkBatching: tuned over the best fixed=N, the
#                      configurations taking turns in windows (goal >= 0.95),
#                      and tuned over fixed=1 (goal >= 0.95)
#   served/engine      opencv only: BenchmarkOverhead conc=16 served
#                      images/s over the best BenchmarkEngine batch
#                      (goal >= 0.90)
#
# usage: benchmarks/ratios.sh [BENCHTIME] [MODEL...]
#   BENCHTIME is go test's -benchtime per benchmark (default 10s);
#   MODELS default to yolov8s resnet50 mobilenetv3_large, $BACKENDS to
#   "ort-cpu opencv", $KINDS (the benchmarks run) to
#   "Engine|Overhead|Batching". With APPEND=1 the output is added to an
#   earlier run's; with TABLE_ONLY=1 nothing runs and the table is made
#   from the earlier output.
# The raw `go test` output and the table are kept under
# benchmarks/results/<date>-<host>/ (ratios-bench.txt, ratios.md).
set -euo pipefail
cd "$(dirname "$0")/.."
benchtime=${1:-10s}
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(yolov8s resnet50 mobilenetv3_large)
out=benchmarks/results/$(date -u +%F)-${MACHINE:-$(hostname | tr -c 'A-Za-z0-9._\n-' '-')}
mkdir -p "$out"
raw=$out/ratios-bench.txt
backends=(${BACKENDS:-ort-cpu opencv})
kinds=${KINDS:-Engine|Overhead|Batching}
if [ "${TABLE_ONLY:-}" != 1 ]; then
[ "${APPEND:-}" = 1 ] || : > "$raw"
echo "# $(date -u '+%F %T UTC') load: $(cut -d' ' -f1-3 /proc/loadavg) commit: $(git rev-parse --short=12 HEAD)" >> "$raw"
# One go test per model and backend, so that the benchmarks a ratio
# compares run back to back (go test would otherwise run every model's
# engine benchmarks first and the served ones minutes later).
for model in "${models[@]}"; do
	for be in "${backends[@]}"; do
		cmd=(go test -run '^$' -timeout 30m -bench "^Benchmark($kinds)\$/^$model\$/^$be\$/^(batch=.*|conc=(1|16)|configs)\$" -benchtime "$benchtime" ./benchmarks/)
		echo "# $(date -u '+%T') load: $(cut -d' ' -f1-3 /proc/loadavg): ${cmd[*]}" >> "$raw"
		"${cmd[@]}" 2>&1 | tee -a "$raw" >&2
	done
done
echo "# end $(date -u '+%F %T UTC') load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$raw"
fi

awk -v benchtime="$benchtime" '
function metric(line, unit,   n, f, i) {
	n = split(line, f, /[ \t]+/)
	for (i = 2; i <= n; i++) if (f[i] == unit) return f[i-1]
	return ""
}
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	split(name, p, "/")              # kind/model/backend/rest...
	key = p[2] "/" p[3]
	rest = substr(name, length(p[1]) + length(p[2]) + length(p[3]) + 4)
	ips[p[1] "/" key "/" rest] = metric($0, "images/s")
	p50[p[1] "/" key "/" rest] = metric($0, "p50-ms")
	sv[p[1] "/" key "/" rest] = metric($0, "served-images/s")
	ip[p[1] "/" key "/" rest] = metric($0, "inproc-images/s")
	sr[p[1] "/" key "/" rest] = metric($0, "served/inproc")
	ad[p[1] "/" key "/" rest] = metric($0, "added-p50-ms")
	sp[p[1] "/" key "/" rest] = metric($0, "served-p50-ms")
	ipp[p[1] "/" key "/" rest] = metric($0, "inproc-p50-ms")
	if (p[1] == "BenchmarkBatching") {
		tb[key] = metric($0, "tuned/best-fixed"); t1v[key] = metric($0, "tuned/fixed=1")
		tmax[key] = metric($0, "tuned-max-batch"); tips[key] = metric($0, "tuned-images/s")
		n = split($0, f, /[ \t]+/); bestv[key] = ""; bestc[key] = ""
		for (j = 2; j <= n; j++) if (f[j] ~ /^fixed=[0-9]+-images\/s$/ && (bestv[key] == "" || f[j-1] + 0 > bestv[key] + 0)) { bestv[key] = f[j-1]; bestc[key] = f[j]; sub(/-images\/s$/, "", bestc[key]) }
	}
	if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
}
function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "n/a" : sprintf("%.3f", a / b) }
function verdict(v, goal, ge) { if (v == "n/a") return "not measured"; return ((ge && v + 0 >= goal) || (!ge && v + 0 <= goal)) ? "met" : "MISSED" }
END {
	printf "| model / backend | served ÷ in-process at conc 16 (≥ 0.95) | added p50 at conc 1, ms: median of paired differences (≤ 1) | tuned ÷ best fixed (≥ 0.95) | tuned ÷ batch 1 (≥ 0.95) | served ÷ bare engine, opencv (≥ 0.90) |\n"
	printf "|---|---|---|---|---|---|\n"
	for (i = 1; i <= nk; i++) {
		k = order[i]
		o16 = "BenchmarkOverhead/" k "/conc=16"; o1 = "BenchmarkOverhead/" k "/conc=1"
		sat = (sr[o16] == "") ? "n/a" : sprintf("%.3f", sr[o16])
		a = sp[o1]; b = ipp[o1]
		add = (ad[o1] == "") ? "n/a" : sprintf("%.2f", ad[o1])
		best = bestv[k]; bestn = bestc[k]
		tuned = (tb[k] == "") ? "n/a" : sprintf("%.3f", tb[k])
		t1 = (t1v[k] == "") ? "n/a" : sprintf("%.3f", t1v[k])
		eng = "n/a"
		if (k ~ /\/opencv$/) {
			e = ""
			for (x in ips) if (index(x, "BenchmarkEngine/" k "/batch=") == 1 && (e == "" || ips[x] + 0 > e + 0)) e = ips[x]
			eng = ratio(sv[o16], e) " (" sv[o16] " ÷ " e " img/s)"
		}
		printf "| %s | %s (%s ÷ %s img/s): %s | %s (p50 served %s, in-process %s): %s | %s (tuned %s, best %s %s): %s | %s: %s | %s |\n", k,
			sat, sv[o16], ip[o16], verdict(sat, 0.95, 1),
			add, a, b, verdict(add, 1, 0),
			tuned, tips[k] " img/s, max batch " tmax[k], bestn, best, verdict(tuned, 0.95, 1),
			t1, verdict(t1, 0.95, 1),
			(eng == "n/a" ? "—" : eng ": " verdict(substr(eng, 1, index(eng, " ") - 1), 0.90, 1))
	}
}' "$raw" | tee "$out/ratios.md"
