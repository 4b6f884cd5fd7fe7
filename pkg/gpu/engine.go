package gpu

/*
#include <stdlib.h>
#include "ortc.h"
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"unsafe"

	"github.com/visionserve/visionserve/pkg/engine"
)

// EngineOptions configure an Engine.
type EngineOptions struct {
	// InputMemory is MemoryPinned (the default) or MemoryPageable, which
	// benchmarks use as the baseline. Without the CUDA runtime memory is
	// pageable whatever is asked.
	InputMemory MemoryKind
	// CUDARuntime is the CUDA runtime library pinned memory comes from;
	// "" looks for libcudart on the loader's path.
	CUDARuntime string
	// Backend is what Backend reports; "" means the provider's name.
	Backend string
	// OutputNames are the outputs Run returns, in order; nil means all of
	// the model's. Only these are bound, so ONNX Runtime computes only
	// what they need.
	OutputNames []string
	// PadBatchSizes are the batch sizes the engine runs at: a batch of n
	// images runs at the smallest of them that is at least n, with the
	// extra slots holding whatever the buffer held, and only the first n
	// results returned. ONNX Runtime 1.29's CUDA provider is slow on every
	// run whose input shape differs from the previous run's (measured on an
	// H100: benchmarks/results/2026-11-23-h100), so one pad size, the
	// largest batch, is what keeps it fast. nil runs every batch at its own
	// size, as do sizes above the largest.
	PadBatchSizes []int

	// pinnedInfoOnCPU binds pinned buffers with the CUDA-pinned memory
	// info even on the CPU provider, so tests reach that path (and its
	// fallback) without a GPU.
	pinnedInfoOnCPU bool
}

// EngineStats counts what an engine did.
type EngineStats struct {
	Batches int64
	// CopiedBatches ran from a buffer not obtained through AllocBatch and
	// were copied into the engine's staging buffer first.
	CopiedBatches int64
	// PaddedBatches ran at a larger pad batch size than they held.
	PaddedBatches int64
	// Memory is the kind of host memory the inputs and outputs live in.
	Memory MemoryKind
	// MemoryReason says why memory is not pinned, "" when it is.
	MemoryReason string
	// BindPinned reports whether the buffers are bound to ONNX Runtime as
	// CUDA-pinned memory (else as plain CPU memory).
	BindPinned bool
	// PinnedBindError is why binding as CUDA-pinned memory failed and the
	// engine fell back to binding the buffers as CPU memory.
	PinnedBindError string
}

// Engine runs batches on one Session through an IoBinding: inputs and
// outputs live in host buffers the engine owns (pinned when CUDA is there),
// bound once per batch size, so a steady-state run allocates nothing. Like
// every pipeline engine it is used by one goroutine at a time; several
// engines may share one Session.
type Engine struct {
	sess       *Session
	cs         *C.OrtSession
	input      IOInfo
	outputs    []IOInfo
	fixedBatch int // the graph's batch size when it fixes one, else 0
	alloc      *HostAllocator
	backend    string
	cpuInfo    *C.OrtMemoryInfo
	ro         *C.OrtRunOptions
	inName     *C.char
	outNames   []*C.char
	pad        []int // sorted, distinct PadBatchSizes

	gate    engine.Gate      // guards the fields below
	memInfo *C.OrtMemoryInfo // what buffers are bound as: pinned or cpuInfo
	pinned  *C.OrtMemoryInfo // nil unless pinned binding is possible
	sizes   map[int]*binding
	owned   map[unsafe.Pointer]*HostBuffer // buffers handed out by AllocBatch
	inputs  map[inputKey]*C.OrtValue
	staging *HostBuffer
	views   map[[2]int][]engine.Tensor // first-n views of a padded run's results, by {run size, n}
	stats   EngineStats
}

type inputKey struct {
	ptr unsafe.Pointer
	n   int
}

// maxCachedInputs bounds the input value cache: a pipeline rotates through
// a few buffers, so more entries mean buffers are not being reused.
const maxCachedInputs = 32

// binding is the IoBinding state of one batch size. A graph that fixes its
// batch at F runs a batch of n images as n/F chunks, each with an IoBinding
// of its own whose outputs are bound to that chunk's part of the output
// buffers; other graphs run one chunk of n.
type binding struct {
	chunk   int               // images per chunk
	bs      []*C.OrtIoBinding // one per chunk
	outVals [][]*C.OrtValue   // [chunk][output]
	outBufs []*HostBuffer     // one per output, all chunks
	result  []engine.Tensor
}

// NewEngine creates an engine on s. The model must have one float32 NCHW
// input and float32 outputs whose shapes are fixed but for the batch.
func NewEngine(s *Session, opts EngineOptions) (*Engine, error) {
	if len(s.inputs) != 1 {
		return nil, fmt.Errorf("gpu engine: model %s has %d inputs, want one image input", s.path, len(s.inputs))
	}
	in := s.inputs[0]
	if !in.Float || len(in.Shape) != 4 {
		return nil, fmt.Errorf("gpu engine: model %s input %q has shape %v, want a float32 NCHW tensor", s.path, in.Name, in.Shape)
	}
	outputs := s.outputs
	if opts.OutputNames != nil {
		outputs = nil
		for _, name := range opts.OutputNames {
			i := slices.IndexFunc(s.outputs, func(o IOInfo) bool { return o.Name == name })
			if i < 0 {
				return nil, fmt.Errorf("gpu engine: model %s has no output %q", s.path, name)
			}
			outputs = append(outputs, s.outputs[i])
		}
		if len(outputs) == 0 {
			return nil, fmt.Errorf("gpu engine: no outputs asked of model %s", s.path)
		}
	}
	for _, o := range outputs {
		if !o.Float || len(o.Shape) == 0 || slices.Contains(o.Shape[1:], -1) {
			return nil, fmt.Errorf("gpu engine: model %s output %q has shape %v, want float32 with every dimension but the batch fixed", s.path, o.Name, o.Shape)
		}
		if o.Shape[0] >= 0 && o.Shape[0] != in.Shape[0] {
			return nil, fmt.Errorf("gpu engine: model %s output %q has batch %d, input %q has %d", s.path, o.Name, o.Shape[0], in.Name, in.Shape[0])
		}
	}
	want := opts.InputMemory
	if want == "" {
		want = MemoryPinned
	}
	e := &Engine{
		sess: s, input: in, outputs: outputs,
		alloc:   NewHostAllocator(want, opts.CUDARuntime),
		backend: opts.Backend,
		sizes:   map[int]*binding{},
		owned:   map[unsafe.Pointer]*HostBuffer{},
		inputs:  map[inputKey]*C.OrtValue{},
		views:   map[[2]int][]engine.Tensor{},
	}
	for _, n := range opts.PadBatchSizes {
		if n < 1 {
			return nil, fmt.Errorf("gpu engine: pad batch size %d is not positive", n)
		}
	}
	if in.Shape[0] <= 0 { // a graph that fixes its batch runs in chunks of it instead
		e.pad = slices.Compact(slices.Sorted(slices.Values(opts.PadBatchSizes)))
	}
	if e.backend == "" {
		e.backend = s.opts.Provider.Backend()
	}
	if in.Shape[0] > 0 {
		e.fixedBatch = int(in.Shape[0])
	}
	e.stats.Memory, e.stats.MemoryReason = e.alloc.Kind(), e.alloc.Reason()
	var err error
	if e.cs, err = s.acquire(); err != nil {
		return nil, fmt.Errorf("gpu engine: %w", err)
	}
	if err = cerr(C.vs_memory_info_cpu(&e.cpuInfo)); err == nil {
		err = cerr(C.vs_run_options_new(&e.ro))
	}
	if err == nil && e.alloc.Kind() == MemoryPinned && (s.opts.Provider != ProviderCPU || opts.pinnedInfoOnCPU) {
		err = cerr(C.vs_memory_info_pinned(C.int(s.opts.Device), &e.pinned))
	}
	if err != nil {
		e.Close()
		return nil, fmt.Errorf("gpu engine: %w", err)
	}
	e.memInfo = e.cpuInfo
	if e.pinned != nil {
		e.memInfo = e.pinned
		e.stats.BindPinned = true
	}
	e.inName = C.CString(in.Name)
	for _, o := range e.outputs {
		e.outNames = append(e.outNames, C.CString(o.Name))
	}
	return e, nil
}

// Backend names what runs the model: ort-cuda, ort-tensorrt or, on the CPU
// twin, ort-cpu-binding.
func (e *Engine) Backend() string { return e.backend }

// Input describes the model input.
func (e *Engine) Input() IOInfo { return e.input }

// Outputs describes the model outputs.
func (e *Engine) Outputs() []IOInfo { return e.outputs }

// Stats returns the engine's counters.
func (e *Engine) Stats() EngineStats {
	e.gate.Lock()
	defer e.gate.Unlock()
	return e.stats
}

// AllocBatch returns a batch buffer of maxN images of c×h×w floats in the
// engine's host memory (pinned when CUDA is present), so preprocessing
// writes where the GPU copies from. It has the signature of
// engine.BatchAllocator. free must be called once the buffer is no
// longer used; it is safe after Close.
func (e *Engine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	if maxN < 1 || c < 1 || h < 1 || w < 1 {
		return nil, nil, fmt.Errorf("gpu engine: batch buffer %dx%dx%dx%d has an empty dimension", maxN, c, h, w)
	}
	if err := e.checkImage(c, h, w); err != nil {
		return nil, nil, err
	}
	size, ok := floatCount(maxN, c, h, w)
	if !ok {
		return nil, nil, fmt.Errorf("gpu engine: batch buffer %dx%dx%dx%d too large", maxN, c, h, w)
	}
	if err := e.gate.Enter(context.Background()); err != nil {
		return nil, nil, fmt.Errorf("gpu engine: %w", err)
	}
	defer e.gate.Unlock()
	buf, err := e.alloc.Alloc(size)
	if err != nil {
		return nil, nil, fmt.Errorf("gpu engine: %w", err)
	}
	e.owned[buf.ptr] = buf
	var once sync.Once
	free := func() {
		once.Do(func() {
			e.gate.Lock()
			defer e.gate.Unlock()
			e.forgetBufferLocked(buf)
			buf.Free()
		})
	}
	return buf.Floats(), free, nil
}

// forgetBufferLocked drops every reference ONNX Runtime could still hold to
// buf's memory, so it can be freed.
func (e *Engine) forgetBufferLocked(buf *HostBuffer) {
	delete(e.owned, buf.ptr)
	lo, hi := uintptr(buf.ptr), uintptr(buf.ptr)+uintptr(buf.n)*4
	for k, v := range e.inputs {
		// Chunks of a fixed-batch graph are keyed by addresses inside buf.
		if p := uintptr(k.ptr); p >= lo && p < hi {
			C.vs_value_release(v)
			delete(e.inputs, k)
		}
	}
}

// floatCount is n*c*h*w for positive dimensions, false when the product
// exceeds the largest buffer (or would overflow an int).
func floatCount(dims ...int) (int, bool) {
	p := 1
	for _, d := range dims {
		if d < 1 || d > maxHostFloats/p {
			return 0, false
		}
		p *= d
	}
	return p, true
}

func (e *Engine) checkImage(c, h, w int) error {
	want := e.input.Shape[1:]
	got := []int64{int64(c), int64(h), int64(w)}
	for i := range want {
		if want[i] > 0 && want[i] != got[i] {
			return fmt.Errorf("gpu engine: %w: images are %dx%dx%d (CxHxW), model input is %v", engine.ErrBadBatch, c, h, w, e.input.Shape)
		}
	}
	return nil
}

// Run implements engine.Engine: it executes the first b.N images of b.
// Batches whose buffer came from AllocBatch (the batcher asks for them,
// since Engine is an engine.BatchAllocator) run without a copy.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	if b == nil {
		return nil, errors.New("gpu engine: nil batch")
	}
	return e.RunData(ctx, b.Data, b.N, b.C, b.H, b.W)
}

// RunData executes the model on the first n images of data, each c×h×w
// floats.
// When data came from AllocBatch it is ONNX Runtime's input memory; other
// memory is copied into a staging buffer first. The returned tensors live
// in engine memory and stay valid until the next Run or Close. Cancelling
// ctx terminates the run.
func (e *Engine) RunData(ctx context.Context, data []float32, n, c, h, w int) ([]engine.Tensor, error) {
	if n < 1 || c < 1 || h < 1 || w < 1 {
		return nil, fmt.Errorf("gpu engine: %w: batch %dx%dx%dx%d has an empty dimension", engine.ErrBadBatch, n, c, h, w)
	}
	if err := e.checkImage(c, h, w); err != nil {
		return nil, err
	}
	if e.fixedBatch > 0 && n%e.fixedBatch != 0 {
		return nil, fmt.Errorf("gpu engine: model %s fixes the batch at %d, cannot run %d images", e.sess.path, e.fixedBatch, n)
	}
	size, ok := floatCount(n, c, h, w)
	if !ok {
		return nil, fmt.Errorf("gpu engine: batch %dx%dx%dx%d too large", n, c, h, w)
	}
	if len(data) < size {
		return nil, fmt.Errorf("gpu engine: buffer holds %d floats, %d images of %dx%dx%d need %d", len(data), n, c, h, w, size)
	}
	if err := e.gate.Enter(ctx); err != nil {
		return nil, fmt.Errorf("gpu engine: %w", err)
	}
	defer e.gate.Unlock()
	run := e.padSize(n)
	runSize, ok := floatCount(run, c, h, w)
	if !ok {
		return nil, fmt.Errorf("gpu engine: padded batch %dx%dx%dx%d too large", run, c, h, w)
	}
	ptr := unsafe.Pointer(&data[0])
	if buf, ok := e.owned[ptr]; !ok || buf.n < runSize {
		var err error
		if ptr, err = e.stageLocked(data[:size], runSize); err != nil {
			return nil, err
		}
		e.stats.CopiedBatches++
	}
	out, err := e.runLocked(ctx, ptr, run, c, h, w)
	if err != nil && e.memInfo == e.pinned && e.stats.Batches == 0 && ctx.Err() == nil {
		// The first run with buffers bound as CUDA-pinned memory failed:
		// bind the same pinned buffers as plain CPU memory, which the
		// driver still copies by DMA, and say so in Stats. Later failures
		// are the model's or the device's and are returned as they are.
		e.dropBindingsLocked()
		e.memInfo = e.cpuInfo
		e.stats.BindPinned = false
		e.stats.PinnedBindError = err.Error()
		out, err = e.runLocked(ctx, ptr, run, c, h, w)
	}
	if err != nil {
		return nil, err
	}
	e.stats.Batches++
	if run != n {
		e.stats.PaddedBatches++
		return e.viewLocked(out, run, n), nil
	}
	return out, nil
}

// padSize is the batch size a batch of n images runs at.
func (e *Engine) padSize(n int) int {
	i, ok := slices.BinarySearch(e.pad, n)
	if ok || i == len(e.pad) {
		return n
	}
	return e.pad[i]
}

// viewLocked returns the first n images' part of out, the results of a run
// at batch size run; the views are made once per pair of sizes.
func (e *Engine) viewLocked(out []engine.Tensor, run, n int) []engine.Tensor {
	key := [2]int{run, n}
	v, ok := e.views[key]
	if !ok {
		v = make([]engine.Tensor, len(out))
		for i, t := range out {
			shape := slices.Clone(t.Shape)
			shape[0] = int64(n)
			v[i] = engine.Tensor{Name: t.Name, Shape: shape, Data: t.Data[:len(t.Data)/run*n]}
		}
		e.views[key] = v
	}
	return v
}

// runLocked binds the input at ptr to the binding of batch size n and runs
// it, chunk by chunk.
func (e *Engine) runLocked(ctx context.Context, ptr unsafe.Pointer, n, c, h, w int) ([]engine.Tensor, error) {
	b, err := e.bindingLocked(n)
	if err != nil {
		return nil, err
	}
	stop := e.terminateOnCancelLocked(ctx)
	defer stop()
	chunkBytes := uintptr(b.chunk * c * h * w * 4)
	for i, bind := range b.bs {
		// Bind on every run: for a GPU session BindInput is where ONNX
		// Runtime copies the input to the device, so a binding kept from
		// an earlier run would feed the model stale data.
		if err := e.bindInputLocked(bind, unsafe.Add(ptr, uintptr(i)*chunkBytes), b.chunk, c, h, w); err != nil {
			return nil, err
		}
		if err := cerr(C.vs_run_binding(e.cs, e.ro, bind)); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("gpu engine: running %s: %w (%v)", e.sess.path, ctx.Err(), err)
			}
			return nil, fmt.Errorf("gpu engine: running %s on %s: %w", e.sess.path, e.backend, err)
		}
	}
	return b.result, nil
}

// stageLocked copies data into the staging buffer, growing it to hold at
// least size floats (a padded batch's).
func (e *Engine) stageLocked(data []float32, size int) (unsafe.Pointer, error) {
	size = max(size, len(data))
	if e.staging == nil || e.staging.n < size {
		if e.staging != nil {
			e.forgetBufferLocked(e.staging)
			e.staging.Free()
			e.staging = nil
		}
		buf, err := e.alloc.Alloc(size)
		if err != nil {
			return nil, fmt.Errorf("gpu engine: staging buffer: %w", err)
		}
		e.staging = buf
	}
	copy(e.staging.Floats(), data)
	return e.staging.ptr, nil
}

func (e *Engine) bindInputLocked(bind *C.OrtIoBinding, ptr unsafe.Pointer, n, c, h, w int) error {
	key := inputKey{ptr, n}
	v, ok := e.inputs[key]
	if !ok {
		if len(e.inputs) >= maxCachedInputs {
			for k, old := range e.inputs {
				C.vs_value_release(old)
				delete(e.inputs, k)
			}
		}
		shape := [4]C.int64_t{C.int64_t(n), C.int64_t(c), C.int64_t(h), C.int64_t(w)}
		// A variable of its own, so that only this path moves one to the
		// heap: the steady state allocates nothing.
		var created *C.OrtValue
		if err := cerr(C.vs_tensor_f32(e.memInfo, (*C.float)(ptr), C.size_t(n*c*h*w), &shape[0], 4, &created)); err != nil {
			return fmt.Errorf("gpu engine: wrapping the input buffer: %w", err)
		}
		v = created
		e.inputs[key] = v
	}
	if err := cerr(C.vs_bind_input(bind, e.inName, v)); err != nil {
		return fmt.Errorf("gpu engine: binding input %q: %w", e.input.Name, err)
	}
	return nil
}

// bindingLocked returns the binding of batch size n, creating it (and its
// output buffers) on first use.
func (e *Engine) bindingLocked(n int) (*binding, error) {
	if b, ok := e.sizes[n]; ok {
		return b, nil
	}
	b := &binding{chunk: n}
	if e.fixedBatch > 0 {
		b.chunk = e.fixedBatch
	}
	chunks := n / b.chunk
	fail := func(err error) (*binding, error) {
		e.releaseBinding(b)
		return nil, err
	}
	b.outVals = make([][]*C.OrtValue, chunks)
	for range chunks {
		var bind *C.OrtIoBinding
		if err := cerr(C.vs_binding_new(e.cs, &bind)); err != nil {
			return fail(fmt.Errorf("gpu engine: creating IoBinding: %w", err))
		}
		b.bs = append(b.bs, bind)
	}
	for i, o := range e.outputs {
		cshape := slices.Clone(o.Shape) // one chunk's shape
		cshape[0] = int64(b.chunk)
		per, ok := floatCount(int64sToInts(cshape)...)
		if !ok || per > maxHostFloats/chunks {
			return fail(fmt.Errorf("gpu engine: output %q of shape %v out of range", o.Name, cshape))
		}
		buf, err := e.alloc.Alloc(per * chunks)
		if err != nil {
			return fail(fmt.Errorf("gpu engine: output %q: %w", o.Name, err))
		}
		b.outBufs = append(b.outBufs, buf)
		dims := make([]C.int64_t, len(cshape))
		for j, d := range cshape {
			dims[j] = C.int64_t(d)
		}
		for k := range chunks {
			var v *C.OrtValue
			at := unsafe.Add(buf.ptr, uintptr(k*per*4))
			if err := cerr(C.vs_tensor_f32(e.memInfo, (*C.float)(at), C.size_t(per), &dims[0], C.size_t(len(dims)), &v)); err != nil {
				return fail(fmt.Errorf("gpu engine: wrapping output %q: %w", o.Name, err))
			}
			b.outVals[k] = append(b.outVals[k], v)
			if err := cerr(C.vs_bind_output(b.bs[k], e.outNames[i], v)); err != nil {
				return fail(fmt.Errorf("gpu engine: binding output %q: %w", o.Name, err))
			}
		}
		shape := slices.Clone(cshape)
		shape[0] = int64(n)
		b.result = append(b.result, engine.Tensor{Name: o.Name, Shape: shape, Data: buf.Floats()})
	}
	e.sizes[n] = b
	return b, nil
}

func int64sToInts(s []int64) []int {
	out := make([]int, len(s))
	for i, v := range s {
		out[i] = int(v)
	}
	return out
}

// dropBindingsLocked frees every binding and cached input value.
func (e *Engine) dropBindingsLocked() {
	clear(e.views)
	for n, b := range e.sizes {
		e.releaseBinding(b)
		delete(e.sizes, n)
	}
	for k, v := range e.inputs {
		C.vs_value_release(v)
		delete(e.inputs, k)
	}
}

func (e *Engine) releaseBinding(b *binding) {
	for _, bind := range b.bs {
		C.vs_binding_release(bind)
	}
	for _, vs := range b.outVals {
		for _, v := range vs {
			C.vs_value_release(v)
		}
	}
	for _, buf := range b.outBufs {
		buf.Free()
	}
}

// CheckBoundOutputs runs GetBoundOutputValues on the binding of batch size
// n and reports an error unless ONNX Runtime's outputs are the engine's own
// buffers: the proof that results are written in place, not copied.
func (e *Engine) CheckBoundOutputs(n int) error {
	e.gate.Lock()
	defer e.gate.Unlock()
	b, ok := e.sizes[e.padSize(n)] // a padded batch runs on its pad size's binding
	if !ok {
		return fmt.Errorf("gpu engine: no binding for batch size %d yet", n)
	}
	ptrs := make([]unsafe.Pointer, len(b.outBufs))
	for k, bind := range b.bs {
		var count C.size_t
		if err := cerr(C.vs_bound_output_data(bind, &ptrs[0], C.size_t(len(ptrs)), &count)); err != nil {
			return fmt.Errorf("gpu engine: reading bound outputs: %w", err)
		}
		if int(count) != len(b.outBufs) {
			return fmt.Errorf("gpu engine: %d bound outputs, want %d", count, len(b.outBufs))
		}
		for i, buf := range b.outBufs {
			per := buf.n / len(b.bs)
			if ptrs[i] != unsafe.Add(buf.ptr, uintptr(k*per*4)) {
				return fmt.Errorf("gpu engine: output %q is in memory of ONNX Runtime's own, not the bound buffer", e.outputs[i].Name)
			}
		}
	}
	return nil
}

// terminateOnCancelLocked makes a cancelled ctx terminate the run in
// flight; the returned func waits for the callback and re-arms the run
// options, so no callback outlives Run.
func (e *Engine) terminateOnCancelLocked(ctx context.Context) func() {
	if ctx.Done() == nil {
		return func() {}
	}
	fired := make(chan struct{})
	stopAfter := context.AfterFunc(ctx, func() {
		defer close(fired)
		if msg := C.vs_run_options_terminate(e.ro, 1); msg != nil {
			C.free(unsafe.Pointer(msg))
		}
	})
	return func() {
		if !stopAfter() {
			<-fired
			if msg := C.vs_run_options_terminate(e.ro, 0); msg != nil {
				C.free(unsafe.Pointer(msg))
			}
		}
	}
}

// Close frees the bindings, buffers and the engine's reference to the
// session. Buffers from AllocBatch stay valid until their free is called.
// A second Close does nothing.
func (e *Engine) Close() error {
	return e.gate.Close(e.free)
}

func (e *Engine) free() error {
	e.dropBindingsLocked()
	if e.staging != nil {
		e.staging.Free()
	}
	// Buffers handed out by AllocBatch belong to their users now.
	clear(e.owned)
	C.vs_memory_info_release(e.pinned)
	C.vs_memory_info_release(e.cpuInfo)
	C.vs_run_options_release(e.ro)
	C.free(unsafe.Pointer(e.inName))
	for _, p := range e.outNames {
		C.free(unsafe.Pointer(p))
	}
	if e.cs != nil {
		e.sess.release()
	}
	return nil
}
