package batcher_test

import (
	"context"
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
)

// thr builds synthetic measurements from images/s per batch size.
func thr(perSize map[int]float64) []batcher.BatchMeasurement {
	var ms []batcher.BatchMeasurement
	for size, ips := range perSize {
		ms = append(ms, batcher.BatchMeasurement{Size: size, Runs: 3, ImagesPerSec: ips,
			Median: time.Duration(float64(size) / ips * float64(time.Second))})
	}
	return ms
}

func TestChooseBatchSizes(t *testing.T) {
	tests := []struct {
		name      string
		perSize   map[int]float64
		preferred []int
		maxBatch  int
		best      int
	}{
		// Measured on the 2-core CI machine: batch 2 is much slower per
		// image, batch 8 slightly faster than batch 1.
		{"resnet50 ort cpu", map[int]float64{1: 44, 2: 25, 4: 38, 8: 49}, []int{1, 8}, 8, 8},
		{"gpu-like: every size faster", map[int]float64{1: 100, 2: 190, 4: 350, 8: 600}, []int{1, 2, 4, 8}, 8, 8},
		{"batching hurts", map[int]float64{1: 44, 2: 30, 4: 40, 8: 38}, []int{1}, 1, 1},
		// Batch 8 is 2% slower alone: not preferred, but allowed as the
		// maximum for a backlog, within the 5% tolerance.
		{"batching within noise", map[int]float64{1: 44, 2: 30, 4: 40, 8: 43}, []int{1}, 8, 1},
		{"gain within noise", map[int]float64{1: 100, 2: 102, 4: 102.5}, []int{1}, 4, 4},
		{"plateau then gain", map[int]float64{1: 50, 2: 80, 4: 79, 8: 85}, []int{1, 2, 8}, 8, 8},
		// Batch 8 is within 5% of batch 1 but 10% below the fastest.
		{"peak in the middle", map[int]float64{1: 50, 2: 55, 4: 60, 8: 51}, []int{1, 2, 4}, 4, 4},
		{"single size", map[int]float64{1: 10}, []int{1}, 1, 1},
		{"smallest is not 1", map[int]float64{4: 100, 8: 120}, []int{4, 8}, 8, 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := batcher.ChooseBatchSizes(thr(tt.perSize), batcher.TuneOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(d.Preferred, tt.preferred) {
				t.Errorf("preferred %v, want %v (%s)", d.Preferred, tt.preferred, d)
			}
			if d.MaxBatchSize != tt.maxBatch {
				t.Errorf("max batch %d, want %d (%s)", d.MaxBatchSize, tt.maxBatch, d)
			}
			if d.Best != tt.best {
				t.Errorf("best %d, want %d", d.Best, tt.best)
			}
			if len(d.Measurements) != len(tt.perSize) {
				t.Fatalf("%d measurements, want %d", len(d.Measurements), len(tt.perSize))
			}
			for i, m := range d.Measurements {
				if i > 0 && m.Size <= d.Measurements[i-1].Size {
					t.Errorf("measurements not sorted by size: %v", d.Measurements)
				}
				if m.Why == "" {
					t.Errorf("size %d has no reason", m.Size)
				}
				if chosenVerdict := m.Verdict == batcher.VerdictSmallest || m.Verdict == batcher.VerdictFaster; m.Verdict == "" || chosenVerdict != m.Chosen {
					t.Errorf("size %d chosen=%v has verdict %q (%s)", m.Size, m.Chosen, m.Verdict, m.Why)
				}
				if m.Size == d.MaxBatchSize && !strings.Contains(m.Why, "maximum") && !m.Chosen {
					t.Errorf("maximum %d does not say why: %q", m.Size, m.Why)
				}
				if m.Chosen != slices.Contains(d.Preferred, m.Size) {
					t.Errorf("size %d chosen=%v but preferred %v", m.Size, m.Chosen, d.Preferred)
				}
			}
		})
	}
}

