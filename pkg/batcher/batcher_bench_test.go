package batcher_test

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
)

// benchEngine echoes the first float of every slot, allocating nothing, so
// that a benchmark measures the batcher and not the engine.
type benchEngine struct {
	out   []float32
	shape [2]int64
	outs  [1]engine.Tensor
}

func (e *benchEngine) Run(_ context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if len(e.out) < b.N {
		e.out = make([]float32, b.Cap)
	}
	for i := range b.N {
		e.out[i] = b.Slot(i)[0]
	}
	e.shape = [2]int64{int64(b.N), 1}
	e.outs[0] = engine.Tensor{Name: "echo", Shape: e.shape[:], Data: e.out[:b.N]}
	return e.outs[:], nil
}
func (e *benchEngine) Backend() string { return "bench" }
func (e *benchEngine) Close() error    { return nil }

// benchItem writes its value and checks it comes back, allocating
// nothing.
type benchItem struct{ val float32 }

func (it *benchItem) Fill(slot []float32) error {
	slot[0] = it.val
	return nil
}

func (it *benchItem) Postprocess(outs []engine.Tensor, i int, _ batcher.Run) error {
	if got := outs[0].Data[i]; got != it.val {
		return fmt.Errorf("row %d holds %v, want %v", i, got, it.val)
	}
	return nil
}

// BenchmarkBatcher measures the batcher's own cost per image: concurrent
// callers, each submitting one image at a time on its own key, against
// engines that cost nothing. ns/op and allocs/op are per image.
func BenchmarkBatcher(b *testing.B) {
	for _, bc := range []struct {
		engines, maxBatch, callers int
	}{
		{1, 8, 1}, // one caller: the round trip through a worker
		{1, 8, 16},
		{2, 32, 64},
	} {
		b.Run(fmt.Sprintf("engines=%d/batch=%d/callers=%d", bc.engines, bc.maxBatch, bc.callers), func(b *testing.B) {
			var engines []engine.Engine
			for range bc.engines {
				engines = append(engines, &benchEngine{})
			}
			bt, err := batcher.New(batcher.Config{
				Model: "bench", MaxBatchSize: bc.maxBatch, QueueSize: 4 * bc.callers,
				C: 1, H: 1, W: 4, Engines: engines,
			})
			if err != nil {
				b.Fatal(err)
			}
			defer bt.Close(context.Background())
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			var failed atomic.Value
			var wg sync.WaitGroup
			b.ReportAllocs()
			b.ResetTimer()
			start := time.Now()
			for c := range min(bc.callers, b.N) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					key := fmt.Sprint("caller-", c)
					it := &benchItem{}
					items := []batcher.Item{it}
					ctx := context.Background()
					for {
						n := next.Add(1) - 1
						if n >= int64(b.N) {
							return
						}
						it.val = float32(n%1_000_000 + 1)
						t := time.Now()
						err := bt.Submit(ctx, key, items)
						lat[n] = time.Since(t)
						if err != nil {
							failed.Store(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			if err, _ := failed.Load().(error); err != nil {
				b.Fatal(err)
			}
			slices.Sort(lat)
			b.ReportMetric(float64(elapsed.Nanoseconds())/float64(b.N), "ns/image")
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "images/s")
			b.ReportMetric(float64(lat[len(lat)/2])/1e6, "p50_ms")
			b.ReportMetric(float64(lat[min(len(lat)-1, len(lat)*99/100)])/1e6, "p99_ms")
		})
	}
}

// In steady state the batcher allocates per request only the request's own
// bookkeeping and results: nothing per image and nothing per batch (the
// batch buffer is the worker's, reused).
func TestBatcherSteadyStateAllocations(t *testing.T) {
	bt, err := batcher.New(batcher.Config{
		Model: "bench", MaxBatchSize: 4, C: 1, H: 1, W: 4, Engines: []engine.Engine{&benchEngine{}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer bt.Close(context.Background())
	submit := func(n int) float64 {
		items := make([]batcher.Item, n)
		for i := range items {
			items[i] = &benchItem{val: float32(i + 1)}
		}
		return testing.AllocsPerRun(200, func() {
			if err := bt.Submit(context.Background(), "k", items); err != nil {
				t.Fatal(err)
			}
		})
	}
	one, many := submit(1), submit(10) // 10 images: three batches
	t.Logf("allocations per request: %v for 1 image, %v for 10", one, many)
	if many > one {
		t.Errorf("a 10-image request allocates %v times, a 1-image one %v: something allocates per image or per batch", many, one)
	}
	if one > 4 {
		t.Errorf("a 1-image request allocates %v times, want at most 4", one)
	}
}
