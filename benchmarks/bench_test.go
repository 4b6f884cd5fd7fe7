package benchmarks

import (
	"context"
	"flag"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
	"github.com/visionserve/visionserve/pkg/pipeline/pipelinetest"
)

// forEach runs fn as a sub-benchmark per model and backend.
func forEach(b *testing.B, fn func(b *testing.B, model, backendName string)) {
	for _, model := range benchModels {
		b.Run(model, func(b *testing.B) {
			for _, be := range benchBackends {
				b.Run(be, func(b *testing.B) { fn(b, model, be) })
			}
		})
	}
}

// BenchmarkEngine is level 1: a preprocessed batch through the engine
// session, at batch 1 and the model's max_batch_size. One op is one batch;
// images/s counts its images, the latencies are per batch.
func BenchmarkEngine(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		e, m, err := sharedEngine(model, be)
		if err != nil {
			skipOrFail(b, err)
		}
		pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{})
		if err != nil {
			b.Fatal(err)
		}
		c, h, w := pre.InputShape()
		for _, n := range sizes(m) {
			b.Run(fmt.Sprintf("batch=%d", n), func(b *testing.B) {
				batch := engine.NewBatch(n, c, h, w)
				batch.N = n
				for i := range batch.Data {
					batch.Data[i] = float32(i%251) / 250
				}
				measure(b, 1, n, func(ctx context.Context) error {
					_, err := e.Run(ctx, batch)
					return err
				})
				reportGPUMemory(b, e)
			})
		}
	})
}

// sizes are the engine batch sizes measured: 1 and the maximum.
func sizes(m *modelrepo.Model) []int {
	if m.Batching.MaxBatchSize > 1 {
		return []int{1, m.Batching.MaxBatchSize}
	}
	return []int{1}
}

// BenchmarkPipeline is level 2, in process, encoded image in and results
// out: "runner" is the synchronous pipelinetest.Runner (decode, preprocess,
// engine, postprocess, one image per op); "conc=N" is the server's
// own runner (the dynamic batcher over the served engines) called by N
// goroutines without any network, the baseline BenchmarkServe is compared
// with.
func BenchmarkPipeline(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		b.Run("runner", func(b *testing.B) {
			e, m, err := sharedEngine(model, be)
			if err != nil {
				skipOrFail(b, err)
			}
			r, err := pipelinetest.New(m, e, pipeline.PreprocessOptions{})
			if err != nil {
				b.Fatal(err)
			}
			defer r.Close()
			img := [][]byte{testImage(m)}
			measure(b, 1, 1, func(ctx context.Context) error {
				res, err := r.Infer(ctx, img, pipeline.Options{})
				if err == nil && len(res) != 1 {
					err = fmt.Errorf("%d results for 1 image", len(res))
				}
				return err
			})
		})
		for _, conc := range concurrencies {
			b.Run(fmt.Sprintf("conc=%d", conc), func(b *testing.B) {
				s, err := sharedServer(model, be)
				if err != nil {
					skipOrFail(b, err)
				}
				img := testImage(s.model)
				measure(b, conc, 1, func(ctx context.Context) error { return s.infer(ctx, img) })
				reportServedGPUMemory(b, model)
			})
		}
	})
}

// BenchmarkServe is level 3, end to end over gRPC: the real server on a
// loopback TCP listener (127.0.0.1, not an in-memory pipe), one image per
// request, N client goroutines on one connection.
func BenchmarkServe(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		for _, conc := range concurrencies {
			b.Run(fmt.Sprintf("conc=%d", conc), func(b *testing.B) {
				s, err := sharedServer(model, be)
				if err != nil {
					skipOrFail(b, err)
				}
				img := testImage(s.model)
				measure(b, conc, 1, func(ctx context.Context) error { return s.call(ctx, img) })
				reportServedGPUMemory(b, model)
			})
		}
	})
}

// batchingConc is the load of BenchmarkBatching: enough concurrent
// requests to keep the largest batch full.
const batchingConc = 16