// TestChooseBatchSizesProperties checks the guarantees on random
// measurements: no chosen size is slower per image than the smallest
// beyond the tolerance, each chosen size beats every smaller chosen one,
// and the fastest chosen size is within MinGain of the fastest measured.
func TestChooseBatchSizesProperties(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	opts := batcher.TuneOptions{Tolerance: 0.05, MinGain: 0.03}
	for range 2000 {
		perSize := map[int]float64{}
		for _, s := range batcher.CandidateSizes(1 + rng.IntN(64)) {
			perSize[s] = 1 + rng.Float64()*100
		}
		d, err := batcher.ChooseBatchSizes(thr(perSize), opts)
		if err != nil {
			t.Fatal(err)
		}
		base := d.Measurements[0].ImagesPerSec
		fastest, bestChosen, prev := 0.0, 0.0, 0.0
		for _, m := range d.Measurements {
			fastest = max(fastest, m.ImagesPerSec)
			if !m.Chosen {
				continue
			}
			if m.ImagesPerSec < base*(1-opts.Tolerance) {
				t.Fatalf("chose size %d at %.1f img/s, batch %d does %.1f: %s", m.Size, m.ImagesPerSec, d.Measurements[0].Size, base, d)
			}
			if m.ImagesPerSec <= prev {
				t.Fatalf("chose size %d no faster than a smaller chosen size: %s", m.Size, d)
			}
			prev = m.ImagesPerSec
			bestChosen = max(bestChosen, m.ImagesPerSec)
		}
		if bestChosen*(1+opts.MinGain) < fastest {
			t.Fatalf("best chosen %.1f img/s, fastest measured %.1f: %s", bestChosen, fastest, d)
		}
		var maxM batcher.BatchMeasurement
		for _, m := range d.Measurements {
			if m.Size == d.MaxBatchSize {
				maxM = m
			}
		}
		if d.MaxBatchSize < d.Preferred[len(d.Preferred)-1] || maxM.ImagesPerSec < base*(1-opts.Tolerance) ||
			(maxM.ImagesPerSec < fastest*(1-opts.Tolerance) && !maxM.Chosen) {
			t.Fatalf("max batch %d at %.1f img/s (batch 1 %.1f, fastest %.1f): %s", d.MaxBatchSize, maxM.ImagesPerSec, base, fastest, d)
		}
	}
}

