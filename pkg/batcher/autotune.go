package batcher

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
)

// Self-tuning of the dynamic batcher.
//
// On a GPU a bigger batch is nearly free, so "batch as much as you can" is
// right. On a CPU it often is not: ONNX Runtime already spreads one image
// over every core, and a bigger batch can be slower per image (ResNet-50
// on the 2-core CI machine: 44 img/s at batch 1, 25 at batch 2, 49 at
// batch 8). So the batch sizes a model prefers are measured, per model and
// engine, at warm-up (MeasureBatchSizes), and chosen from the measurement
// by pure decision logic (ChooseBatchSizes) that tests drive with
// synthetic figures. A latency-target mode (LatencyController, applied to
// a running Batcher by LatencyLoop) then adapts the batch size and the
// queue delay online to the most throughput that keeps a p99 budget.

// Defaults of TuneOptions.
const (
	// DefaultTuneTolerance: no size slower per image than the smallest
	// (batch 1) by more than 5% is ever chosen.
	DefaultTuneTolerance = 0.05
	// DefaultTuneMinGain: a bigger size is only worth its extra latency
	// when it is at least 3% faster per image than every smaller chosen
	// size; less is within the noise of a short measurement.
	DefaultTuneMinGain = 0.03
)

// BatchMeasurement is how fast an engine ran batches of one size.
type BatchMeasurement struct {
	// Size is the number of images per engine run.
	Size int
	// Runs is the number of timed runs.
	Runs int
	// Median and Max are the run times of one batch.
	Median, Max time.Duration
	// ImagesPerSec is Size over Median.
	ImagesPerSec float64
	// Chosen says whether ChooseBatchSizes picked the size, and Why says
	// why or why not. Verdict is the same in one fixed word (a Verdict
	// constant), for metric labels: Why carries the figures.
	Chosen  bool
	Why     string
	Verdict string
}

// Verdicts of ChooseBatchSizes on one measured size
// (BatchMeasurement.Verdict).
const (
	// VerdictSmallest: the smallest size, always chosen.
	VerdictSmallest = "smallest"
	// VerdictFaster: chosen, faster per image than every smaller chosen
	// size by more than MinGain.
	VerdictFaster = "faster"
	// VerdictDominated: not chosen, a smaller chosen size is as fast
	// within MinGain.
	VerdictDominated = "dominated"
	// VerdictSlower: not chosen, slower per image than the smallest size
	// by more than Tolerance.
	VerdictSlower = "slower"
)

// TuneOptions are the knobs of ChooseBatchSizes; zero fields take the
// defaults.
type TuneOptions struct {
	// Tolerance is the most a chosen size may be slower per image than
	// the smallest measured size (a fraction, DefaultTuneTolerance).
	Tolerance float64
	// MinGain is how much faster per image than every smaller chosen size
	// a size must be to be chosen (a fraction, DefaultTuneMinGain).
	MinGain float64
}

func (o TuneOptions) withDefaults() TuneOptions {
	if o.Tolerance <= 0 {
		o.Tolerance = DefaultTuneTolerance
	}
	if o.MinGain <= 0 {
		o.MinGain = DefaultTuneMinGain
	}
	return o
}

// TuneDecision is what the batch-size tuner measured and chose, and why.
// It is logged at start-up and exposed for metrics and ModelInfo.
type TuneDecision struct {
	Model   string
	Backend string
	// Measurements are per candidate size, smallest first, with the
	// verdict on each.
	Measurements []BatchMeasurement
	// Preferred are the chosen batch sizes, smallest first: the sizes not
	// dominated by a smaller, at least as fast one. The batcher releases a
	// batch at once when exactly one of them is waiting.
	Preferred []int
	// MaxBatchSize is the most images the batcher puts in one run: the
	// largest size within Tolerance per image of both the fastest
	// measured size and the smallest one. It may be above the largest
	// preferred size: under saturation a server also decodes and
	// preprocesses on the same cores, and fewer, bigger engine runs
	// leave them more room than an engine-only measurement shows
	// (ResNet-50 on ORT, 2 cores: batch 8 measured 8% faster than batch 1
	// alone, but served 25% more images per second), so any size that is
	// not measurably slower is allowed once a backlog fills it.
	MaxBatchSize int
	// Best is the measured size with the most images per second.
	Best int
	// Tolerance and MinGain are the options the choice used.
	Tolerance, MinGain float64
	// Took is how long measuring took.
	Took time.Duration
}

// String is the decision in one line, for logs.
func (d TuneDecision) String() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "preferred %v, max batch %d:", d.Preferred, d.MaxBatchSize)
	for _, m := range d.Measurements {
		mark := "-"
		if m.Chosen {
			mark = "+"
		}
		fmt.Fprintf(&sb, " %s%d=%.1fimg/s", mark, m.Size, m.ImagesPerSec)
	}
	return sb.String()
}

