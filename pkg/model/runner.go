package model

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// PipelineRunner is the Runner of a real model: the request's goroutine
// decodes and resizes each image (so decoding scales with the requests),
// the model's dynamic batcher packs images of all requests into batches
// for its engine instances, and the postprocessor decodes each output row.
type PipelineRunner struct {
	name    string
	pre     *pipeline.Preprocessor
	post    *pipeline.Postprocessor
	batcher *batcher.Batcher
	engines []engine.Engine
	backend string
	tuner   *tuner // self-tuning of the batcher (autotune.go)
	results func(ctx context.Context, model string, start time.Time, res []pipeline.Result)
	stats   *stats
	closing sync.Once
	err     error
}

// RunnerOptions configure a PipelineRunner.
type RunnerOptions struct {
	// MaxPixels bounds width×height of an input image.
	MaxPixels int
	// DecodeBudget, when set, bounds the memory of images being decoded
	// at once, across every model given it.
	DecodeBudget *pipeline.DecodeBudget
	// Observer receives the batcher's events (metrics, traces); nil for
	// none.
	Observer batcher.BatchObserver
	// TuneObserver is told what the self-tuner chose (metrics); nil for
	// none.
	TuneObserver batcher.TuneObserver
	// WrapEngines, when set, wraps the engines the batcher runs (an
	// inference span per run, say); the runner still closes the engines
	// it was given.
	WrapEngines func([]engine.Engine) []engine.Engine
	// Results, when set, is told every request's results once they are
	// in (stage spans, say).
	Results func(ctx context.Context, model string, start time.Time, res []pipeline.Result)
}

// NewPipelineRunner serves m on engines, one batcher worker per engine.
// The runner owns the engines: Close closes them after the batcher
// drained. On error the engines stay the caller's.
func NewPipelineRunner(m *modelrepo.Model, engines []engine.Engine, opts RunnerOptions) (*PipelineRunner, error) {
	if len(engines) == 0 {
		return nil, fmt.Errorf("model %q: no engines", m.Name)
	}
	pre, err := pipeline.NewPreprocessor(m, pipeline.PreprocessOptions{MaxPixels: opts.MaxPixels, Budget: opts.DecodeBudget})
	if err != nil {
		return nil, err
	}
	post, err := pipeline.NewPostprocessor(m)
	if err != nil {
		return nil, err
	}
	c, h, w := pre.InputShape()
	b := m.Batching
	tn, observer, err := newTuner(m, opts.Observer, opts.TuneObserver)
	if err != nil {
		return nil, err
	}
	st := &stats{}
	if observer == nil {
		observer = batcher.NopBatchObserver{}
	}
	observer = statsObserver{BatchObserver: observer, st: st}
	run := engines
	if opts.WrapEngines != nil {
		run = opts.WrapEngines(engines)
	}
	batcher, err := batcher.New(batcher.Config{
		Model:               m.Name,
		MaxBatchSize:        b.MaxBatchSize,
		MaxQueueDelay:       b.MaxQueueDelay,
		PreferredBatchSizes: b.PreferredBatchSizes,
		QueueSize:           b.QueueSize,
		C:                   c, H: h, W: w,
		Engines:  run,
		Observer: observer,
	})
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", m.Name, err)
	}
	return &PipelineRunner{name: m.Name, pre: pre, post: post, batcher: batcher, engines: engines, backend: engines[0].Backend(), tuner: tn, results: opts.Results, stats: st}, nil
}

// Backend names the engines' backend.
func (r *PipelineRunner) Backend() string { return r.backend }

// Statistics are the model's cumulative request and batch counters
// (Triton's statistics extension).
func (r *PipelineRunner) Statistics() Statistics { return r.stats.snapshot() }

func (r *PipelineRunner) resetStatistics() { r.stats.reset() }

// Stats is the batcher's queue snapshot, for metrics.
func (r *PipelineRunner) Stats() batcher.Stats { return r.batcher.Stats() }

