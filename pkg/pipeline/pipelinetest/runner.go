// Package pipelinetest holds the synchronous reference path through a
// model for tests, tools and benchmarks: prepare each image, fill one
// pooled batch, run the engine, postprocess; no batcher, no queue. The
// server never uses it: it serves through package model.
package pipelinetest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Runner is the simple synchronous pipeline: prepare, fill one pooled
// batch, run the engine, postprocess. Like its Engine, a Runner is used
// by one goroutine at a time.
type Runner struct {
	pre      *pipeline.Preprocessor
	post     *pipeline.Postprocessor
	engine   engine.Engine
	pool     *engine.BatchPool
	maxBatch int
}

// New builds a Runner of model m on engine e. The Runner does not own e:
// closing the Runner leaves the engine open.
func New(m *modelrepo.Model, e engine.Engine, opts pipeline.PreprocessOptions) (*Runner, error) {
	if e == nil {
		return nil, errors.New("pipelinetest: nil engine")
	}
	pre, err := pipeline.NewPreprocessor(m, opts)
	if err != nil {
		return nil, err
	}
	post, err := pipeline.NewPostprocessor(m)
	if err != nil {
		return nil, err
	}
	maxBatch := max(m.Batching.MaxBatchSize, 1)
	alloc, _ := e.(engine.BatchAllocator)
	c, h, w := pre.InputShape()
	pool, err := engine.NewBatchPool(maxBatch, c, h, w, 1, alloc)
	if err != nil {
		return nil, err
	}
	return &Runner{pre: pre, post: post, engine: e, pool: pool, maxBatch: maxBatch}, nil
}

// Preprocessor returns the Runner's preprocessor.
func (r *Runner) Preprocessor() *pipeline.Preprocessor { return r.pre }

// Postprocessor returns the Runner's postprocessor.
func (r *Runner) Postprocessor() *pipeline.Postprocessor { return r.post }

// Infer runs encoded images through the model, at most the model's
// max_batch_size per engine run, and returns one Result per image in order.
// A bad image fails the call with an error naming its index (see pipeline.Decode
// for the accepted formats and limits).
func (r *Runner) Infer(ctx context.Context, images [][]byte, opts pipeline.Options) ([]pipeline.Result, error) {
	if _, err := r.post.Resolve(opts); err != nil {
		return nil, err
	}
	results := make([]pipeline.Result, 0, len(images))
	for start := 0; start < len(images); start += r.maxBatch {
		chunk := images[start:min(start+r.maxBatch, len(images))]
		res, err := r.inferChunk(ctx, chunk, start, opts)
		if err != nil {
			return nil, err
		}
		results = append(results, res...)
	}
	return results, nil
}

func (r *Runner) inferChunk(ctx context.Context, images [][]byte, first int, opts pipeline.Options) ([]pipeline.Result, error) {
	prepared := make([]*pipeline.Prepared, 0, len(images))
	defer func() {
		for _, p := range prepared {
			p.Close()
		}
	}()
	b, err := r.pool.Get()
	if err != nil {
		return nil, err
	}
	defer r.pool.Put(b)
	for k, img := range images {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		p, err := r.pre.Prepare(img)
		if err != nil {
			return nil, fmt.Errorf("image %d: %w", first+k, err)
		}
		prepared = append(prepared, p)
		t := time.Now()
		if err := p.Fill(b.Slot(k)); err != nil {
			return nil, fmt.Errorf("image %d: %w", first+k, err)
		}
		p.Preprocess += time.Since(t)
	}
	b.N = len(images)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	t := time.Now()
	outs, err := r.engine.Run(ctx, b)
	if err != nil {
		return nil, fmt.Errorf("running %s: %w", r.engine.Backend(), err)
	}
	inference := time.Since(t)
	results := make([]pipeline.Result, len(images))
	for k, p := range prepared {
		res, err := r.post.Decode(outs, k, p, opts)
		if err != nil {
			return nil, fmt.Errorf("image %d: %w", first+k, err)
		}
		res.Timings.Inference = inference
		res.Backend = r.engine.Backend()
		res.BatchSize = len(images)
		results[k] = res
	}
	return results, nil
}

// Close frees the batch buffers. It does not close the engine.
func (r *Runner) Close() error {
	r.pool.Close()
	return nil
}
