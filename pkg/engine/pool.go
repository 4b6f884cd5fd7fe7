package engine

import (
	"errors"
	"fmt"
	"sync"
)

// BatchPool reuses batch buffers of one shape so that steady traffic
// allocates none. Buffers come from the engine's BatchAllocator when it
// has one (pinned memory), else from the Go heap. It is safe for
// concurrent use.
type BatchPool struct {
	capN, c, h, w int
	alloc         BatchAllocator // nil: Go heap
	maxIdle       int

	mu     sync.Mutex // guards the fields below
	idle   []*Batch
	frees  map[*Batch]func() // allocator-owned buffers and how to free them
	closed bool
}

// NewBatchPool makes a pool of batches of capN images of c×h×w. At most
// maxIdle unused buffers are kept (1 when maxIdle < 1); alloc may be nil.
func NewBatchPool(capN, c, h, w, maxIdle int, alloc BatchAllocator) (*BatchPool, error) {
	if capN < 1 || c < 1 || h < 1 || w < 1 {
		return nil, fmt.Errorf("batch pool: bad shape %dx%dx%dx%d", capN, c, h, w)
	}
	return &BatchPool{capN: capN, c: c, h: h, w: w, alloc: alloc, maxIdle: max(maxIdle, 1), frees: map[*Batch]func(){}}, nil
}

// Get returns an unused batch with N = 0. Its contents are whatever the
// last user left: every slot in use is overwritten by Fill.
func (p *BatchPool) Get() (*Batch, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, errors.New("batch pool closed")
	}
	if n := len(p.idle); n > 0 {
		b := p.idle[n-1]
		p.idle = p.idle[:n-1]
		b.N = 0
		return b, nil
	}
	if p.alloc == nil {
		return NewBatch(p.capN, p.c, p.h, p.w), nil
	}
	data, free, err := p.alloc.AllocBatch(p.capN, p.c, p.h, p.w)
	if err != nil {
		return nil, fmt.Errorf("allocating batch buffer: %w", err)
	}
	if len(data) != p.capN*p.c*p.h*p.w {
		free()
		return nil, fmt.Errorf("allocating batch buffer: got %d floats, want %d", len(data), p.capN*p.c*p.h*p.w)
	}
	b := &Batch{Cap: p.capN, C: p.c, H: p.h, W: p.w, Data: data}
	p.frees[b] = free
	return b, nil
}

// Put gives a batch back once nothing uses it any more.
func (p *BatchPool) Put(b *Batch) {
	if b == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed && len(p.idle) < p.maxIdle {
		p.idle = append(p.idle, b)
		return
	}
	p.releaseLocked(b)
}

// Close frees the idle buffers; batches still out are freed as they come
// back. It is safe to call more than once.
func (p *BatchPool) Close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for _, b := range p.idle {
		p.releaseLocked(b)
	}
	p.idle = nil
}

func (p *BatchPool) releaseLocked(b *Batch) {
	if free, ok := p.frees[b]; ok {
		delete(p.frees, b)
		free()
	}
	b.Data = nil
}
