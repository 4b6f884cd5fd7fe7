package server

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/metricstest"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// sizedEngine is a fakeEngine whose batch run time depends on the batch
// size, like a model on a CPU where batch 2 is slower per image.
type sizedEngine struct {
	*fakeEngine
	cost map[int]time.Duration
}

func (e *sizedEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	time.Sleep(e.cost[b.N])
	return e.fakeEngine.Run(ctx, b)
}

// tunedModel serves a classifier on a sizedEngine with the given batching
// changes, warmed up through WarmUp as the server does.
func tunedModel(t *testing.T, batching func(*modelrepo.BatchingConfig)) (*Model, *PipelineRunner) {
	t.Helper()
	return tunedModelObserved(t, batching, nil)
}

// tunedModelObserved is tunedModel with the self-tuner's decisions told
// to obs.
func tunedModelObserved(t *testing.T, batching func(*modelrepo.BatchingConfig), obs batcher.TuneObserver) (*Model, *PipelineRunner) {
	t.Helper()
	m := testModel("cls", modelrepo.TaskClassify, 10)
	batching(&m.Batching)
	e := &sizedEngine{fakeEngine: &fakeEngine{classes: 10}, cost: map[int]time.Duration{
		1: 2 * time.Millisecond, 2: 10 * time.Millisecond, 3: 12 * time.Millisecond, 4: 4 * time.Millisecond,
	}}
	r, err := NewPipelineRunner(m, []engine.Engine{e}, RunnerOptions{MaxPixels: 1 << 24, TuneObserver: obs})
	if err != nil {
		t.Fatal(err)
	}
	model := &Model{Model: m, Runner: r}
	reg := NewRegistry()
	if err := reg.Add(model); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := reg.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	if err := WarmUp(ctxT(t), reg, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatal(err)
	}
	if !model.Ready() {
		t.Fatal("model not ready after warm-up")
	}
	return model, r
}

func TestAutoTuneAtWarmUp(t *testing.T) {
	model, r := tunedModel(t, func(b *modelrepo.BatchingConfig) { b.AutoTune = true })
	tu := r.Tuning()
	if tu.Decision == nil {
		t.Fatal("no tuning decision after warm-up")
	}
	// Batch 2 is 2.5 times slower per image than batch 1; batch 4 is
	// twice as fast.
	if !slices.Equal(tu.Decision.Preferred, []int{1, 4}) || tu.Policy.MaxBatchSize != 4 || tu.Latency != nil {
		t.Fatalf("tuning %+v (%s), want preferred [1 4]", tu, tu.Decision)
	}
	b := effectiveBatching(model)
	if b.MaxBatchSize != 4 || !slices.Equal(b.PreferredBatchSizes, []int{1, 4}) {
		t.Errorf("ModelInfo batching %+v, want the tuned sizes", b)
	}
	info := modelInfo(model)
	if got := info.GetBatching().GetPreferredBatchSizes(); !slices.Equal(got, []int32{1, 4}) {
		t.Errorf("ModelInfo preferred sizes %v, want [1 4]", got)
	}
	if err := r.AutoTune(context.Background(), nil); err == nil {
		t.Error("second AutoTune accepted")
	}
}

func TestAutoTuneOffLeavesConfig(t *testing.T) {
	model, r := tunedModel(t, func(b *modelrepo.BatchingConfig) { b.PreferredBatchSizes = []int{1, 4} })
	if tu := r.Tuning(); tu.Decision != nil || tu.Latency != nil {
		t.Fatalf("tuned without being asked: %+v", tu)
	}
	if b := effectiveBatching(model); !slices.Equal(b.PreferredBatchSizes, []int{1, 4}) || b.MaxBatchSize != 4 {
		t.Errorf("ModelInfo batching %+v, want the config's", b)
	}
}

func TestLatencyTargetStartsController(t *testing.T) {
	_, r := tunedModel(t, func(b *modelrepo.BatchingConfig) { b.LatencyTargetP99 = 100 * time.Millisecond })
	tu := r.Tuning()
	if tu.Decision == nil || tu.Latency == nil {
		t.Fatalf("tuning %+v, want a decision and a controller", tu)
	}
	// The controller starts at the smallest chosen size, no delay.
	if tu.Latency.Target != 100*time.Millisecond || tu.Policy.MaxBatchSize != 1 || tu.Policy.MaxQueueDelay != 0 {
		t.Fatalf("start state %+v policy %+v", tu.Latency, tu.Policy)
	}
	res, err := r.Infer(ctxT(t), []Input{{Encoded: jpegBytes(t, 32, 32, 200)}}, pipeline.Options{})
	if err != nil || len(res) != 1 || res[0].BatchSize != 1 {
		t.Fatalf("Infer: %v %+v", err, res)
	}
}