// ChooseBatchSizes decides, from per-size measurements, which batch sizes
// the batcher should prefer and how big a batch it may run. Latency grows
// with the batch size, so a size is only preferred when it is faster per
// image than every smaller preferred size by opts.MinGain; the smallest
// measured size (normally 1, so that a lone image goes at once) always is.
// The maximum is the largest size within opts.Tolerance of the fastest
// measured one (see TuneDecision.MaxBatchSize). No size slower per image
// than the smallest one by more than opts.Tolerance is ever chosen. The measurements are not modified; the decision carries a copy
// with each size's verdict.
func ChooseBatchSizes(ms []BatchMeasurement, opts TuneOptions) (TuneDecision, error) {
	opts = opts.withDefaults()
	if len(ms) == 0 {
		return TuneDecision{}, errors.New("choosing batch sizes: no measurements")
	}
	sorted := slices.Clone(ms)
	slices.SortFunc(sorted, func(a, b BatchMeasurement) int { return a.Size - b.Size })
	for i, m := range sorted {
		switch {
		case m.Size < 1:
			return TuneDecision{}, fmt.Errorf("choosing batch sizes: measured size %d", m.Size)
		case i > 0 && sorted[i-1].Size == m.Size:
			return TuneDecision{}, fmt.Errorf("choosing batch sizes: size %d measured twice", m.Size)
		case !(m.ImagesPerSec > 0) || math.IsInf(m.ImagesPerSec, 0):
			return TuneDecision{}, fmt.Errorf("choosing batch sizes: size %d has throughput %v", m.Size, m.ImagesPerSec)
		}
	}
	d := TuneDecision{Measurements: sorted, Tolerance: opts.Tolerance, MinGain: opts.MinGain}
	base := sorted[0]
	floor := base.ImagesPerSec * (1 - opts.Tolerance)
	best := base // fastest chosen so far
	fastest := base
	for i := range sorted {
		m := &sorted[i]
		if m.ImagesPerSec > fastest.ImagesPerSec {
			fastest = *m
		}
		switch {
		case i == 0:
			m.Chosen, m.Verdict = true, VerdictSmallest
			m.Why = "smallest size: a lone image goes at once"
		case m.ImagesPerSec < floor:
			m.Verdict = VerdictSlower
			m.Why = fmt.Sprintf("%.0f%% slower per image than batch %d", 100*(1-m.ImagesPerSec/base.ImagesPerSec), base.Size)
		case m.ImagesPerSec <= best.ImagesPerSec*(1+opts.MinGain):
			m.Verdict = VerdictDominated
			m.Why = fmt.Sprintf("dominated by batch %d (%.1f img/s at lower latency)", best.Size, best.ImagesPerSec)
		default:
			m.Chosen, m.Verdict = true, VerdictFaster
			m.Why = fmt.Sprintf("%.0f%% faster per image than batch %d", 100*(m.ImagesPerSec/best.ImagesPerSec-1), best.Size)
			best = *m
		}
		if m.Chosen {
			d.Preferred = append(d.Preferred, m.Size)
		}
	}
	d.Best = fastest.Size
	d.MaxBatchSize = d.Preferred[len(d.Preferred)-1]
	for _, m := range sorted {
		if m.Size > d.MaxBatchSize && m.ImagesPerSec >= floor && m.ImagesPerSec >= fastest.ImagesPerSec*(1-opts.Tolerance) {
			d.MaxBatchSize = m.Size
		}
	}
	for i := range sorted {
		if m := &sorted[i]; m.Size == d.MaxBatchSize && !m.Chosen {
			m.Why += fmt.Sprintf("; the maximum: within %.0f%% of the fastest, batch %d", 100*opts.Tolerance, fastest.Size)
		}
	}
	return d, nil
}

// CandidateSizes are the batch sizes worth measuring up to maxBatch:
// the powers of two below it and maxBatch itself.
func CandidateSizes(maxBatch int) []int {
	var sizes []int
	for s := 1; s < maxBatch; s *= 2 {
		sizes = append(sizes, s)
	}
	return append(sizes, max(maxBatch, 1))
}

// MeasureOptions say how MeasureBatchSizes times an engine.
type MeasureOptions struct {
	// Sizes are the batch sizes to measure (default CandidateSizes of
	// MaxBatchSize).
	Sizes []int
	// MaxBatchSize bounds Sizes and sizes the batch buffer (> 0).
	MaxBatchSize int
	// Warmup untimed runs precede each size's timed ones (default 1):
	// engines allocate per shape on first use.
	Warmup int
	// MinRuns and MinTime: the sizes are run in rounds, one run of each
	// size a round, at least MinRuns rounds (default 4) and until MinTime
	// per size passed (default 300ms), but no longer than MaxTime per size
	// (default 3s) once MinRuns are done.
	MinRuns          int
	MinTime, MaxTime time.Duration
}

