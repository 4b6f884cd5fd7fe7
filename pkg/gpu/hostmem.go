package gpu

/*
#include <stdlib.h>
#include "ortc.h"
*/
import "C"

import (
	"errors"
	"fmt"
	"sync"
	"unsafe"
)

// MemoryKind says what kind of host memory an allocator hands out.
type MemoryKind string

// Host memory kinds.
const (
	// MemoryPinned is page-locked memory from cudaHostAlloc: the GPU reads
	// it by DMA, so host-to-device copies run at full bus speed and
	// asynchronously.
	MemoryPinned MemoryKind = "cuda-pinned"
	// MemoryPageable is ordinary C heap memory: the no-GPU twin, and the
	// baseline pinned memory is measured against.
	MemoryPageable MemoryKind = "pageable"
)

// HostAllocator hands out float32 buffers outside the Go heap, pinned when
// the CUDA runtime is present. Its memory never moves and may be kept by
// ONNX Runtime between calls, which Go memory may not (cgo pointer rules).
type HostAllocator struct {
	kind   MemoryKind
	reason string // why memory is not pinned; "" when it is
}

var (
	cudaOnce sync.Once
	cudaErr  error
)

// loadCUDARuntime dlopens the CUDA runtime library once per process:
// path when set (the server's --cudart-lib, for a libcudart off the
// loader's path, as in a PyTorch environment), else libcudart.so.13, .12
// or unversioned. It is the only way package gpu reaches CUDA, so
// binaries run where CUDA is absent. The library is process-wide: the
// first call's path wins.
func loadCUDARuntime(path string) error {
	cudaOnce.Do(func() {
		path := C.CString(path)
		defer C.free(unsafe.Pointer(path))
		cudaErr = cerr(C.vs_cuda_load(path))
	})
	return cudaErr
}

// NewHostAllocator returns an allocator of pinned memory when want is
// MemoryPinned and the CUDA runtime (loaded from cudart, or the loader's
// path when empty) with a device is there, else of pageable memory;
// Reason says why it is not pinned.
func NewHostAllocator(want MemoryKind, cudart string) *HostAllocator {
	if want != MemoryPinned {
		return &HostAllocator{kind: MemoryPageable, reason: "pageable memory requested"}
	}
	if err := loadCUDARuntime(cudart); err != nil {
		return &HostAllocator{kind: MemoryPageable, reason: err.Error()}
	}
	return &HostAllocator{kind: MemoryPinned}
}

// Kind reports what memory the allocator hands out.
func (a *HostAllocator) Kind() MemoryKind { return a.kind }

// Reason says why memory is not pinned; "" when it is.
func (a *HostAllocator) Reason() string { return a.reason }

// HostBuffer is one buffer of float32s from a HostAllocator.
type HostBuffer struct {
	ptr  unsafe.Pointer
	n    int
	kind MemoryKind
}

// maxHostFloats bounds one buffer (16 GiB) so a bad size is an error, not
// an attempt to pin all of memory.
const maxHostFloats = 1 << 32

// Alloc returns a zeroed buffer of n float32s.
func (a *HostAllocator) Alloc(n int) (*HostBuffer, error) {
	if n <= 0 || n > maxHostFloats {
		return nil, fmt.Errorf("allocating %d floats of host memory: size out of range (1..%d)", n, maxHostFloats)
	}
	bytes := C.size_t(n) * 4
	var p unsafe.Pointer
	var err error
	if a.kind == MemoryPinned {
		err = cerr(C.vs_cuda_host_alloc(bytes, &p))
	} else {
		err = cerr(C.vs_host_alloc(bytes, &p))
	}
	if err != nil {
		return nil, fmt.Errorf("allocating %d bytes of %s memory: %w", int(bytes), a.kind, err)
	}
	b := &HostBuffer{ptr: p, n: n, kind: a.kind}
	clear(b.Floats())
	return b, nil
}

// Floats is the buffer as a Go slice; it is valid until Free.
func (b *HostBuffer) Floats() []float32 {
	if b.ptr == nil {
		return nil
	}
	return unsafe.Slice((*float32)(b.ptr), b.n)
}

// Kind reports whether the buffer is pinned.
func (b *HostBuffer) Kind() MemoryKind { return b.kind }

// Free releases the buffer; a second call does nothing.
func (b *HostBuffer) Free() error {
	if b.ptr == nil {
		return nil
	}
	p := b.ptr
	b.ptr = nil
	if b.kind == MemoryPinned {
		if err := cerr(C.vs_cuda_host_free(p)); err != nil {
			return fmt.Errorf("freeing pinned memory: %w", err)
		}
		return nil
	}
	C.vs_host_free(p)
	return nil
}

// errNoRuntime is returned where the C API is needed before Init.
var errNoRuntime = errors.New("ONNX Runtime not initialised (call gpu.Init)")
