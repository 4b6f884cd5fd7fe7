// Package enginefake is the one configurable fake engine.Engine that tests
// across the project share: it echoes a fixed-size output row per image,
// can be slowed, failed or blocked, and counts its runs and closes. It
// links no native code.
package enginefake

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
)

// Engine is a fake engine.Engine. The zero value answers every batch with
// one output "out" of shape [N, 1] holding each image's first float.
type Engine struct {
	// Name is what Backend returns ("fake" when empty).
	Name string
	// Outputs is the per-image output width (1 when 0).
	Outputs int
	// Delay is how long each Run takes (ended early by ctx).
	Delay time.Duration
	// Cost adds a run time by batch size (a model on which some sizes
	// are slower per image than others).
	Cost map[int]time.Duration
	// Err, when set, fails every Run.
	Err error
	// RunFunc, when set, replaces the default answer.
	RunFunc func(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error)

	runs   atomic.Int64
	closes atomic.Int64
	mu     sync.Mutex // guards out
	out    []float32
}

// Run implements engine.Engine.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	e.runs.Add(1)
	if err := Sleep(ctx, e.Delay+e.Cost[b.N]); err != nil {
		return nil, err
	}
	if e.Err != nil {
		return nil, e.Err
	}
	if e.RunFunc != nil {
		return e.RunFunc(ctx, b)
	}
	width := max(e.Outputs, 1)
	e.mu.Lock()
	defer e.mu.Unlock()
	if cap(e.out) < b.N*width {
		e.out = make([]float32, b.N*width)
	}
	out := e.out[:b.N*width]
	for i := range b.N {
		for k := range width {
			out[i*width+k] = b.Slot(i)[0]
		}
	}
	return []engine.Tensor{{Name: "out", Shape: []int64{int64(b.N), int64(width)}, Data: out}}, nil
}

// Sleep waits d, or until ctx ends (its error). Fakes use it to take
// the time a real run would.
func Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Backend implements engine.Engine.
func (e *Engine) Backend() string {
	if e.Name == "" {
		return "fake"
	}
	return e.Name
}

// Close implements engine.Engine; it counts the calls.
func (e *Engine) Close() error { e.closes.Add(1); return nil }

// Runs is how many times Run was called.
func (e *Engine) Runs() int { return int(e.runs.Load()) }

// Closes is how many times Close was called.
func (e *Engine) Closes() int { return int(e.closes.Load()) }

var _ engine.Engine = (*Engine)(nil)
