package client

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// loadCalls is a fake call for Load that takes d and fails every other
// time, and records when each call was answered, whether it failed and
// whether its context had ended.
type loadCalls struct {
	d time.Duration

	mu      sync.Mutex // guards the fields below
	started int
	answers []loadAnswer
}

type loadAnswer struct {
	at       time.Time
	failed   bool
	canceled bool
}

func (c *loadCalls) call(ctx context.Context) error {
	c.mu.Lock()
	c.started++
	fail := c.started%2 == 0
	c.mu.Unlock()
	var err error
	select {
	case <-time.After(c.d):
		if fail {
			err = status.Error(codes.ResourceExhausted, "queue full")
		}
	case <-ctx.Done():
		err = ctx.Err()
	}
	c.mu.Lock()
	c.answers = append(c.answers, loadAnswer{at: time.Now(), failed: err != nil, canceled: ctx.Err() != nil})
	c.mu.Unlock()
	return err
}

// TestLoadCountsCallsRunningAtTheEnd: the calls still running when the
// window ends are waited for and reported as late, not cut short and
// dropped; throughput counts the successes answered within the window.
func TestLoadCountsCallsRunningAtTheEnd(t *testing.T) {
	const window = 100 * time.Millisecond
	c := &loadCalls{d: 60 * time.Millisecond}
	start := time.Now()
	rep := Load(context.Background(), Options{Concurrency: 3, Duration: window}, c.call, io.Discard)

	var failed, okInWindow, late, lateFailed int
	for _, a := range c.answers {
		if a.canceled {
			t.Fatal("a call's context ended: the window's end canceled it")
		}
		if a.failed {
			failed++
		}
		if a.at.Before(start.Add(window)) {
			if !a.failed {
				okInWindow++
			}
		} else {
			late++
			if a.failed {
				lateFailed++
			}
		}
	}
	if rep.Requests != c.started || rep.Canceled != 0 {
		t.Errorf("%d calls made, %d reported and %d canceled", c.started, rep.Requests, rep.Canceled)
	}
	// Each client's last call started within the window and ran past it.
	if late == 0 || rep.Late != late || rep.LateErrors != lateFailed {
		t.Errorf("late %d (%d errors), want %d (%d) and at least one", rep.Late, rep.LateErrors, late, lateFailed)
	}
	if rep.Errors != failed || rep.ErrorCodes[codes.ResourceExhausted.String()] != failed {
		t.Errorf("errors %d %v, want %d", rep.Errors, rep.ErrorCodes, failed)
	}
	if rep.Elapsed != window {
		t.Errorf("elapsed %v, want the window %v", rep.Elapsed, window)
	}
	if want := float64(okInWindow) / window.Seconds(); rep.Throughput() != want {
		t.Errorf("throughput %.1f/s, want %.1f/s: %d successes within the window", rep.Throughput(), want, okInWindow)
	}
	if rep.P99 < c.d {
		t.Errorf("p99 %v below the %v every call takes", rep.P99, c.d)
	}
}

// TestLoadCountsCanceledCalls: calls cut short because ctx ended are
// reported as canceled, and the window ends with ctx.
func TestLoadCountsCanceledCalls(t *testing.T) {
	c := &loadCalls{d: 30 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 80*time.Millisecond)
	defer cancel()
	rep := Load(ctx, Options{Concurrency: 2, Duration: time.Minute}, c.call, io.Discard)
	var canceled int
	for _, a := range c.answers {
		if a.canceled {
			canceled++
		}
	}
	if canceled == 0 || rep.Canceled != canceled || rep.Requests+rep.Canceled != c.started {
		t.Errorf("%d calls made, %d canceled; reported %d answered and %d canceled", c.started, canceled, rep.Requests, rep.Canceled)
	}
	if rep.Late != 0 || rep.Elapsed >= time.Minute {
		t.Errorf("late %d, elapsed %v: the window ends with ctx", rep.Late, rep.Elapsed)
	}
}

// TestLoadRequestsWindow: with --requests alone the window ends with the
// last answer and nothing is late.
func TestLoadRequestsWindow(t *testing.T) {
	c := &loadCalls{d: 5 * time.Millisecond}
	rep := Load(context.Background(), Options{Concurrency: 2, Requests: 7}, c.call, io.Discard)
	if c.started != 7 || rep.Requests != 7 || rep.Late != 0 || rep.Canceled != 0 || rep.Errors != 3 {
		t.Errorf("%d calls made; report %+v, want 7 requests, 3 errors, none late", c.started, rep)
	}
	if want := 4 / rep.Elapsed.Seconds(); rep.Throughput() != want {
		t.Errorf("throughput %.1f/s, want %.1f/s", rep.Throughput(), want)
	}
}
