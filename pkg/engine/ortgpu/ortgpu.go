// Package ortgpu adapts the GPU engine of package gpu to the pipeline's
// Engine interface. It is separate from package gpu because pipeline links
// OpenCV, and the GPU package and its test binaries must run on machines
// that have only the ONNX Runtime and CUDA libraries.
package ortgpu

import (
	"context"
	"errors"

	"github.com/visionserve/visionserve/pkg/gpu"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Engine is a gpu.Engine as a pipeline.Engine and pipeline.BatchAllocator:
// batch buffers from AllocBatch are pinned host memory the GPU engine binds
// without a copy.
type Engine struct {
	e *gpu.Engine
	// results caches the converted output slice per batch size, so Run
	// allocates nothing in steady state.
	results map[int][]pipeline.Tensor
}

// New wraps e; Close closes it.
func New(e *gpu.Engine) *Engine {
	return &Engine{e: e, results: map[int][]pipeline.Tensor{}}
}

// Wrap wraps every engine of a loaded model.
func Wrap(m *gpu.Model) []*Engine {
	out := make([]*Engine, len(m.Engines))
	for i, e := range m.Engines {
		out[i] = New(e)
	}
	return out
}

// Run executes the first b.N images of b on the GPU engine.
func (a *Engine) Run(ctx context.Context, b *pipeline.Batch) ([]pipeline.Tensor, error) {
	if b == nil {
		return nil, errors.New("ortgpu: nil batch")
	}
	out, err := a.e.Run(ctx, b.Data, b.N, b.C, b.H, b.W)
	if err != nil {
		return nil, err
	}
	res, ok := a.results[b.N]
	if !ok || len(res) != len(out) {
		res = make([]pipeline.Tensor, len(out))
		a.results[b.N] = res
	}
	for i, t := range out {
		// gpu.Tensor has pipeline.Tensor's layout; the data is not copied.
		res[i] = pipeline.Tensor(t)
	}
	return res, nil
}

// Backend names the provider: ort-cuda or ort-tensorrt.
func (a *Engine) Backend() string { return a.e.Backend() }

// AllocBatch returns pinned host memory for a batch (pageable without CUDA).
func (a *Engine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	return a.e.AllocBatch(maxN, c, h, w)
}

// GPU returns the wrapped engine, for its Stats.
func (a *Engine) GPU() *gpu.Engine { return a.e }

// Close closes the GPU engine.
func (a *Engine) Close() error { return a.e.Close() }

var (
	_ pipeline.Engine         = (*Engine)(nil)
	_ pipeline.BatchAllocator = (*Engine)(nil)
)