// gauge returns the value of the one gauge or counter of family name
// whose labels include want, failing the test when there is none or more.
func gauge(t *testing.T, reg prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var found []*dto.Metric
	for _, f := range families {
		if f.GetName() == name {
			found = append(found, metricstest.Matching(f, want)...)
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d series, want 1", name, want, len(found))
	}
	if c := found[0].GetCounter(); c != nil {
		return c.GetValue()
	}
	return found[0].GetGauge().GetValue()
}

// TestAutoTuneExportsMetrics: what the warm-up measurement chose, and
// why, is on the metrics registry once the model is warm.
func TestAutoTuneExportsMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	_, r := tunedModelObserved(t, func(b *modelrepo.BatchingConfig) { b.AutoTune = true }, m.TuneObserver())
	d := r.Tuning().Decision
	// Batch 2 is 2.5 times slower per image than batch 1; batch 4 is
	// twice as fast (sizedEngine's costs).
	for _, c := range []struct {
		size   string
		reason string
		chosen float64
	}{
		{"1", batcher.VerdictSmallest, 1},
		{"2", batcher.VerdictSlower, 0},
		{"4", batcher.VerdictFaster, 1},
	} {
		if got := gauge(t, reg, metrics.AutotunePreferredBatchSize, map[string]string{"model": "cls", "batch_size": c.size, "reason": c.reason}); got != c.chosen {
			t.Errorf("batch %s: preferred %v, want %v (%s)", c.size, got, c.chosen, d)
		}
	}
	ips4 := gauge(t, reg, metrics.AutotuneBatchImagesPerSecond, map[string]string{"model": "cls", "batch_size": "4"})
	ips2 := gauge(t, reg, metrics.AutotuneBatchImagesPerSecond, map[string]string{"model": "cls", "batch_size": "2"})
	if ips4 <= 2*ips2 {
		t.Errorf("measured %v images/s at batch 4, %v at batch 2; batch 4 costs 5 times less per image", ips4, ips2)
	}
	if got := gauge(t, reg, metrics.AutotuneMaxBatchSize, map[string]string{"model": "cls"}); got != 4 {
		t.Errorf("max batch size %v, want 4", got)
	}
	if got := gauge(t, reg, metrics.AutotunePolicyChanges, map[string]string{"model": "cls", "action": metrics.ActionWarmup}); got != 1 {
		t.Errorf("%v warm-up policies, want 1", got)
	}
}

// TestLatencyControllerChangeExported drives a model with a latency
// target under concurrent load until its controller grows the batch, and
// checks that the metrics follow the batcher's policy.
func TestLatencyControllerChangeExported(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	_, r := tunedModelObserved(t, func(b *modelrepo.BatchingConfig) { b.LatencyTargetP99 = 200 * time.Millisecond }, m.TuneObserver())
	labels := map[string]string{"model": "cls"}
	if got := gauge(t, reg, metrics.AutotuneMaxBatchSize, labels); got != 1 {
		t.Fatalf("start max batch size %v, want 1", got)
	}
	if got := gauge(t, reg, metrics.AutotuneLatencyTargetSeconds, labels); got != 0.2 {
		t.Errorf("latency target %vs, want 0.2", got)
	}
	img := jpegBytes(t, 32, 32, 100)
	ctx, cancel := context.WithTimeout(ctxT(t), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for ctx.Err() == nil && r.Tuning().Policy.MaxBatchSize < 4 {
				if _, err := r.Infer(ctx, []Input{{Encoded: img}}, pipeline.Options{}); err != nil && ctx.Err() == nil {
					t.Errorf("Infer: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	// A window the load completed may still be decided on the next tick.
	time.Sleep(3 * latencyInterval)
	tu := r.Tuning()
	if tu.Policy.MaxBatchSize < 4 {
		t.Fatalf("controller did not grow the batch under load: %+v", tu.Latency)
	}
	if got := gauge(t, reg, metrics.AutotuneMaxBatchSize, labels); got != float64(tu.Policy.MaxBatchSize) {
		t.Errorf("exported max batch size %v, batcher's %d", got, tu.Policy.MaxBatchSize)
	}
	if got := gauge(t, reg, metrics.AutotuneMaxQueueDelaySeconds, labels); got != tu.Policy.MaxQueueDelay.Seconds() {
		t.Errorf("exported max queue delay %vs, batcher's %v", got, tu.Policy.MaxQueueDelay)
	}
	if got := gauge(t, reg, metrics.AutotunePolicyChanges, map[string]string{"model": "cls", "action": batcher.ActionBiggerBatch}); got < 1 {
		t.Errorf("%v bigger-batch changes counted", got)
	}
}
