package benchmarks

import (
	"context"
	"fmt"
	"testing"

	"github.com/visionserve/visionserve/internal/server"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
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
				batch := pipeline.NewBatch(n, c, h, w)
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
// out: "runner" is the synchronous pipeline.Runner (decode, preprocess,
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
			r, err := pipeline.New(m, e, pipeline.PreprocessOptions{})
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
// measured at warm-up, see pipeline.ChooseBatchSizes). The tuned one
// should be within 5% of the best fixed one. max-batch reports the
// maximum in force.
func BenchmarkBatching(b *testing.B) {
	forEach(b, func(b *testing.B, model, be string) {
		e, m, err := sharedEngine(model, be)
		if err != nil {
			skipOrFail(b, err)
		}
		configs := []string{"tuned"}
		for _, n := range pipeline.CandidateSizes(m.Batching.MaxBatchSize) {
			configs = append(configs, fmt.Sprintf("fixed=%d", n))
		}
		for _, cfg := range configs {
			b.Run(cfg, func(b *testing.B) {
				mc := *m
				mc.Batching.PreferredBatchSizes = nil
				mc.Batching.QueueSize = max(mc.Batching.QueueSize, 4*batchingConc)
				if cfg == "tuned" {
					mc.Batching.AutoTune = true
				} else if _, err := fmt.Sscanf(cfg, "fixed=%d", &mc.Batching.MaxBatchSize); err != nil {
					b.Fatal(err)
				}
				r, err := server.NewPipelineRunner(&mc, []pipeline.Engine{noClose{e}}, server.RunnerOptions{MaxPixels: 40_000_000})
				if err != nil {
					b.Fatal(err)
				}
				defer r.Close(context.Background())
				if err := r.AutoTune(context.Background(), nil); err != nil {
					b.Fatal(err)
				}
				img := testImage(m)
				measure(b, batchingConc, 1, func(ctx context.Context) error {
					res, err := r.Infer(ctx, []server.Input{{Encoded: img}}, pipeline.Options{})
					if err == nil && len(res) != 1 {
						err = fmt.Errorf("%d results for 1 image", len(res))
					}
					return err
				})
				b.ReportMetric(float64(r.Tuning().Policy.MaxBatchSize), "max-batch")
			})
		}
	})
}
