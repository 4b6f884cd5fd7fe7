package metrics_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
)

// TestTuneDecisionSeries measures an engine on which batch 4 is clearly
// the fastest per image and batch 2 clearly the slowest, and checks what
// the scrape says the tuner measured, chose and why.
func TestTuneDecisionSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	cost := &enginefake.Engine{Cost: map[int]time.Duration{1: 4 * time.Millisecond, 2: 20 * time.Millisecond, 4: 6 * time.Millisecond}}
	d, err := batcher.TuneBatchSizes(context.Background(), "resnet50", cost, 1, 2, 2,
		batcher.MeasureOptions{MaxBatchSize: 4, MinRuns: 3, MinTime: time.Millisecond}, batcher.TuneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m.TuneObserver().BatchSizesTuned(d)

	f := scrape(t, reg)
	want := map[int]struct {
		chosen float64
		reason string
	}{
		1: {1, batcher.VerdictSmallest},
		2: {0, batcher.VerdictSlower},
		4: {1, batcher.VerdictFaster},
	}
	for size, w := range want {
		labels := map[string]string{"model": "resnet50", "backend": "fake", "batch_size": strconv.Itoa(size)}
		// Timers only ever sleep longer: at most size/cost, and on a
		// busy machine no less than a third of it.
		ips := value(t, f, metrics.AutotuneBatchImagesPerSecond, labels)
		if most := float64(size) / cost.Cost[size].Seconds(); ips > most*1.01 || ips < most/3 {
			t.Errorf("batch %d: %.1f images/s, want about %.1f", size, ips, most)
		}
		labels["reason"] = w.reason
		if got := value(t, f, metrics.AutotunePreferredBatchSize, labels); got != w.chosen {
			t.Errorf("batch %d: preferred %v, want %v (decision %s)", size, got, w.chosen, d)
		}
	}
	if n := len(f[metrics.AutotunePreferredBatchSize].GetMetric()); n != len(want) {
		t.Errorf("%d preferred series, want one per measured size", n)
	}
	if got := value(t, f, metrics.AutotuneDurationSeconds, map[string]string{"model": "resnet50", "backend": "fake"}); got < 0.120 {
		// A warm-up and 3 timed rounds, of 30ms each at least.
		t.Errorf("tuning took %vs, want at least 0.12", got)
	}

	// A later decision for the model replaces every per-size series.
	d2, err := batcher.ChooseBatchSizes([]batcher.BatchMeasurement{{Size: 1, ImagesPerSec: 50}, {Size: 8, ImagesPerSec: 30}}, batcher.TuneOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d2.Model, d2.Backend = "resnet50", "opencv"
	m.TuneObserver().BatchSizesTuned(d2)
	f = scrape(t, reg)
	if n := len(f[metrics.AutotuneBatchImagesPerSecond].GetMetric()); n != 2 {
		t.Errorf("%d images/s series after a new decision, want 2", n)
	}
	if got := value(t, f, metrics.AutotunePreferredBatchSize, map[string]string{"backend": "opencv", "batch_size": "8", "reason": batcher.VerdictSlower}); got != 0 {
		t.Errorf("batch 8, 40%% slower: preferred %v", got)
	}
	if find(f, metrics.AutotuneDurationSeconds, map[string]string{"backend": "fake"}) != nil {
		t.Error("the old backend's tuning time is still exported")
	}
}

// TestBatchPolicySeries checks the policy series, from the warm-up choice
// and from the latency controller, and that unloading a model removes
// every self-tuning series of it but not another model's.
func TestBatchPolicySeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	obs := m.TuneObserver()
	obs.PolicySet("mobilenet", batcher.BatchPolicy{MaxBatchSize: 8, PreferredBatchSizes: []int{1}, MaxQueueDelay: 2 * time.Millisecond}, nil)
	ctrl, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: 50 * time.Millisecond, Capacity: 8, Window: 4})
	if err != nil {
		t.Fatal(err)
	}
	s := ctrl.State()
	obs.PolicySet("yolo", ctrl.Policy(s), &s)
	// A backlog with a fast batch run: the controller grows the batch.
	for range 4 {
		ctrl.Observe(2*time.Millisecond, time.Millisecond, true)
	}
	s, changed := ctrl.Step()
	if !changed || s.Action != batcher.ActionBiggerBatch {
		t.Fatalf("controller state %+v changed=%v, want a bigger batch", s, changed)
	}
	obs.PolicySet("yolo", ctrl.Policy(s), &s)

	f := scrape(t, reg)
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{metrics.AutotuneMaxBatchSize, map[string]string{"model": "mobilenet"}, 8},
		{metrics.AutotuneMaxQueueDelaySeconds, map[string]string{"model": "mobilenet"}, 0.002},
		{metrics.AutotunePolicyChanges, map[string]string{"model": "mobilenet", "action": metrics.ActionWarmup}, 1},
		{metrics.AutotuneMaxBatchSize, map[string]string{"model": "yolo"}, float64(s.MaxBatchSize)},
		{metrics.AutotuneMaxQueueDelaySeconds, map[string]string{"model": "yolo"}, s.MaxQueueDelay.Seconds()},
		{metrics.AutotuneLatencyTargetSeconds, map[string]string{"model": "yolo"}, 0.05},
		{metrics.AutotunePolicyChanges, map[string]string{"model": "yolo", "action": batcher.ActionStart}, 1},
		{metrics.AutotunePolicyChanges, map[string]string{"model": "yolo", "action": batcher.ActionBiggerBatch}, 1},
	} {
		if got := value(t, f, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if s.MaxBatchSize <= 1 {
		t.Errorf("controller max batch %d after growing", s.MaxBatchSize)
	}
	if find(f, metrics.AutotuneLatencyTargetSeconds, map[string]string{"model": "mobilenet"}) != nil {
		t.Error("latency target exported for a model without one")
	}

	m.ModelUnloaded("yolo")
	f = scrape(t, reg)
	for _, name := range []string{metrics.AutotuneMaxBatchSize, metrics.AutotuneMaxQueueDelaySeconds, metrics.AutotuneLatencyTargetSeconds, metrics.AutotunePolicyChanges} {
		if find(f, name, map[string]string{"model": "yolo"}) != nil {
			t.Errorf("%s of an unloaded model still exported", name)
		}
	}
	if find(f, metrics.AutotuneMaxBatchSize, map[string]string{"model": "mobilenet"}) == nil {
		t.Error("unloading one model removed another's series")
	}
}

func TestNilMetricsTuneObserver(t *testing.T) {
	var m *metrics.Metrics
	obs := m.TuneObserver()
	obs.BatchSizesTuned(batcher.TuneDecision{Model: "x", Measurements: []batcher.BatchMeasurement{{Size: 1}}})
	obs.PolicySet("x", batcher.BatchPolicy{MaxBatchSize: 1}, &batcher.ControlState{})
}
