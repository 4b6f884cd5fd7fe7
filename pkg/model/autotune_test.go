package model

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// tunedModel serves a classifier whose batch sizes cost
// modeltest.SizedCosts with the given batching changes, warmed up through
// WarmUp as the server does.
func tunedModel(t *testing.T, batching func(*modelrepo.BatchingConfig)) (*Model, *PipelineRunner) {
	t.Helper()
	m := modeltest.Model("cls", modelrepo.TaskClassify, 10)
	batching(&m.Batching)
	e := &modeltest.Engine{Classes: 10, Cost: modeltest.SizedCosts}
	r, err := NewPipelineRunner(m, []engine.Engine{e}, RunnerOptions{MaxPixels: 1 << 24})
	if err != nil {
		t.Fatal(err)
	}
	model := New(m, r)
	reg := NewRegistry(RegistryOptions{})
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
	b := model.EffectiveBatching()
	if b.MaxBatchSize != 4 || !slices.Equal(b.PreferredBatchSizes, []int{1, 4}) {
		t.Errorf("ModelInfo batching %+v, want the tuned sizes", b)
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
	if b := model.EffectiveBatching(); !slices.Equal(b.PreferredBatchSizes, []int{1, 4}) || b.MaxBatchSize != 4 {
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
	res, err := r.Infer(ctxT(t), []Input{{Encoded: modeltest.JPEG(t, 32, 32, 200)}}, pipeline.Options{})
	if err != nil || len(res) != 1 || res[0].BatchSize != 1 {
		t.Fatalf("Infer: %v %+v", err, res)
	}
}
