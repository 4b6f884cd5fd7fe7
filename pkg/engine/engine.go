// Package engine is the contract between the serving code and the
// inference engines: an Engine runs a contiguous NCHW float32 Batch and
// returns its output Tensors. It links no native code (no cgo, no OpenCV),
// so the batcher and its tests build anywhere; the engines themselves
// (ONNX Runtime on the CPU in onnxrt, OpenCV DNN in cvdnn, ONNX Runtime on
// a GPU in pkg/gpu) live in leaf packages and implement it directly.
//
// Registry maps backend names to the Factory that builds a backend's
// engines for a model; the server builds one in main and passes it down.
package engine

import (
	"context"
	"errors"
)

// ErrBadBatch marks a Run error caused by the batch itself (a shape or
// size the model does not take) rather than by the backend, so that it
// does not count against the backend's health (see package failover).
// Engines wrap it with detail.
var ErrBadBatch = errors.New("bad batch")

// Engine runs preprocessed batches through one loaded model. Implementations
// (ONNX Runtime, OpenCV DNN, ONNX Runtime on a GPU) live in leaf packages so
// that only they link native code. An Engine is used by one goroutine at a
// time; run several instances for concurrency.
type Engine interface {
	// Run executes the model on the first b.N images of b and returns the
	// model's outputs with batch dimension b.N. The returned tensors stay
	// valid until the next call to Run or Close on the same Engine.
	// A native failure is returned as an error; it never ends the process.
	Run(ctx context.Context, b *Batch) ([]Tensor, error)
	// Backend names what runs the model, such as "ort-cpu" or "opencv".
	Backend() string
	// Close frees the native resources. It is safe to call once.
	Close() error
}

// BatchAllocator is implemented by engines that want batch input buffers in
// memory of their own (pinned host memory on a GPU). Buffers are reused
// across batches; free is called once the buffer is no longer used.
type BatchAllocator interface {
	AllocBatch(maxN, c, h, w int) (data []float32, free func(), err error)
}

// Tensor is a dense float32 tensor in row-major order.
type Tensor struct {
	Name  string
	Shape []int64
	Data  []float32
}

// Batch is one contiguous NCHW float32 buffer holding up to Cap images of
// C×H×W each. Preprocessing writes each image into its own slot; nothing is
// copied afterwards.
type Batch struct {
	N       int // images in use, 0 < N <= Cap
	Cap     int // images the buffer holds
	C, H, W int
	Data    []float32 // len == Cap*C*H*W
}

// NewBatch allocates a batch buffer on the Go heap.
func NewBatch(capacity, c, h, w int) *Batch {
	return &Batch{Cap: capacity, C: c, H: h, W: w, Data: make([]float32, capacity*c*h*w)}
}

// SlotSize is the number of floats one image occupies.
func (b *Batch) SlotSize() int { return b.C * b.H * b.W }

// Slot returns the part of the buffer that holds image i.
func (b *Batch) Slot(i int) []float32 {
	n := b.SlotSize()
	return b.Data[i*n : (i+1)*n : (i+1)*n]
}

// Input returns the part of the buffer in use, b.N images.
func (b *Batch) Input() []float32 { return b.Data[:b.N*b.SlotSize()] }
