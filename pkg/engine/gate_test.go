package engine

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestGate(t *testing.T) {
	var g Gate
	ctx, cancel := context.WithCancel(context.Background())
	if err := g.Enter(ctx); err != nil {
		t.Fatalf("Enter on an open gate: %v", err)
	}
	// Close waits for the run holding the gate and frees once.
	freed := make(chan struct{})
	closed := make(chan error)
	go func() {
		closed <- g.Close(func() error { close(freed); return nil })
	}()
	select {
	case <-freed:
		t.Fatal("Close freed the engine while a run held the gate")
	case <-time.After(20 * time.Millisecond):
	}
	g.Unlock()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := g.Close(func() error { t.Error("second Close freed again"); return nil }); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := g.Enter(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Enter after Close = %v, want ErrClosed", err)
	}
	cancel()
	var open Gate
	if err := open.Enter(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Enter with a cancelled context = %v, want context.Canceled", err)
	}
}
