package model

import (
	"context"
	"maps"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Duration is a count of events and their total time, as Triton's
// StatisticDuration.
type Duration struct {
	Count int64
	Total time.Duration
}

func (d *Duration) add(t time.Duration) {
	d.Count++
	d.Total += t
}

// BatchStatistics are the executions of one batch size.
type BatchStatistics struct {
	ComputeInput, ComputeInfer, ComputeOutput Duration
}

// Statistics are a model's cumulative counters, in the terms of Triton's
// statistics extension: requests (success, fail, and where a successful
// request's time went: queue, compute input = decode, preprocess and
// fill, compute infer, compute output = postprocess), and executions per
// batch size.
type Statistics struct {
	// InferenceCount counts the images run; ExecutionCount the batches.
	InferenceCount, ExecutionCount int64
	// LastInference is when the last request finished, zero before any.
	LastInference time.Time
	Success, Fail Duration
	// Queue, ComputeInput, ComputeInfer and ComputeOutput are summed over
	// successful requests, each the mean of its images.
	Queue, ComputeInput, ComputeInfer, ComputeOutput Duration
	Batches                                          map[int]BatchStatistics
}

// stats accumulates a runner's Statistics.
type stats struct {
	mu sync.Mutex
	s  Statistics
}

// reset forgets everything counted (the warm-up's batch).
func (st *stats) reset() {
	st.mu.Lock()
	st.s = Statistics{}
	st.mu.Unlock()
}

func (st *stats) snapshot() Statistics {
	st.mu.Lock()
	defer st.mu.Unlock()
	s := st.s
	s.Batches = maps.Clone(st.s.Batches)
	return s
}

// request records one request that ended after d, with its images'
// stage timings.
func (st *stats) request(d time.Duration, timings []pipeline.StageTimings, err error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.s.LastInference = time.Now()
	if err != nil {
		st.s.Fail.add(d)
		return
	}
	st.s.Success.add(d)
	if len(timings) == 0 {
		return
	}
	var q, in, inf, out time.Duration
	for _, t := range timings {
		q += t.Queue
		in += t.Decode + t.Preprocess
		inf += t.Inference
		out += t.Postprocess
	}
	n := time.Duration(len(timings))
	st.s.Queue.add(q / n)
	st.s.ComputeInput.add(in / n)
	st.s.ComputeInfer.add(inf / n)
	st.s.ComputeOutput.add(out / n)
}

// statsObserver counts the batches a model's batcher runs, then hands
// each event on.
type statsObserver struct {
	batcher.BatchObserver
	st *stats
}

func (o statsObserver) BatchDone(ctx context.Context, e batcher.BatchDoneEvent) {
	if e.Size > 0 && e.Err == nil {
		o.st.mu.Lock()
		s := &o.st.s
		s.InferenceCount += int64(e.Size)
		s.ExecutionCount++
		if s.Batches == nil {
			s.Batches = map[int]BatchStatistics{}
		}
		b := s.Batches[e.Size]
		b.ComputeInput.add(e.Fill)
		b.ComputeInfer.add(e.Inference)
		b.ComputeOutput.add(e.Postprocess)
		s.Batches[e.Size] = b
		o.st.mu.Unlock()
	}
	o.BatchObserver.BatchDone(ctx, e)
}
