package pipeline

import (
	"errors"
	"fmt"
	"sync"
)

// ErrDecodeBudget: decoding the image now would take the decode memory
// budget past its size; others are decoding. It is not the client's
// fault, and a retry may succeed (ResourceExhausted at the server).
var ErrDecodeBudget = errors.New("decode memory budget spent")

// DecodeBudget bounds the memory that images being decoded take at once,
// across every request and model of a process. Before an image is
// decoded its decoded size is reserved (width × height × 3 bytes at the
// size it decodes to, read from the header; twice that when EXIF turns
// it); the reservation is returned once the decoded image is freed. A
// small file that claims a large image thus costs its reservation before
// any decoder allocates. It is safe for concurrent use; a nil budget
// bounds nothing.
type DecodeBudget struct {
	size int64

	mu   sync.Mutex // guards used
	used int64
}

// NewDecodeBudget returns a budget of size bytes.
func NewDecodeBudget(size int64) (*DecodeBudget, error) {
	if size <= 0 {
		return nil, fmt.Errorf("decode memory budget %d: want a positive size", size)
	}
	return &DecodeBudget{size: size}, nil
}

// Size is the budget's size in bytes.
func (b *DecodeBudget) Size() int64 {
	if b == nil {
		return 0
	}
	return b.size
}

// InUse is how much of the budget is reserved now.
func (b *DecodeBudget) InUse() int64 {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.used
}

// reserve takes n bytes, or refuses at once: with ErrTooManyPixels when
// n is more than the whole budget (the image can never be decoded here),
// with ErrDecodeBudget when the budget is spent for now.
func (b *DecodeBudget) reserve(n int64) error {
	if b == nil || n <= 0 {
		return nil
	}
	if n > b.size {
		return fmt.Errorf("decoding it takes %d MiB, more than the whole decode budget of %d MiB: %w", n>>20, b.size>>20, ErrTooManyPixels)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n > b.size {
		return fmt.Errorf("decoding it takes %d MiB and %d of %d MiB are being decoded; retry later: %w", n>>20, b.used>>20, b.size>>20, ErrDecodeBudget)
	}
	b.used += n
	return nil
}

// release returns n bytes reserved earlier.
func (b *DecodeBudget) release(n int64) {
	if b == nil || n <= 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.used -= n
}