func TestChooseBatchSizesRefusesBadMeasurements(t *testing.T) {
	tests := []struct {
		name string
		ms   []batcher.BatchMeasurement
		want string
	}{
		{"none", nil, "no measurements"},
		{"zero size", []batcher.BatchMeasurement{{Size: 0, ImagesPerSec: 1}}, "size 0"},
		{"twice", []batcher.BatchMeasurement{{Size: 2, ImagesPerSec: 1}, {Size: 2, ImagesPerSec: 2}}, "twice"},
		{"zero throughput", []batcher.BatchMeasurement{{Size: 1, ImagesPerSec: 0}}, "throughput"},
		{"NaN", []batcher.BatchMeasurement{{Size: 1, ImagesPerSec: math.NaN()}}, "throughput"},
		{"Inf", []batcher.BatchMeasurement{{Size: 1, ImagesPerSec: math.Inf(1)}}, "throughput"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := batcher.ChooseBatchSizes(tt.ms, batcher.TuneOptions{})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

func TestCandidateSizes(t *testing.T) {
	for _, tt := range []struct {
		max  int
		want []int
	}{{1, []int{1}}, {2, []int{1, 2}}, {4, []int{1, 2, 4}}, {6, []int{1, 2, 4, 6}}, {8, []int{1, 2, 4, 8}}, {0, []int{1}}} {
		if got := batcher.CandidateSizes(tt.max); !slices.Equal(got, tt.want) {
			t.Errorf("CandidateSizes(%d) = %v, want %v", tt.max, got, tt.want)
		}
	}
}

// simEngine simulates a model whose batch run time depends on the batch
// size: cost[n] when given, else base+perImage×n. It returns one output
// row per image.
type simEngine struct {
	base, perImage time.Duration
	cost           map[int]time.Duration
	fail           error
	runs           atomic.Int64
	mu             sync.Mutex // guards the field below
	sizes          []int
}

func (e *simEngine) Backend() string { return "sim" }
func (e *simEngine) Close() error    { return nil }

func (e *simEngine) runTime(n int) time.Duration {
	if d, ok := e.cost[n]; ok {
		return d
	}
	return e.base + e.perImage*time.Duration(n)
}

func (e *simEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	e.runs.Add(1)
	e.mu.Lock()
	e.sizes = append(e.sizes, b.N)
	e.mu.Unlock()
	if e.fail != nil {
		return nil, e.fail
	}
	select {
	case <-time.After(e.runTime(b.N)):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	out := make([]float32, b.N)
	for i := range b.N {
		out[i] = b.Slot(i)[0]
	}
	return []engine.Tensor{{Name: "out", Shape: []int64{int64(b.N), 1}, Data: out}}, nil
}

func TestTuneBatchSizesMeasuresEngine(t *testing.T) {
	// Batch 2 costs as much per image as two runs and a half: it must
	// not be chosen; batch 4 is clearly faster per image than batch 1.
	e := &simEngine{cost: map[int]time.Duration{1: 4 * time.Millisecond, 2: 20 * time.Millisecond, 4: 8 * time.Millisecond}}
	d, err := batcher.TuneBatchSizes(context.Background(), "m", e, 1, 2, 3,
		batcher.MeasureOptions{MaxBatchSize: 4, MinRuns: 3, MinTime: time.Millisecond}, batcher.TuneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(d.Preferred, []int{1, 4}) || d.MaxBatchSize != 4 || d.Model != "m" || d.Backend != "sim" {
		t.Fatalf("decision %+v, want preferred [1 4] on sim", d)
	}
	for _, m := range d.Measurements {
		if m.Runs < 3 || m.Median < e.cost[m.Size] {
			t.Errorf("size %d: %d runs, median %v (cost %v)", m.Size, m.Runs, m.Median, e.cost[m.Size])
		}
	}
	// One warm-up and three timed rounds per size.
	if got := e.runs.Load(); got != 12 {
		t.Errorf("%d engine runs, want 12", got)
	}
}

func TestMeasureBatchSizesErrors(t *testing.T) {
	ctx := context.Background()
	boom := errors.New("boom")
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
		e    engine.Engine
		opts batcher.MeasureOptions
		want error
		text string
	}{
		{"nil engine", ctx, nil, batcher.MeasureOptions{MaxBatchSize: 1}, nil, "nil engine"},
		{"no max", ctx, &simEngine{}, batcher.MeasureOptions{}, nil, "max batch size 0"},
		{"size above max", ctx, &simEngine{}, batcher.MeasureOptions{MaxBatchSize: 2, Sizes: []int{4}}, nil, "outside 1..2"},
		{"engine fails", ctx, &simEngine{fail: boom}, batcher.MeasureOptions{MaxBatchSize: 2}, boom, "batch size 1"},
		{"wrong rows", ctx, wrongRows, batcher.MeasureOptions{MaxBatchSize: 2}, nil, "for 1 images"},
		{"canceled", canceled, &simEngine{}, batcher.MeasureOptions{MaxBatchSize: 2}, context.Canceled, "measuring batch sizes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := batcher.MeasureBatchSizes(tt.ctx, tt.e, 1, 2, 3, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.text) || (tt.want != nil && !errors.Is(err, tt.want)) {
				t.Fatalf("err %v, want %v mentioning %q", err, tt.want, tt.text)
			}
		})
	}
}

// wrongRows returns a batch dimension that does not match the batch.
var wrongRows = &enginefake.Engine{RunFunc: func(_ context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	return []engine.Tensor{{Name: "out", Shape: []int64{int64(b.N + 1)}, Data: make([]float32, b.N+1)}}, nil
}}

// simulateController runs the controller against a model of a batcher
// under steady overload-free load: each window's batches take
// runTime(size), wait the queue delay, and images queue whenever load
// exceeds what batch 1 serves.
func simulateController(t *testing.T, c *batcher.LatencyController, runTime func(n int) time.Duration, backlog bool, windows int) []batcher.ControlState {
	t.Helper()
	var states []batcher.ControlState
	s := c.State()
	for range windows {
		for range c.Config().Window {
			run := runTime(s.MaxBatchSize)
			c.Observe(s.MaxQueueDelay+run, run, backlog)
		}
		s, _ = c.Step()
		states = append(states, s)
	}
	return states
}

func TestLatencyControllerGrowsWithinBudget(t *testing.T) {
	// A CPU-like model: 5ms fixed plus 2ms per image.
	runTime := func(n int) time.Duration { return 5*time.Millisecond + 2*time.Millisecond*time.Duration(n) }
	c, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 40 * time.Millisecond, Capacity: 16})
	if err != nil {
		t.Fatal(err)
	}
	if s := c.State(); s.Action != batcher.ActionStart {
		t.Errorf("start state %+v, want action %q", s, batcher.ActionStart)
	}
	states := simulateController(t, c, runTime, true, 30)
	if s := states[0]; s.Action != batcher.ActionBiggerBatch {
		t.Errorf("first window with a backlog and room: %+v, want action %q", s, batcher.ActionBiggerBatch)
	}
	last := states[len(states)-1]
	if last.MaxBatchSize < 4 {
		t.Errorf("settled at batch %d, want at least 4 with this budget: %+v", last.MaxBatchSize, last)
	}
	for i, s := range states[len(states)/2:] {
		if lat := s.MaxQueueDelay + runTime(s.MaxBatchSize); lat > 40*time.Millisecond {
			t.Errorf("window %d: policy %d/%v gives %v, over the budget", i, s.MaxBatchSize, s.MaxQueueDelay, lat)
		}
		if s.MaxQueueDelay > c.Config().MaxDelay {
			t.Errorf("delay %v above bound %v", s.MaxQueueDelay, c.Config().MaxDelay)
		}
		if !slices.Contains(c.Config().Sizes, s.MaxBatchSize) {
			t.Errorf("batch %d not on the ladder %v", s.MaxBatchSize, c.Config().Sizes)
		}
	}
}

