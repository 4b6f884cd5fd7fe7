package failover

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/visionserve/visionserve/pkg/engine"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeEngine is an engine that fails on demand.
type fakeEngine struct {
	name   string
	mu     sync.Mutex
	fail   error // returned by Run while set
	runs   int
	closed bool
}

func (f *fakeEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.runs++
	if f.fail != nil {
		return nil, f.fail
	}
	return []engine.Tensor{{Name: f.name, Shape: []int64{int64(b.N)}, Data: make([]float32, b.N)}}, nil
}
func (f *fakeEngine) Backend() string { return f.name }
func (f *fakeEngine) Close() error    { f.closed = true; return nil }
func (f *fakeEngine) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// fakeClock is a clock tests move by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

var errCUDA = errors.New("CUDA failure 700: an illegal memory access was encountered")

func batch() *engine.Batch {
	b := engine.NewBatch(2, 3, 4, 4)
	b.N = 2
	return b
}

type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) observe(ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch ev.Kind {
	case StateChanged:
		r.events = append(r.events, fmt.Sprintf("%s->%s", ev.From, ev.To))
	case PrimaryFailed:
		r.events = append(r.events, "fail:"+ev.Backend)
	case FellBack:
		r.events = append(r.events, "fallback:"+ev.Backend)
	}
}

func (r *recorder) take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := strings.Join(r.events, " ")
	r.events = nil
	return s
}

// step is one batch of a breaker scenario.
type step struct {
	advance     time.Duration
	primaryFail error
	wantBackend string // backend that served it; "" means the batch fails
	wantState   State
	wantEvents  string
}

func TestBreaker(t *testing.T) {
	const cooldown = 10 * time.Second
	tests := []struct {
		name  string
		retry bool
		noCPU bool
		steps []step
	}{
		{"healthy GPU serves everything", false, false, []step{
			{wantBackend: "ort-cuda", wantState: Closed},
			{wantBackend: "ort-cuda", wantState: Closed},
		}},
		{"failures fail their batch until the breaker opens", false, false, []step{
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{primaryFail: errCUDA, wantState: Open, wantEvents: "fail:ort-cuda closed->open"},
			{primaryFail: errCUDA, wantBackend: "opencv", wantState: Open, wantEvents: "fallback:opencv"},
			{advance: cooldown - time.Millisecond, primaryFail: errCUDA, wantBackend: "opencv", wantState: Open, wantEvents: "fallback:opencv"},
			// Cooldown over: the probe fails and the breaker reopens.
			{advance: time.Millisecond, primaryFail: errCUDA, wantState: Open, wantEvents: "open->half-open fail:ort-cuda half-open->open"},
			{advance: cooldown / 2, wantBackend: "opencv", wantState: Open, wantEvents: "fallback:opencv"},
			// The GPU recovered: the next probe closes the breaker.
			{advance: cooldown, wantBackend: "ort-cuda", wantState: Closed, wantEvents: "open->half-open half-open->closed"},
			{wantBackend: "ort-cuda", wantState: Closed},
		}},
		{"a success resets the failure count", false, false, []step{
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{wantBackend: "ort-cuda", wantState: Closed},
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
		}},
		{"retry on the fallback loses no batch", true, false, []step{
			{primaryFail: errCUDA, wantBackend: "opencv", wantState: Closed, wantEvents: "fail:ort-cuda fallback:opencv"},
			{primaryFail: errCUDA, wantBackend: "opencv", wantState: Closed, wantEvents: "fail:ort-cuda fallback:opencv"},
			{primaryFail: errCUDA, wantBackend: "opencv", wantState: Open, wantEvents: "fail:ort-cuda closed->open fallback:opencv"},
			{wantBackend: "opencv", wantState: Open, wantEvents: "fallback:opencv"},
			{advance: cooldown, wantBackend: "ort-cuda", wantState: Closed, wantEvents: "open->half-open half-open->closed"},
		}},
		{"no fallback fails fast while open", false, true, []step{
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{primaryFail: errCUDA, wantState: Closed, wantEvents: "fail:ort-cuda"},
			{primaryFail: errCUDA, wantState: Open, wantEvents: "fail:ort-cuda closed->open"},
			{wantState: Open},
			{advance: cooldown, wantBackend: "ort-cuda", wantState: Closed, wantEvents: "open->half-open half-open->closed"},
		}},
		{"input errors and cancellations do not count", false, false, []step{
			{primaryFail: fmt.Errorf("tensor: %w", engine.ErrBadBatch), wantState: Closed},
			{primaryFail: context.DeadlineExceeded, wantState: Closed},
			{primaryFail: context.Canceled, wantState: Closed},
			{primaryFail: fmt.Errorf("wrapped: %w", engine.ErrBadBatch), wantState: Closed},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			gpu, cpu := &fakeEngine{name: "ort-cuda"}, &fakeEngine{name: "opencv"}
			clock := &fakeClock{now: time.Unix(1000, 0)}
			rec := &recorder{}
			var fallback engine.Engine = cpu
			if tt.noCPU {
				fallback = nil
			}
			e := New(gpu, fallback, nil, Options{FailureThreshold: 3, Cooldown: cooldown, RetryOnFallback: tt.retry, Now: clock.Now, Observe: rec.observe})
			for i, s := range tt.steps {
				clock.Advance(s.advance)
				gpu.setFail(s.primaryFail)
				out, err := e.Run(context.Background(), batch())
				if s.wantBackend == "" {
					if err == nil {
						t.Fatalf("step %d: batch succeeded on %s, want it to fail", i, e.Backend())
					}
					backendFault := s.primaryFail == errCUDA || s.primaryFail == nil
					if backendFault && !errors.Is(err, ErrBackendUnavailable) {
						t.Errorf("step %d: error %v does not wrap ErrBackendUnavailable", i, err)
					}
					if !backendFault && errors.Is(err, ErrBackendUnavailable) {
						t.Errorf("step %d: the batch's own error %v became ErrBackendUnavailable", i, err)
					}
				} else {
					if err != nil {
						t.Fatalf("step %d: %v", i, err)
					}
					if out[0].Name != s.wantBackend || e.Backend() != s.wantBackend {
						t.Errorf("step %d: served by %s (Backend %s), want %s", i, out[0].Name, e.Backend(), s.wantBackend)
					}
				}
				if got := e.State(); got != s.wantState {
					t.Errorf("step %d: state %s, want %s", i, got, s.wantState)
				}
				if got := rec.take(); got != s.wantEvents {
					t.Errorf("step %d: events %q, want %q", i, got, s.wantEvents)
				}
			}
		})
	}
}