// BenchmarkBatching compares batcher configurations in process at
// saturation: "fixed=N" runs batches of at most N (no preferred sizes,
// the model's queue delay), "tuned" is batching.auto_tune (batch sizes
// measured at warm-up, see batcher.ChooseBatchSizes). The configurations
// take turns in windows of batchingConc×overheadWindow requests from
// batchingConc clients, the order rotating every round, so that a shared
// machine's drifting load hits all alike; one op is one round of
// BenchmarkBatching/<model>/<backend>/configs. It reports
// each configuration's images/s over its own windows, tuned/best-fixed
// (goal ≥ 0.95), tuned/fixed=1 and the maximum batch the tuner chose.
func BenchmarkBatching(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		b.Run("configs", func(b *testing.B) { benchBatching(b, model, be) })
	})
}

func benchBatching(b *testing.B, name, be string) {
	e, m, err := sharedEngine(name, be)
	if err != nil {
		skipOrFail(b, err)
	}
	type config struct {
		name string
		r    *model.PipelineRunner
		busy time.Duration
	}
	var configs []*config
	defer func() {
		for _, c := range configs {
			_ = c.r.Close(context.Background())
		}
	}()
	sizes := batcher.CandidateSizes(m.Batching.MaxBatchSize)
	for i := -1; i < len(sizes); i++ {
		mc := *m
		mc.Batching.PreferredBatchSizes = nil
		mc.Batching.QueueSize = max(mc.Batching.QueueSize, 4*batchingConc)
		// The shipped configs turn auto_tune on: only "tuned" may tune.
		mc.Batching.AutoTune = i < 0
		name := "tuned"
		if i >= 0 {
			mc.Batching.MaxBatchSize = sizes[i]
			name = fmt.Sprintf("fixed=%d", sizes[i])
		}
		r, err := model.NewPipelineRunner(&mc, []engine.Engine{noClose{e}}, model.RunnerOptions{MaxPixels: 40_000_000})
		if err != nil {
			b.Fatal(err)
		}
		configs = append(configs, &config{name: name, r: r})
		// The engine is idle here: the other runners' batchers have
		// nothing queued.
		if err := r.AutoTune(context.Background(), nil); err != nil {
			b.Fatal(err)
		}
	}
	img := testImage(m)
	infer := func(r *model.PipelineRunner) func(context.Context) error {
		return func(ctx context.Context) error {
			res, err := r.Infer(ctx, []model.Input{{Encoded: img}}, pipeline.Options{})
			if err == nil && len(res) != 1 {
				err = fmt.Errorf("%d results for 1 image", len(res))
			}
			return err
		}
	}
	for _, c := range configs {
		saturate(b, batchingConc, warmRequests(batchingConc), infer(c.r))
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		for j := range configs {
			c := configs[(i+j)%len(configs)]
			c.busy += saturate(b, batchingConc, windowRequests(batchingConc), infer(c.r))
		}
	}
	b.StopTimer()
	images := float64(b.N * windowRequests(batchingConc))
	var tuned, best, one float64
	for _, c := range configs {
		ips := images / c.busy.Seconds()
		b.ReportMetric(ips, c.name+"-images/s")
		switch {
		case c.name == "tuned":
			tuned = ips
		case c.name == "fixed=1":
			one = ips
			fallthrough
		default:
			best = max(best, ips)
		}
	}
	b.ReportMetric(tuned/best, "tuned/best-fixed")
	b.ReportMetric(tuned/one, "tuned/fixed=1")
	tu := configs[0].r.Tuning()
	b.ReportMetric(float64(tu.Policy.MaxBatchSize), "tuned-max-batch")
	if tu.Decision != nil {
		b.Logf("tuned: %v", tu.Decision)
	}
	b.Logf("tuned policy: %+v", tu.Policy)
}

// saturate sends n requests from conc clients through call and returns
// how long they took; it fails the benchmark on an error.
func saturate(b *testing.B, conc, n int, call func(context.Context) error) time.Duration {
	var (
		next    atomic.Int64
		wg      sync.WaitGroup
		errOnce sync.Once
		first   error
	)
	t := time.Now()
	for range conc {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				if err := call(context.Background()); err != nil {
					errOnce.Do(func() { first = err })
					return
				}
			}
		})
	}
	wg.Wait()
	if first != nil {
		b.Fatal(first)
	}
	return time.Since(t)
}