func TestLatencyControllerStaysSmallWithoutBacklog(t *testing.T) {
	runTime := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	c, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 50 * time.Millisecond, Capacity: 8})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range simulateController(t, c, runTime, false, 10) {
		if s.MaxBatchSize != 1 || s.MaxQueueDelay != 0 {
			t.Fatalf("grew to %d/%v without anything queued: %+v", s.MaxBatchSize, s.MaxQueueDelay, s)
		}
	}
}

func TestLatencyControllerBacksOff(t *testing.T) {
	// The model slows down (a noisy neighbour): the run alone breaks the
	// budget at the sizes it had grown to, so the batch must shrink.
	slow := false
	runTime := func(n int) time.Duration {
		d := 2 * time.Millisecond * time.Duration(n)
		if slow {
			d *= 4
		}
		return d
	}
	c, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 40 * time.Millisecond, Capacity: 16, Sizes: []int{1, 2, 4, 8, 16}})
	if err != nil {
		t.Fatal(err)
	}
	grown := simulateController(t, c, runTime, true, 20)
	before := grown[len(grown)-1]
	if before.MaxBatchSize < 8 {
		t.Fatalf("did not grow: %+v", before)
	}
	slow = true
	after := simulateController(t, c, runTime, true, 1)[0]
	if after.MaxBatchSize > before.MaxBatchSize/2 || !strings.Contains(after.Reason, "smaller batch") || after.Action != batcher.ActionSmallerBatch {
		t.Fatalf("after overrun: %+v, want at most half of %d", after, before.MaxBatchSize)
	}
	settled := simulateController(t, c, runTime, true, 10)
	if s := settled[len(settled)-1]; s.MaxQueueDelay+runTime(s.MaxBatchSize) > 40*time.Millisecond {
		t.Fatalf("did not settle within budget: %+v", s)
	}
}

func TestLatencyControllerQueueingKeepsThroughput(t *testing.T) {
	// Overload: the queue wait alone breaks the budget while the run
	// fits. Shrinking the batch would serve less and queue longer: the
	// controller must not shrink it, and must drop the delay.
	c, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 20 * time.Millisecond, Capacity: 8, Sizes: []int{1, 2, 4, 8}, Window: 4})
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		c.Observe(10*time.Millisecond, 2*time.Millisecond, true)
	}
	c.Step()
	for range 4 {
		c.Observe(100*time.Millisecond, 3*time.Millisecond, true)
	}
	s, _ := c.Step()
	if s.MaxBatchSize < 2 || s.MaxQueueDelay != 0 || !strings.Contains(s.Reason, "queueing") ||
		(s.Action != batcher.ActionShorterDelay && s.Action != batcher.ActionDrainQueue) {
		t.Fatalf("state %+v, want batch kept or grown and no delay", s)
	}
}

func TestNewLatencyControllerValidates(t *testing.T) {
	for _, cfg := range []batcher.LatencyTarget{
		{P99: 0, Capacity: 4},
		{P99: time.Second, Capacity: 0},
		{P99: time.Second, Capacity: 4, Sizes: []int{1, 8}},
		{P99: time.Second, Capacity: 4, Sizes: []int{0, 2}},
		{P99: time.Second, Capacity: 4, Headroom: 1},
		{P99: time.Second, Capacity: 4, MaxDelay: -1},
	} {
		if _, err := batcher.NewLatencyController(cfg); err == nil {
			t.Errorf("NewLatencyController(%+v) accepted", cfg)
		}
	}
}