// prepare decodes and fits every input; on error it frees what it made.
// Before each image it checks ctx: once the client has gone or its
// deadline passed, none of its images costs another decode.
func (r *PipelineRunner) prepare(ctx context.Context, inputs []Input) ([]*pipeline.Prepared, error) {
	prepared := make([]*pipeline.Prepared, 0, len(inputs))
	for i, in := range inputs {
		if err := ctx.Err(); err != nil {
			closeAll(prepared)
			return nil, fmt.Errorf("before image %d of %d: %w", i, len(inputs), err)
		}
		var (
			p   *pipeline.Prepared
			err error
		)
		switch {
		case in.Tensor != nil:
			p, err = r.pre.PrepareTensor(in.Tensor)
		case in.Pixels != nil:
			p, err = r.pre.PrepareHWC(in.Pixels, in.Height, in.Width, true)
		default:
			p, err = r.pre.Prepare(in.Encoded)
		}
		if err != nil {
			closeAll(prepared)
			return nil, fmt.Errorf("image %d: %w", i, err)
		}
		prepared = append(prepared, p)
	}
	return prepared, nil
}

func closeAll(ps []*pipeline.Prepared) {
	for _, p := range ps {
		p.Close()
	}
}

type clientKey struct{}

// WithClient names the client a request comes from (its connection's
// address, say). The batcher shares its queue fairly between clients, so
// that one client's flood does not starve the others; requests with no
// client named share one key.
func WithClient(ctx context.Context, client string) context.Context {
	return context.WithValue(ctx, clientKey{}, client)
}

func fairnessKey(ctx context.Context) string {
	k, _ := ctx.Value(clientKey{}).(string)
	return k
}

// Infer implements Runner.
func (r *PipelineRunner) Infer(ctx context.Context, inputs []Input, opts pipeline.Options) ([]pipeline.Result, error) {
	start := time.Now()
	opts, err := r.post.Resolve(opts)
	if err != nil {
		return nil, err
	}
	items, err := r.submit(ctx, inputs, func(p *pipeline.Prepared) batcher.Item {
		return pipeline.NewResultItem(p, r.post, opts)
	})
	if err != nil {
		r.stats.request(time.Since(start), nil, err)
		return nil, err
	}
	res := make([]pipeline.Result, len(items))
	timings := make([]pipeline.StageTimings, len(items))
	for i, it := range items {
		res[i] = it.(*pipeline.ResultItem).Result()
		timings[i] = res[i].Timings
	}
	r.stats.request(time.Since(start), timings, nil)
	if r.results != nil {
		r.results(ctx, r.name, start, res)
	}
	return res, nil
}

// InferRaw implements Runner: the images run in whatever batches the
// batcher forms, and their output rows are put back together in request
// order, so the result equals one engine run on all of them.
func (r *PipelineRunner) InferRaw(ctx context.Context, inputs []Input) ([]engine.Tensor, error) {
	start := time.Now()
	items, err := r.submit(ctx, inputs, func(p *pipeline.Prepared) batcher.Item { return pipeline.NewRawItem(p) })
	if err != nil {
		r.stats.request(time.Since(start), nil, err)
		return nil, err
	}
	raw := make([]*pipeline.RawItem, len(items))
	timings := make([]pipeline.StageTimings, len(items))
	for i, it := range items {
		raw[i] = it.(*pipeline.RawItem)
		timings[i] = raw[i].Timings
	}
	r.stats.request(time.Since(start), timings, nil)
	return pipeline.StackRows(raw)
}

// submit runs inputs through the batcher as the items item makes of
// them. Room in the queue for every input is held before any is
// decoded, so a request that cannot fit is refused before the expensive
// work. It returns once no worker touches the items any more.
func (r *PipelineRunner) submit(ctx context.Context, inputs []Input, item func(*pipeline.Prepared) batcher.Item) ([]batcher.Item, error) {
	key := fairnessKey(ctx)
	room, err := r.batcher.Reserve(key, len(inputs))
	if err != nil {
		return nil, err
	}
	defer room.Release()
	prepared, err := r.prepare(ctx, inputs)
	if err != nil {
		return nil, err
	}
	defer closeAll(prepared)
	items := make([]batcher.Item, len(prepared))
	for i, p := range prepared {
		items[i] = item(p)
	}
	if err := r.batcher.SubmitReserved(ctx, key, items, room); err != nil {
		return nil, err
	}
	return items, nil
}

// Close implements Runner: the batcher runs every accepted image, then
// the engines are freed.
func (r *PipelineRunner) Close(ctx context.Context) error {
	r.closing.Do(func() {
		r.tuner.stop()
		errs := []error{r.batcher.Close(ctx)}
		for _, e := range r.engines {
			errs = append(errs, e.Close())
		}
		r.err = errors.Join(errs...)
	})
	return r.err
}