func TestFallbackFailureIsReported(t *testing.T) {
	gpu := &fakeEngine{name: "ort-cuda", fail: errCUDA}
	cpu := &fakeEngine{name: "opencv", fail: errors.New("opencv: out of memory")}
	e := New(gpu, cpu, nil, Options{RetryOnFallback: true})
	_, err := e.Run(context.Background(), batch())
	if !errors.Is(err, ErrBackendUnavailable) || !strings.Contains(err.Error(), "illegal memory access") || !strings.Contains(err.Error(), "opencv: out of memory") {
		t.Errorf("error %v, want both causes and ErrBackendUnavailable", err)
	}
	if st := e.Stats(); st.FailedBatches != 1 || st.PrimaryFailures != 1 {
		t.Errorf("stats %+v", st)
	}
}

// TestSharedBreakerProbesOnce runs several engine instances over one
// breaker from their own goroutines, as a server does: one GPU failure
// streak opens it for all of them, and after the cooldown only one batch at
// a time probes the GPU.
func TestSharedBreakerProbesOnce(t *testing.T) {
	clock := &fakeClock{now: time.Unix(1000, 0)}
	opts := Options{FailureThreshold: 2, Cooldown: time.Second, Now: clock.Now}
	br := NewBreaker("ort-cuda", opts)
	gpu := &blockingEngine{fakeEngine: fakeEngine{name: "ort-cuda"}, release: make(chan struct{}), started: make(chan struct{}, 8)}
	const instances = 4
	engines := make([]*Engine, instances)
	cpus := make([]*fakeEngine, instances)
	for i := range engines {
		cpus[i] = &fakeEngine{name: "opencv"}
		engines[i] = New(gpu, cpus[i], br, opts)
	}
	gpu.setFail(errCUDA)
	for i := range 2 {
		if _, err := engines[i].Run(context.Background(), batch()); err == nil {
			t.Fatal("failing GPU batch succeeded")
		}
	}
	if br.State() != Open {
		t.Fatalf("state %s after 2 failures across instances, want open", br.State())
	}
	for _, e := range engines {
		if _, err := e.Run(context.Background(), batch()); err != nil || e.Backend() != "opencv" {
			t.Fatalf("open breaker: %v on %s, want opencv", err, e.Backend())
		}
	}

	clock.Advance(time.Second)
	gpu.setFail(nil)
	gpu.block(true)
	var wg sync.WaitGroup
	probe := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, err := engines[0].Run(context.Background(), batch())
		probe <- err
	}()
	<-gpu.started // the probe is on the GPU now
	for _, e := range engines[1:] {
		if _, err := e.Run(context.Background(), batch()); err != nil || e.Backend() != "opencv" {
			t.Errorf("during the probe: %v on %s, want opencv", err, e.Backend())
		}
	}
	close(gpu.release)
	wg.Wait()
	if err := <-probe; err != nil {
		t.Fatal(err)
	}
	if br.State() != Closed {
		t.Errorf("state %s after a good probe, want closed", br.State())
	}
	gpu.block(false)
	for _, e := range engines {
		if _, err := e.Run(context.Background(), batch()); err != nil || e.Backend() != "ort-cuda" {
			t.Errorf("after recovery: %v on %s, want ort-cuda", err, e.Backend())
		}
	}
}

// blockingEngine is a fakeEngine whose runs can be held.
type blockingEngine struct {
	fakeEngine
	blockMu sync.Mutex
	blocked bool
	started chan struct{}
	release chan struct{}
}

func (b *blockingEngine) block(on bool) {
	b.blockMu.Lock()
	defer b.blockMu.Unlock()
	b.blocked = on
}

func (b *blockingEngine) Run(ctx context.Context, batch *engine.Batch) ([]engine.Tensor, error) {
	b.blockMu.Lock()
	blocked := b.blocked
	b.blockMu.Unlock()
	if blocked {
		b.started <- struct{}{}
		<-b.release
	}
	return b.fakeEngine.Run(ctx, batch)
}

func TestAllocBatchAndClose(t *testing.T) {
	gpu, cpu := &fakeEngine{name: "ort-cuda"}, &fakeEngine{name: "opencv"}
	e := New(gpu, cpu, nil, Options{})
	data, free, err := e.AllocBatch(2, 3, 4, 4)
	if err != nil || len(data) != 96 {
		t.Fatalf("AllocBatch: %d floats, %v", len(data), err)
	}
	free()
	if _, _, err := e.AllocBatch(0, 3, 4, 4); err == nil {
		t.Error("AllocBatch accepted an empty batch")
	}
	if err := e.Close(); err != nil || !gpu.closed || !cpu.closed {
		t.Errorf("Close: %v, closed %v %v", err, gpu.closed, cpu.closed)
	}
}