func TestBatcherSetPolicy(t *testing.T) {
	e := &simEngine{base: time.Millisecond}
	b, err := batcher.New(batcher.Config{Model: "m", MaxBatchSize: 8, MaxQueueDelay: time.Hour, C: 1, H: 1, W: 1, Engines: []engine.Engine{e}})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())
	for _, bad := range []batcher.BatchPolicy{{MaxBatchSize: 0}, {MaxBatchSize: 9}, {MaxBatchSize: 2, MaxQueueDelay: -1}, {MaxBatchSize: 2, PreferredBatchSizes: []int{0}}} {
		if err := b.SetPolicy(bad); err == nil {
			t.Errorf("SetPolicy(%+v) accepted", bad)
		}
	}
	if err := b.SetPolicy(batcher.BatchPolicy{MaxBatchSize: 2, PreferredBatchSizes: []int{4, 1, 1}, MaxQueueDelay: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if p := b.Policy(); p.MaxBatchSize != 2 || !slices.Equal(p.PreferredBatchSizes, []int{1}) || p.MaxQueueDelay != time.Hour || b.Capacity() != 8 {
		t.Fatalf("policy %+v capacity %d", p, b.Capacity())
	}
	// Eight images at once with an hour of delay: only the new maximum
	// of 2 lets them go, in batches of two.
	items := make([]batcher.Item, 8)
	for i := range items {
		items[i] = &tuneItem{val: float32(i + 1)}
	}
	if err := b.Submit(context.Background(), "", items); err != nil {
		t.Fatal(err)
	}
	for i, it := range items {
		if r := it.(*tuneItem); r.size != 2 || r.index != i+1 {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
}

// tuneItem is an image whose value comes back as its index.
type tuneItem struct {
	val         float32
	index, size int // set by Postprocess
}

func (v *tuneItem) Fill(slot []float32) error {
	for i := range slot {
		slot[i] = v.val
	}
	return nil
}

func (v *tuneItem) Postprocess(outs []engine.Tensor, i int, run batcher.Run) error {
	v.index, v.size = int(outs[0].Data[i]), run.Size
	return nil
}

// TestLatencyLoopOnBatcher runs the controller against a real Batcher and
// a simulated engine under concurrent load: the loop must grow the batch
// while the budget allows, apply its policy to the batcher, and stop.
func TestLatencyLoopOnBatcher(t *testing.T) {
	e := &simEngine{base: 2 * time.Millisecond, perImage: 500 * time.Microsecond}
	ctrl, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 200 * time.Millisecond, Capacity: 8, Window: 4})
	if err != nil {
		t.Fatal(err)
	}
	var changes atomic.Int32
	loop := batcher.NewLatencyLoop(ctrl, batcher.NopBatchObserver{})
	b, err := batcher.New(batcher.Config{Model: "m", MaxBatchSize: 8, MaxQueueDelay: time.Millisecond, C: 1, H: 1, W: 1, Engines: []engine.Engine{e}, Observer: loop})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close(context.Background())
	if err := loop.Start(b, 5*time.Millisecond, func(batcher.ControlState) { changes.Add(1) }); err != nil {
		t.Fatal(err)
	}
	if err := loop.SetController(ctrl); err == nil {
		t.Error("SetController after Start accepted")
	}
	if err := loop.Start(b, 5*time.Millisecond, nil); err == nil {
		t.Error("second Start accepted")
	}
	defer loop.Stop()
	if p := b.Policy(); p.MaxBatchSize != 1 {
		t.Fatalf("start policy %+v, want batch 1", p)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for ctx.Err() == nil && ctrl.State().MaxBatchSize < 8 {
				if err := b.Submit(ctx, "", []batcher.Item{&tuneItem{val: float32(w)}}); err != nil && ctx.Err() == nil {
					t.Errorf("Submit: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if s := ctrl.State(); s.MaxBatchSize < 8 || changes.Load() == 0 {
		t.Fatalf("controller did not grow the batch under load: %+v, %d changes", s, changes.Load())
	}
	loop.Stop()
	loop.Stop()
	if p, s := b.Policy(), ctrl.State(); p.MaxBatchSize != s.MaxBatchSize || p.MaxQueueDelay != s.MaxQueueDelay {
		t.Fatalf("batcher policy %+v differs from the controller's %+v", p, s)
	}
}
