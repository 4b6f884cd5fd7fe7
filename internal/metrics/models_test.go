package metrics_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	vmodel "github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// tuned serves a classifier whose batch 2 is 2.5 times slower per image
// than batch 1 and batch 4 twice as fast, warmed up (and so self-tuned)
// as the server does, with the tuner's decisions told to obs.
func tuned(t *testing.T, batching func(*modelrepo.BatchingConfig), obs batcher.TuneObserver) *vmodel.PipelineRunner {
	t.Helper()
	m := modeltest.Model("cls", modelrepo.TaskClassify, 10)
	batching(&m.Batching)
	e := &modeltest.Engine{Classes: 10, Cost: modeltest.SizedCosts}
	r, err := vmodel.NewPipelineRunner(m, []engine.Engine{e}, vmodel.RunnerOptions{MaxPixels: 1 << 24, TuneObserver: obs})
	if err != nil {
		t.Fatal(err)
	}
	reg := vmodel.NewRegistry(vmodel.RegistryOptions{})
	if err := reg.Add(vmodel.New(m, r)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := reg.Close(context.Background()); err != nil {
			t.Error(err)
		}
	})
	if err := vmodel.WarmUp(ctxT(t), reg, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatal(err)
	}
	return r
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestModelStateSeries: every known model has one state series at 1,
// the serving series only while it is ready, and nothing once removed.
func TestModelStateSeries(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	models := vmodel.NewRegistry(vmodel.RegistryOptions{Observer: m.ModelObserver()})
	defer models.Close(context.Background())
	for name, e := range map[string]*modeltest.Engine{"good": {Classes: 10}, "bad": {Classes: 10, Fail: errors.New("kernel exploded")}} {
		md := modeltest.Model(name, modelrepo.TaskClassify, 10)
		r, err := vmodel.NewPipelineRunner(md, []engine.Engine{e}, vmodel.RunnerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := models.Add(vmodel.New(md, r)); err != nil {
			t.Fatal(err)
		}
	}
	f := scrape(t, reg)
	if value(t, f, metrics.ModelState, map[string]string{"model": "good", "state": "LOADING"}) != 1 ||
		value(t, f, metrics.ModelState, map[string]string{"model": "good", "state": "READY"}) != 0 {
		t.Error("a loading model is not LOADING")
	}
	if err := vmodel.WarmUp(ctxT(t), models, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatal(err)
	}
	f = scrape(t, reg)
	for _, c := range []struct{ model, state string }{{"good", "READY"}, {"bad", "UNAVAILABLE"}} {
		for _, st := range vmodel.States {
			want := 0.0
			if st.String() == c.state {
				want = 1
			}
			if got := value(t, f, metrics.ModelState, map[string]string{"model": c.model, "state": st.String()}); got != want {
				t.Errorf("%s %s = %v, want %v", c.model, st, got, want)
			}
		}
	}
	if find(f, metrics.ModelBackendInfo, map[string]string{"model": "good"}) == nil || find(f, metrics.ModelBackendInfo, map[string]string{"model": "bad"}) != nil {
		t.Error("backend info should exist for the ready model only")
	}
	if find(f, metrics.QueueDepth, map[string]string{"model": "good"}) == nil {
		t.Error("no queue depth for the ready model")
	}
	if err := models.Remove(context.Background(), "good"); err != nil {
		t.Fatal(err)
	}
	f = scrape(t, reg)
	if find(f, metrics.ModelState, map[string]string{"model": "good"}) != nil || find(f, metrics.QueueDepth, map[string]string{"model": "good"}) != nil {
		t.Error("a removed model keeps series")
	}
}

// TestAutoTuneExportsMetrics: what the warm-up measurement chose, and
// why, is on the metrics registry once the model is warm.
func TestAutoTuneExportsMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	r := tuned(t, func(b *modelrepo.BatchingConfig) { b.AutoTune = true }, m.TuneObserver())
	d := r.Tuning().Decision
	// Batch 2 is 2.5 times slower per image than batch 1; batch 4 is
	// twice as fast (modeltest.SizedCosts).
	for _, c := range []struct {
		size   string
		reason string
		chosen float64
	}{
		{"1", batcher.VerdictSmallest, 1},
		{"2", batcher.VerdictSlower, 0},
		{"4", batcher.VerdictFaster, 1},
	} {
		if got := value(t, scrape(t, reg), metrics.AutotunePreferredBatchSize, map[string]string{"model": "cls", "batch_size": c.size, "reason": c.reason}); got != c.chosen {
			t.Errorf("batch %s: preferred %v, want %v (%s)", c.size, got, c.chosen, d)
		}
	}
	ips4 := value(t, scrape(t, reg), metrics.AutotuneBatchImagesPerSecond, map[string]string{"model": "cls", "batch_size": "4"})
	ips2 := value(t, scrape(t, reg), metrics.AutotuneBatchImagesPerSecond, map[string]string{"model": "cls", "batch_size": "2"})
	if ips4 <= 2*ips2 {
		t.Errorf("measured %v images/s at batch 4, %v at batch 2; batch 4 costs 5 times less per image", ips4, ips2)
	}
	if got := value(t, scrape(t, reg), metrics.AutotuneMaxBatchSize, map[string]string{"model": "cls"}); got != 4 {
		t.Errorf("max batch size %v, want 4", got)
	}
	if got := value(t, scrape(t, reg), metrics.AutotunePolicyChanges, map[string]string{"model": "cls", "action": metrics.ActionWarmup}); got != 1 {
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
	r := tuned(t, func(b *modelrepo.BatchingConfig) { b.LatencyTargetP99 = 200 * time.Millisecond }, m.TuneObserver())
	labels := map[string]string{"model": "cls"}
	if got := value(t, scrape(t, reg), metrics.AutotuneMaxBatchSize, labels); got != 1 {
		t.Fatalf("start max batch size %v, want 1", got)
	}
	if got := value(t, scrape(t, reg), metrics.AutotuneLatencyTargetSeconds, labels); got != 0.2 {
		t.Errorf("latency target %vs, want 0.2", got)
	}
	img := modeltest.JPEG(t, 32, 32, 100)
	ctx, cancel := context.WithTimeout(ctxT(t), 10*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for ctx.Err() == nil && r.Tuning().Policy.MaxBatchSize < 4 {
				if _, err := r.Infer(ctx, []vmodel.Input{{Encoded: img}}, pipeline.Options{}); err != nil && ctx.Err() == nil {
					t.Errorf("Infer: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	// A window the load completed may still be decided on the next tick.
	time.Sleep(750 * time.Millisecond) // three controller ticks
	tu := r.Tuning()
	if tu.Policy.MaxBatchSize < 4 {
		t.Fatalf("controller did not grow the batch under load: %+v", tu.Latency)
	}
	if got := value(t, scrape(t, reg), metrics.AutotuneMaxBatchSize, labels); got != float64(tu.Policy.MaxBatchSize) {
		t.Errorf("exported max batch size %v, batcher's %d", got, tu.Policy.MaxBatchSize)
	}
	if got := value(t, scrape(t, reg), metrics.AutotuneMaxQueueDelaySeconds, labels); got != tu.Policy.MaxQueueDelay.Seconds() {
		t.Errorf("exported max queue delay %vs, batcher's %v", got, tu.Policy.MaxQueueDelay)
	}
	if got := value(t, scrape(t, reg), metrics.AutotunePolicyChanges, map[string]string{"model": "cls", "action": batcher.ActionBiggerBatch}); got < 1 {
		t.Errorf("%v bigger-batch changes counted", got)
	}
}
