package engine

import (
	"context"
	"errors"
	"sync"
)

// ErrClosed is the error of a Run on an engine that has been closed.
var ErrClosed = errors.New("engine is closed")

// Gate is the lock an engine's runs go through: one at a time, none after
// Close, and none for a request whose context is already done. The engines
// embed one so that the three of them check the same things in the same
// order. The zero value is open.
type Gate struct {
	mu     sync.Mutex
	closed bool
}

// Enter returns holding the gate unless ctx is done (its error) or the
// engine is closed (ErrClosed). After a nil error the caller must Unlock.
// It allocates nothing, so a steady-state Run stays allocation-free.
func (g *Gate) Enter(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	return nil
}

// Lock holds the gate whether or not the engine is closed, for reading or
// freeing state the runs also use.
func (g *Gate) Lock() { g.mu.Lock() }

// Unlock releases the gate held by Enter or Lock.
func (g *Gate) Unlock() { g.mu.Unlock() }

// Close marks the gate closed and calls free, once, after any Run in
// progress has left. Later calls return nil without calling free.
func (g *Gate) Close(free func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	g.closed = true
	return free()
}