// MeasureBatchSizes times engine e on batches of each candidate size of a
// synthetic C×H×W input and returns one measurement per size, smallest
// first. It uses e directly, so nothing else may use e meanwhile (call it
// before a batcher serves with e, or while its model is not ready).
func MeasureBatchSizes(ctx context.Context, e engine.Engine, c, h, w int, opts MeasureOptions) ([]BatchMeasurement, error) {
	if e == nil {
		return nil, errors.New("measuring batch sizes: nil engine")
	}
	if opts.MaxBatchSize < 1 {
		return nil, fmt.Errorf("measuring batch sizes: max batch size %d", opts.MaxBatchSize)
	}
	sizes := opts.Sizes
	if len(sizes) == 0 {
		sizes = CandidateSizes(opts.MaxBatchSize)
	}
	for _, s := range sizes {
		if s < 1 || s > opts.MaxBatchSize {
			return nil, fmt.Errorf("measuring batch sizes: size %d outside 1..%d", s, opts.MaxBatchSize)
		}
	}
	warmup := opts.Warmup
	if warmup == 0 {
		warmup = 1
	}
	minRuns := max(opts.MinRuns, 0)
	if minRuns == 0 {
		minRuns = 4
	}
	minTime, maxTime := opts.MinTime, opts.MaxTime
	if minTime == 0 {
		minTime = 300 * time.Millisecond
	}
	if maxTime == 0 {
		maxTime = 3 * time.Second
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("measuring batch sizes: %w", err)
	}
	alloc, _ := e.(engine.BatchAllocator)
	pool, err := engine.NewBatchPool(opts.MaxBatchSize, c, h, w, 1, alloc)
	if err != nil {
		return nil, fmt.Errorf("measuring batch sizes: %w", err)
	}
	defer pool.Close()
	b, err := pool.Get()
	if err != nil {
		return nil, fmt.Errorf("measuring batch sizes: %w", err)
	}
	defer pool.Put(b)
	// A smooth pattern in [0,1]: real-looking enough that no engine takes
	// a shortcut on constant input.
	for i := range b.Data {
		b.Data[i] = float32(i%251) / 250
	}
	sizes = slices.Compact(slices.Sorted(slices.Values(sizes)))
	run := func(n int) (time.Duration, error) {
		b.N = n
		t := time.Now()
		outs, err := e.Run(ctx, b)
		d := time.Since(t)
		if err != nil {
			return 0, fmt.Errorf("measuring batch size %d on %s: %w", n, e.Backend(), err)
		}
		if err := batchCheckOutputs(outs, n); err != nil {
			return 0, fmt.Errorf("measuring batch size %d on %s: %w", n, e.Backend(), err)
		}
		return d, nil
	}
	for _, n := range sizes {
		for range warmup {
			if _, err := run(n); err != nil {
				return nil, err
			}
		}
	}
	// Rounds over all sizes rather than one size after the other: on a
	// shared machine a burst of load then hits every size alike instead
	// of making one look slow.
	times := make([][]time.Duration, len(sizes))
	start := time.Now()
	for round := 1; ; round++ {
		for i, n := range sizes {
			if err := ctx.Err(); err != nil {
				return nil, fmt.Errorf("measuring batch size %d: %w", n, err)
			}
			d, err := run(n)
			if err != nil {
				return nil, err
			}
			times[i] = append(times[i], d)
		}
		spent := time.Since(start)
		if round >= minRuns && (spent >= minTime*time.Duration(len(sizes)) || spent >= maxTime*time.Duration(len(sizes))) {
			break
		}
	}
	ms := make([]BatchMeasurement, len(sizes))
	for i, n := range sizes {
		ms[i] = measurement(n, times[i])
	}
	return ms, nil
}

// measurement summarises the run times of one batch size.
func measurement(n int, times []time.Duration) BatchMeasurement {
	slices.Sort(times)
	med := times[len(times)/2]
	if len(times)%2 == 0 {
		med = (times[len(times)/2-1] + times[len(times)/2]) / 2
	}
	m := BatchMeasurement{Size: n, Runs: len(times), Median: med, Max: times[len(times)-1]}
	if med > 0 {
		m.ImagesPerSec = float64(n) / med.Seconds()
	}
	return m
}

// TuneBatchSizes measures e (see MeasureBatchSizes) and chooses the
// preferred batch sizes from the measurement (see ChooseBatchSizes).
func TuneBatchSizes(ctx context.Context, model string, e engine.Engine, c, h, w int, mopts MeasureOptions, topts TuneOptions) (TuneDecision, error) {
	start := time.Now()
	ms, err := MeasureBatchSizes(ctx, e, c, h, w, mopts)
	if err != nil {
		return TuneDecision{}, fmt.Errorf("tuning model %q: %w", model, err)
	}
	d, err := ChooseBatchSizes(ms, topts)
	if err != nil {
		return TuneDecision{}, fmt.Errorf("tuning model %q: %w", model, err)
	}
	d.Model, d.Backend, d.Took = model, e.Backend(), time.Since(start)
	return d, nil
}
