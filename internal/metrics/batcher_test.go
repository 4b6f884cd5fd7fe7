package metrics_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
)

// item is a batcher.Item that writes its slot and keeps its Run.
type item struct{ run batcher.Run }

func (*item) Fill(slot []float32) error {
	for i := range slot {
		slot[i] = 0.5
	}
	return nil
}
func (it *item) Postprocess(_ []engine.Tensor, _ int, run batcher.Run) error {
	it.run = run
	return nil
}

// TestBatcherFeedsMetrics runs real traffic through the dynamic batcher
// with a fake engine and checks that the batch and stage series moved.
func TestBatcherFeedsMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("resnet50", "fake", time.Second, time.Second)
	b, err := batcher.New(batcher.Config{
		Model: "resnet50", MaxBatchSize: 4, MaxQueueDelay: 5 * time.Millisecond,
		C: 3, H: 4, W: 4, Engines: []engine.Engine{&enginefake.Engine{Delay: 10 * time.Millisecond, Outputs: 2}},
		Observer: m.BatchObserver(),
	})
	if err != nil {
		t.Fatal(err)
	}
	m.TrackQueue("resnet50", metrics.QueueStatsOf(b.Stats))

	const requests = 10
	var wg sync.WaitGroup
	errs := make(chan error, requests)
	for range requests {
		wg.Go(func() {
			it := &item{}
			if err := b.Submit(context.Background(), "client", []batcher.Item{it}); err != nil {
				errs <- err
				return
			}
			r := it.run
			m.ObserveImage("resnet50", metrics.Timings{Queue: r.Queue, Preprocess: r.Fill, Inference: r.Inference})
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	f := scrape(t, reg)
	sizes := find(f, metrics.BatchSize, map[string]string{"model": "resnet50", "backend": "fake"}).GetHistogram()
	if sizes.GetSampleCount() == 0 || sizes.GetSampleSum() != requests {
		t.Errorf("batch sizes: %d batches of %v images in all, want >0 batches of %d", sizes.GetSampleCount(), sizes.GetSampleSum(), requests)
	}
	var released float64
	for _, s := range f[metrics.BatchesTotal].GetMetric() {
		released += s.GetCounter().GetValue()
		for _, l := range s.GetLabel() {
			if l.GetName() == "reason" && l.GetValue() == "unknown" {
				t.Error("a batch was done without being released")
			}
		}
	}
	if released != float64(sizes.GetSampleCount()) {
		t.Errorf("%v batches counted by reason, %d in the size histogram", released, sizes.GetSampleCount())
	}
	inf := find(f, metrics.StageDurationSeconds, map[string]string{"model": "resnet50", "stage": metrics.StageInference}).GetHistogram()
	if inf.GetSampleCount() != requests || inf.GetSampleSum() < requests*0.010 {
		t.Errorf("inference stage: %d observations, %v s; want %d of at least 10ms", inf.GetSampleCount(), inf.GetSampleSum(), requests)
	}
	if got := value(t, f, metrics.QueueDepth, map[string]string{"model": "resnet50"}); got != 0 {
		t.Errorf("queue depth after all requests finished = %v", got)
	}
}