// smoke reports whether the benchmarks run once each (-benchtime=1x, as
// CI does): then the windowed benchmarks only check that every path
// works, with windows of a few requests, since their figures mean
// nothing at one round anyway.
func smoke() bool {
	f := flag.Lookup("test.benchtime")
	return f != nil && f.Value.String() == "1x"
}

// windowRequests is the size of one window of conc clients.
func windowRequests(conc int) int {
	if smoke() {
		return 2
	}
	return conc * overheadWindow
}

// warmRequests is the untimed window before the timed ones.
func warmRequests(conc int) int {
	if smoke() {
		return 1
	}
	return conc
}

// overheadWindow sizes the windows of BenchmarkOverhead at saturation: each
// round is one window of this many requests per client in process, then
// one over gRPC.
const overheadWindow = 3

// BenchmarkOverhead measures what serving over gRPC adds to the
// in-process pipeline, paired so that a shared machine's drifting load
// hits both alike: "conc=1" alternates one in-process call and one gRPC
// call (in turn first) and reports the median of the per-pair
// differences as added-p50-ms; "conc=16" alternates windows of
// 16×overheadWindow requests from 16 clients, in process then over
// gRPC, and reports each side's images/s over its own windows and their
// ratio served/inproc. One op is one pair (conc=1) or one pair of
// windows (conc=16).
func BenchmarkOverhead(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		b.Run("conc=1", func(b *testing.B) {
			s, err := sharedServer(model, be)
			if err != nil {
				skipOrFail(b, err)
			}
			img := testImage(s.model)
			ctx := context.Background()
			if err := s.infer(ctx, img); err != nil {
				b.Fatal(err)
			}
			if err := s.call(ctx, img); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			inproc := make([]time.Duration, 0, b.N)
			served := make([]time.Duration, 0, b.N)
			diff := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for i := range b.N {
				var a, c time.Duration
				timed := func(f func(context.Context, []byte) error) time.Duration {
					t := time.Now()
					if err := f(ctx, img); err != nil {
						b.Fatal(err)
					}
					return time.Since(t)
				}
				if i%2 == 0 {
					a = timed(s.infer)
					c = timed(s.call)
				} else {
					c = timed(s.call)
					a = timed(s.infer)
				}
				inproc, served, diff = append(inproc, a), append(served, c), append(diff, c-a)
			}
			b.StopTimer()
			b.ReportMetric(median(inproc), "inproc-p50-ms")
			b.ReportMetric(median(served), "served-p50-ms")
			b.ReportMetric(median(diff), "added-p50-ms")
		})
		b.Run("conc=16", func(b *testing.B) {
			const conc = 16
			s, err := sharedServer(model, be)
			if err != nil {
				skipOrFail(b, err)
			}
			img := testImage(s.model)
			window := func(f func(context.Context, []byte) error) time.Duration {
				return saturate(b, conc, windowRequests(conc), func(ctx context.Context) error { return f(ctx, img) })
			}
			// Warm both paths up.
			saturate(b, conc, warmRequests(conc), func(ctx context.Context) error { return s.infer(ctx, img) })
			saturate(b, conc, warmRequests(conc), func(ctx context.Context) error { return s.call(ctx, img) })
			b.ReportAllocs()
			var inproc, served time.Duration
			b.ResetTimer()
			for i := range b.N {
				if i%2 == 0 {
					inproc += window(s.infer)
					served += window(s.call)
				} else {
					served += window(s.call)
					inproc += window(s.infer)
				}
			}
			b.StopTimer()
			images := float64(b.N * windowRequests(conc))
			a, c := images/inproc.Seconds(), images/served.Seconds()
			b.ReportMetric(a, "inproc-images/s")
			b.ReportMetric(c, "served-images/s")
			b.ReportMetric(c/a, "served/inproc")
		})
	})
}

// median of d in ms (d is sorted in place).
func median(d []time.Duration) float64 {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	return float64(d[len(d)/2].Nanoseconds()) / 1e6
}
