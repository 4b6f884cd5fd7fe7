package batcher_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
)

// Test images are C×H×W = 1×2×3: small, but more than one float, so that
// the fake engine can check the whole slot was written.
const batchTestC, batchTestH, batchTestW = 1, 2, 3

// batchTestItem is a fake image carrying a unique value: Fill writes it
// into every float of its slot, the fake engine echoes the first and last
// float of each slot into its output row, and Postprocess checks that its
// row holds its own value, so a result can only come back right when every
// image went to the right slot and the right caller.
type batchTestItem struct {
	val       float32
	fillErr   error
	fillPanic bool
	postPanic bool
	fills     atomic.Int32
	posts     atomic.Int32
	res       testResult // set by Postprocess
}

// testResult is what a test item makes of its row and its Run.
type testResult struct {
	Index   int // the value the item found in its row
	Backend string
	// BatchSize is Run.Size.
	BatchSize int
	Timings   batcher.Run
}

// resultOf is implemented by the test items that keep a testResult.
type resultOf interface{ result() testResult }

func (it *batchTestItem) result() testResult { return it.res }

// submit is Submit, returning each item's result in order (zero for the
// items whose Postprocess did not run or failed), or no results at all
// when the request failed without any image's Postprocess succeeding.
func submit(b *batcher.Batcher, ctx context.Context, key string, items []batcher.Item) ([]testResult, error) {
	err := b.Submit(ctx, key, items)
	res := make([]testResult, len(items))
	some := false
	for i, it := range items {
		if r, ok := it.(resultOf); ok {
			res[i] = r.result()
			some = some || res[i] != (testResult{})
		}
	}
	if err != nil && !some {
		return nil, err
	}
	return res, err
}

func (it *batchTestItem) Fill(slot []float32) error {
	it.fills.Add(1)
	if it.fillPanic {
		panic("fill exploded")
	}
	if it.fillErr != nil {
		return it.fillErr
	}
	for i := range slot {
		slot[i] = it.val
	}
	return nil
}

func (it *batchTestItem) Postprocess(outs []engine.Tensor, i int, run batcher.Run) error {
	it.posts.Add(1)
	if it.postPanic {
		panic("postprocess exploded")
	}
	row := outs[0].Data[2*i : 2*i+2]
	if row[0] != it.val || row[1] != it.val {
		return fmt.Errorf("row %d holds %v, want %v", i, row, it.val)
	}
	it.res = testResult{Index: int(it.val), Backend: run.Backend, BatchSize: run.Size, Timings: run}
	return nil
}

// batchTestEngine echoes the first and last float of every slot, records
// each batch's values, and can be held (gate), made to fail or panic on a
// poison value, or made to wait for overlapping runs (barrier).
type batchTestEngine struct {
	name    string
	gate    chan struct{} // when set, every Run takes a token first (or ends with ctx)
	open    chan struct{} // closed by openGate: the gate lets everything through
	once    sync.Once
	started chan int // when set, every Run sends its N when it starts
	poison  float32  // a batch holding this value fails (0: none)
	err     error    // ...with this error, or a panic when nil
	barrier *batchTestBarrier

	out       []float32
	mu        sync.Mutex // guards the fields below
	batches   [][]float32
	dataPtrs  map[*float32]bool
	maxN      int
	inFlight  int
	inFlightM int
}

func (e *batchTestEngine) Backend() string { return e.name }
func (e *batchTestEngine) Close() error    { return nil }

func (e *batchTestEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	vals := make([]float32, b.N)
	for i := range b.N {
		vals[i] = b.Slot(i)[0]
	}
	e.mu.Lock()
	e.batches = append(e.batches, vals)
	e.maxN = max(e.maxN, b.N)
	if e.dataPtrs == nil {
		e.dataPtrs = map[*float32]bool{}
	}
	e.dataPtrs[&b.Data[0]] = true
	e.inFlight++
	e.inFlightM = max(e.inFlightM, e.inFlight)
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.inFlight--
		e.mu.Unlock()
	}()
	if e.started != nil {
		e.started <- b.N
	}
	if e.gate != nil {
		select {
		case <-e.gate:
		case <-e.open:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if e.barrier != nil {
		if err := e.barrier.wait(); err != nil {
			return nil, err
		}
	}
	if e.poison != 0 && slices.Contains(vals, e.poison) {
		if e.err == nil {
			panic("engine exploded")
		}
		return nil, e.err
	}
	if cap(e.out) < 2*b.N {
		e.out = make([]float32, 2*b.Cap)
	}
	out := e.out[:2*b.N]
	for i := range b.N {
		s := b.Slot(i)
		out[2*i], out[2*i+1] = s[0], s[len(s)-1]
	}
	return []engine.Tensor{{Name: "echo", Shape: []int64{int64(b.N), 2}, Data: out}}, nil
}

// newGatedEngine returns an engine whose runs wait for a token on gate.
func newGatedEngine() *batchTestEngine {
	return &batchTestEngine{name: "fake", gate: make(chan struct{}, 100), open: make(chan struct{}), started: make(chan int, 1000)}
}

// openGate lets every run through from now on.
func (e *batchTestEngine) openGate() { e.once.Do(func() { close(e.open) }) }

func (e *batchTestEngine) recorded() [][]float32 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.batches)
}

// batchTestAllocEngine is a batchTestEngine that hands out its own batch
// buffers.
type batchTestAllocEngine struct {
	*batchTestEngine
	allocs, frees atomic.Int32
}

func (e *batchTestAllocEngine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	e.allocs.Add(1)
	return make([]float32, maxN*c*h*w), func() { e.frees.Add(1) }, nil
}

// batchTestBarrier releases its waiters once n are waiting; a waiter gives
// up with an error after a generous timeout.
type batchTestBarrier struct {
	mu      sync.Mutex
	n, seen int
	all     chan struct{}
}

func newBatchTestBarrier(n int) *batchTestBarrier {
	return &batchTestBarrier{n: n, all: make(chan struct{})}
}

func (b *batchTestBarrier) wait() error {
	b.mu.Lock()
	b.seen++
	if b.seen == b.n {
		close(b.all)
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		return nil
	case <-time.After(10 * time.Second):
		return errors.New("barrier: runs did not overlap")
	}
}

// batchTestObserver records the events it is told about.
type batchTestObserver struct {
	batcher.NopBatchObserver
	mu       sync.Mutex
	released []batcher.BatchReleaseEvent
	done     []batcher.BatchDoneEvent
	dropped  []batcher.BatchDropEvent
	rejected []batcher.BatchRejectEvent
	enqueued int
}

func (o *batchTestObserver) Enqueued(batcher.BatchEnqueueEvent) {
	o.mu.Lock()
	o.enqueued++
	o.mu.Unlock()
}

func (o *batchTestObserver) Rejected(e batcher.BatchRejectEvent) {
	o.mu.Lock()
	o.rejected = append(o.rejected, e)
	o.mu.Unlock()
}

func (o *batchTestObserver) Dropped(e batcher.BatchDropEvent) {
	o.mu.Lock()
	o.dropped = append(o.dropped, e)
	o.mu.Unlock()
}

func (o *batchTestObserver) BatchReleased(ctx context.Context, e batcher.BatchReleaseEvent) context.Context {
	e.Requests = slices.Clone(e.Requests)
	o.mu.Lock()
	o.released = append(o.released, e)
	o.mu.Unlock()
	return ctx
}

func (o *batchTestObserver) BatchDone(_ context.Context, e batcher.BatchDoneEvent) {
	o.mu.Lock()
	o.done = append(o.done, e)
	o.mu.Unlock()
}

func (o *batchTestObserver) reasons() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var r []string
	for _, e := range o.released {
		r = append(r, e.Reason)
	}
	return r
}

func (o *batchTestObserver) drops() []batcher.BatchDropEvent {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.dropped)
}

// newTestBatcher starts a batcher with test defaults filled in and closes
// it when the test ends.
func newTestBatcher(t *testing.T, cfg batcher.Config) *batcher.Batcher {
	t.Helper()
	if cfg.Model == "" {
		cfg.Model = "testmodel"
	}
	cfg.C, cfg.H, cfg.W = batchTestC, batchTestH, batchTestW
	b, err := batcher.New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

var batchTestNext atomic.Int64

// batchTestItems makes n items with fresh unique values.
func batchTestItems(n int) ([]batcher.Item, []*batchTestItem) {
	items := make([]batcher.Item, n)
	fakes := make([]*batchTestItem, n)
	for i := range n {
		fakes[i] = &batchTestItem{val: float32(batchTestNext.Add(1))}
		items[i] = fakes[i]
	}
	return items, fakes
}

// checkBatchResults checks that results are exactly the fakes' own values,
// in order.
func checkBatchResults(t *testing.T, res []testResult, fakes []*batchTestItem) {
	t.Helper()
	if len(res) != len(fakes) {
		t.Fatalf("got %d results for %d images", len(res), len(fakes))
	}
	for i, r := range res {
		if r.Index != int(fakes[i].val) {
			t.Fatalf("result %d = %+v, want value %v", i, r, fakes[i].val)
		}
	}
}

// waitUntil polls cond until it holds, failing the test after a generous
// timeout.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

type batchSubmitOutcome struct {
	res []testResult
	err error
}

// submitAsync runs Submit on its own goroutine.
func submitAsync(ctx context.Context, b *batcher.Batcher, key string, items []batcher.Item) <-chan batchSubmitOutcome {
	ch := make(chan batchSubmitOutcome, 1)
	go func() {
		res, err := submit(b, ctx, key, items)
		ch <- batchSubmitOutcome{res, err}
	}()
	return ch
}

func receive(t *testing.T, ch <-chan batchSubmitOutcome) batchSubmitOutcome {
	t.Helper()
	select {
	case o := <-ch:
		return o
	case <-time.After(10 * time.Second):
		t.Fatal("Submit did not return")
		return batchSubmitOutcome{}
	}
}

func TestBatcherConfigValidation(t *testing.T) {
	eng := &batchTestEngine{name: "fake"}
	good := batcher.Config{Model: "m", MaxBatchSize: 4, C: 1, H: 1, W: 1, Engines: []engine.Engine{eng}}
	tests := []struct {
		name   string
		change func(*batcher.Config)
		want   string // "" for valid
	}{
		{"valid", func(*batcher.Config) {}, ""},
		{"preferred sizes", func(c *batcher.Config) { c.PreferredBatchSizes = []int{1, 2, 4} }, ""},
		{"zero max batch", func(c *batcher.Config) { c.MaxBatchSize = 0 }, "max batch size"},
		{"negative delay", func(c *batcher.Config) { c.MaxQueueDelay = -time.Second }, "delay"},
		{"negative queue", func(c *batcher.Config) { c.QueueSize = -1 }, "queue size"},
		{"zero shape", func(c *batcher.Config) { c.H = 0 }, "shape"},
		{"no engines", func(c *batcher.Config) { c.Engines = nil }, "no engines"},
		{"nil engine", func(c *batcher.Config) { c.Engines = []engine.Engine{eng, nil} }, "engine 1 is nil"},
		{"preferred too big", func(c *batcher.Config) { c.PreferredBatchSizes = []int{8} }, "preferred batch size 8"},
		{"preferred zero", func(c *batcher.Config) { c.PreferredBatchSizes = []int{0} }, "preferred batch size 0"},
		{"negative quantum", func(c *batcher.Config) { c.FairnessQuantum = -1 }, "quantum"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := good
			tt.change(&cfg)
			b, err := batcher.New(cfg)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				if err := b.Close(context.Background()); err != nil {
					t.Fatalf("Close: %v", err)
				}
				return
			}
			if err == nil {
				b.Close(context.Background())
				t.Fatalf("New accepted a bad config, want error about %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), `"m"`) {
				t.Fatalf("error %q should name the model and mention %q", err, tt.want)
			}
		})
	}
}

func TestBatcherRefusals(t *testing.T) {
	obs := &batchTestObserver{}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, QueueSize: 8, Observer: obs,
		Engines: []engine.Engine{&batchTestEngine{name: "fake"}},
	})
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	past, cancelPast := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancelPast()
	items9, _ := batchTestItems(9)
	items1, fakes1 := batchTestItems(1)

	tests := []struct {
		name   string
		ctx    context.Context
		items  []batcher.Item
		is     error
		reason string
	}{
		{"too many images", context.Background(), items9, batcher.ErrRequestTooLarge, batcher.RejectTooLarge},
		{"cancelled", cancelled, items1, context.Canceled, batcher.RejectExpired},
		{"deadline passed", past, items1, context.DeadlineExceeded, batcher.RejectExpired},
		{"nil item", context.Background(), []batcher.Item{nil}, nil, batcher.RejectInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := submit(b, tt.ctx, "k", tt.items)
			if err == nil || res != nil {
				t.Fatalf("Submit = %v, %v; want refusal", res, err)
			}
			if tt.is != nil && !errors.Is(err, tt.is) {
				t.Fatalf("error %v is not %v", err, tt.is)
			}
		})
	}
	if n := fakes1[0].fills.Load(); n != 0 {
		t.Errorf("refused image was filled %d times", n)
	}
	obs.mu.Lock()
	var reasons []string
	for _, r := range obs.rejected {
		reasons = append(reasons, r.Reason)
	}
	obs.mu.Unlock()
	want := []string{batcher.RejectTooLarge, batcher.RejectExpired, batcher.RejectExpired, batcher.RejectInvalid}
	if !slices.Equal(reasons, want) {
		t.Errorf("rejection reasons %v, want %v", reasons, want)
	}
	if res, err := submit(b, context.Background(), "k", nil); err != nil || len(res) != 0 {
		t.Errorf("Submit of no images = %v, %v; want no results and no error", res, err)
	}
}

// Many callers with requests of 1..6 images, on several keys and two
// engines: every caller gets exactly its own results, in order, and no
// batch exceeds the maximum.
func TestBatcherConcurrentCallersGetOwnResults(t *testing.T) {
	engines := []*batchTestEngine{{name: "fake-a"}, {name: "fake-b"}}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, MaxQueueDelay: time.Millisecond, PreferredBatchSizes: []int{2},
		QueueSize: 1024, FairnessQuantum: 2,
		Engines: []engine.Engine{engines[0], engines[1]},
	})
	const callers, requests = 24, 15
	var wg sync.WaitGroup
	errs := make(chan error, callers)
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 1))
			for range requests {
				items, fakes := batchTestItems(1 + rng.IntN(6))
				res, err := submit(b, context.Background(), fmt.Sprintf("stream-%d", c%5), items)
				if err != nil {
					errs <- err
					return
				}
				for i, r := range res {
					if r.Index != int(fakes[i].val) {
						errs <- fmt.Errorf("caller %d: result %d = %+v, want %v", c, i, r, fakes[i].val)
						return
					}
					if r.BatchSize < 1 || r.BatchSize > 4 {
						errs <- fmt.Errorf("result says batch size %d", r.BatchSize)
						return
					}
					if r.Backend != "fake-a" && r.Backend != "fake-b" {
						errs <- fmt.Errorf("result says backend %q", r.Backend)
						return
					}
					if r.Timings.Queue < 0 || r.Timings.Inference < 0 || r.Timings.Fill < 0 {
						errs <- fmt.Errorf("negative timings %+v", r.Timings)
						return
					}
				}
				for _, f := range fakes {
					if f.fills.Load() != 1 || f.posts.Load() != 1 {
						errs <- fmt.Errorf("image filled %d and postprocessed %d times, want once each", f.fills.Load(), f.posts.Load())
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for _, e := range engines {
		if e.maxN > 4 {
			t.Errorf("engine %s ran a batch of %d, max is 4", e.name, e.maxN)
		}
	}
	if s := b.Stats(); s.Queued != 0 || s.Keys != 0 {
		t.Errorf("stats after all requests finished: %+v", s)
	}
}

// A request with more images than a batch holds is split across batches
// and gets its results in order.
func TestBatcherSplitsLargeRequest(t *testing.T) {
	eng := &batchTestEngine{name: "fake"}
	obs := &batchTestObserver{}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, MaxQueueDelay: time.Hour, PreferredBatchSizes: []int{2},
		Observer: obs, Engines: []engine.Engine{eng},
	})
	items, fakes := batchTestItems(10)
	res, err := submit(b, context.Background(), "", items)
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	checkBatchResults(t, res, fakes)
	var sizes []int
	for _, bt := range eng.recorded() {
		sizes = append(sizes, len(bt))
	}
	// 10 images: two full batches, then 2 left, a preferred size.
	if !slices.Equal(sizes, []int{4, 4, 2}) {
		t.Errorf("batch sizes %v, want [4 4 2]", sizes)
	}
	if got := obs.reasons(); !slices.Equal(got, []string{"full", "full", "preferred"}) {
		t.Errorf("release reasons %v, want [full full preferred]", got)
	}
	for i, r := range res {
		want := 4
		if i >= 8 {
			want = 2
		}
		if r.BatchSize != want {
			t.Errorf("image %d: BatchSize %d, want %d", i, r.BatchSize, want)
		}
	}
}

func TestBatcherReleaseReasons(t *testing.T) {
	tests := []struct {
		name      string
		delay     time.Duration
		preferred []int
		images    int
		reasons   []string
		minQueue  time.Duration // the smallest Queue timing every image must show
	}{
		{"full", time.Hour, nil, 4, []string{"full"}, 0},
		{"preferred", time.Hour, []int{3}, 3, []string{"preferred"}, 0},
		{"preferred lone image", time.Hour, []int{1, 4}, 1, []string{"preferred"}, 0},
		{"delay", 50 * time.Millisecond, []int{1}, 3, []string{"delay"}, 50 * time.Millisecond},
		{"full then delay", 50 * time.Millisecond, nil, 6, []string{"full", "delay"}, 0},
		{"zero delay", 0, nil, 2, []string{"delay"}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obs := &batchTestObserver{}
			eng := &batchTestEngine{name: "fake"}
			b := newTestBatcher(t, batcher.Config{
				MaxBatchSize: 4, MaxQueueDelay: tt.delay, PreferredBatchSizes: tt.preferred,
				Observer: obs, Engines: []engine.Engine{eng},
			})
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			items, fakes := batchTestItems(tt.images)
			res, err := submit(b, ctx, "", items)
			if err != nil {
				t.Fatalf("Submit: %v", err)
			}
			checkBatchResults(t, res, fakes)
			if got := obs.reasons(); !slices.Equal(got, tt.reasons) {
				t.Errorf("release reasons %v, want %v", got, tt.reasons)
			}
			for i, r := range res {
				if r.Timings.Queue < tt.minQueue {
					t.Errorf("image %d queued %v, released before the delay %v", i, r.Timings.Queue, tt.minQueue)
				}
			}
		})
	}
}

// With a long delay, a request whose deadline nears is released early
// enough to make it.
func TestBatcherReleasesBeforeDeadline(t *testing.T) {
	obs := &batchTestObserver{}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 8, MaxQueueDelay: time.Hour, DeadlineSlack: time.Second,
		Observer: obs, Engines: []engine.Engine{&batchTestEngine{name: "fake"}},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	items, fakes := batchTestItems(2)
	res, err := submit(b, ctx, "", items)
	if err != nil {
		t.Fatalf("Submit: %v (should have been released before its deadline)", err)
	}
	checkBatchResults(t, res, fakes)
	if got := obs.reasons(); !slices.Equal(got, []string{"deadline"}) {
		t.Errorf("release reasons %v, want [deadline]", got)
	}
}

// gatedBatcher returns a batcher on one gated engine with one image (the
// blocker) already running, so that whatever is submitted next stays
// queued until the test releases the gate.
func gatedBatcher(t *testing.T, cfg batcher.Config) (*batcher.Batcher, *batchTestEngine, <-chan batchSubmitOutcome) {
	t.Helper()
	eng := newGatedEngine()
	cfg.Engines = []engine.Engine{eng}
	b := newTestBatcher(t, cfg)
	items, _ := batchTestItems(1)
	blocker := submitAsync(context.Background(), b, "blocker", items)
	select {
	case <-eng.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the blocker's batch did not start")
	}
	// Whatever happens, let the engine finish so the batcher can close.
	t.Cleanup(eng.openGate)
	return b, eng, blocker
}

func TestBatcherDeadlineWhileQueued(t *testing.T) {
	obs := &batchTestObserver{}
	b, eng, blocker := gatedBatcher(t, batcher.Config{MaxBatchSize: 4, Observer: obs})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	items, fakes := batchTestItems(3)
	got := receive(t, submitAsync(ctx, b, "late", items))
	if !errors.Is(got.err, context.DeadlineExceeded) || got.res != nil {
		t.Fatalf("Submit = %v, %v; want DeadlineExceeded", got.res, got.err)
	}
	if s := b.Stats(); s.Queued != 0 {
		t.Errorf("expired images still queued: %+v", s)
	}
	eng.gate <- struct{}{}
	if o := receive(t, blocker); o.err != nil {
		t.Fatalf("blocker: %v", o.err)
	}
	// Run something after, so that a worker would have met the expired
	// images if they were still there.
	more, moreFakes := batchTestItems(1)
	eng.gate <- struct{}{}
	res, err := submit(b, context.Background(), "next", more)
	if err != nil {
		t.Fatalf("Submit after: %v", err)
	}
	checkBatchResults(t, res, moreFakes)
	for i, f := range fakes {
		if f.fills.Load() != 0 || f.posts.Load() != 0 {
			t.Errorf("expired image %d was filled %d and postprocessed %d times", i, f.fills.Load(), f.posts.Load())
		}
	}
	for _, bt := range eng.recorded() {
		for _, f := range fakes {
			if slices.Contains(bt, f.val) {
				t.Errorf("expired image %v ran in batch %v", f.val, bt)
			}
		}
	}
	if d := obs.drops(); len(d) != 1 || d[0].Reason != batcher.DropDeadline || d[0].Images != 3 {
		t.Errorf("drop events %+v, want one deadline drop of 3 images", d)
	}
}

func TestBatcherCancelWhileQueued(t *testing.T) {
	obs := &batchTestObserver{}
	b, eng, blocker := gatedBatcher(t, batcher.Config{MaxBatchSize: 4, Observer: obs})
	ctx, cancel := context.WithCancel(context.Background())
	items, fakes := batchTestItems(2)
	ch := submitAsync(ctx, b, "gone", items)
	waitUntil(t, "the request is queued", func() bool { return b.Stats().Queued == 2 })
	cancel()
	got := receive(t, ch)
	if !errors.Is(got.err, context.Canceled) {
		t.Fatalf("Submit error %v, want Canceled", got.err)
	}
	eng.gate <- struct{}{}
	if o := receive(t, blocker); o.err != nil {
		t.Fatalf("blocker: %v", o.err)
	}
	for i, f := range fakes {
		if f.fills.Load() != 0 || f.posts.Load() != 0 {
			t.Errorf("cancelled image %d was filled %d and postprocessed %d times", i, f.fills.Load(), f.posts.Load())
		}
	}
	if d := obs.drops(); len(d) != 1 || d[0].Reason != batcher.DropCanceled || d[0].Images != 2 {
		t.Errorf("drop events %+v, want one canceled drop of 2 images", d)
	}
}

// A request cancelled while its batch runs returns at once, without
// waiting for the engine, and its images are not postprocessed.
func TestBatcherCancelWhileRunning(t *testing.T) {
	eng := newGatedEngine()
	t.Cleanup(eng.openGate)
	b := newTestBatcher(t, batcher.Config{MaxBatchSize: 4, Engines: []engine.Engine{eng}})
	ctx, cancel := context.WithCancel(context.Background())
	items, fakes := batchTestItems(2)
	ch := submitAsync(ctx, b, "", items)
	<-eng.started
	cancel()
	got := receive(t, ch) // the gate is still shut: the engine is still running
	if !errors.Is(got.err, context.Canceled) {
		t.Fatalf("Submit error %v, want Canceled", got.err)
	}
	eng.gate <- struct{}{}
	waitUntil(t, "the batch finished", func() bool { return b.Stats().Busy == 0 })
	for i, f := range fakes {
		if f.fills.Load() != 1 || f.posts.Load() != 0 {
			t.Errorf("image %d filled %d and postprocessed %d times, want 1 and 0", i, f.fills.Load(), f.posts.Load())
		}
	}
}

func TestBatcherQueueFull(t *testing.T) {
	b, eng, blocker := gatedBatcher(t, batcher.Config{MaxBatchSize: 2, QueueSize: 4})
	type queued struct {
		ch    <-chan batchSubmitOutcome
		fakes []*batchTestItem
	}
	var waiting []queued
	for range 2 {
		items, fakes := batchTestItems(2)
		waiting = append(waiting, queued{submitAsync(context.Background(), b, "", items), fakes})
	}
	waitUntil(t, "the queue is full", func() bool { return b.Stats().Queued == 4 })
	items, fakes := batchTestItems(1)
	// The engine is held, so Submit can only return by refusing.
	got := receive(t, submitAsync(context.Background(), b, "other", items))
	if !errors.Is(got.err, batcher.ErrQueueFull) {
		t.Fatalf("Submit to a full queue: %v, want ErrQueueFull", got.err)
	}
	if fakes[0].fills.Load() != 0 {
		t.Error("refused image was filled")
	}
	for range 3 {
		eng.gate <- struct{}{}
	}
	if o := receive(t, blocker); o.err != nil {
		t.Fatalf("blocker: %v", o.err)
	}
	for _, q := range waiting {
		o := receive(t, q.ch)
		if o.err != nil {
			t.Fatalf("queued request: %v", o.err)
		}
		checkBatchResults(t, o.res, q.fakes)
	}
}

// One key floods the queue; keys that send now and then are served by the
// very next batch, not after the flood.
func TestBatcherFairnessAcrossKeys(t *testing.T) {
	b, eng, blocker := gatedBatcher(t, batcher.Config{MaxBatchSize: 4, QueueSize: 1000})
	var flood []<-chan batchSubmitOutcome
	for range 60 {
		items, _ := batchTestItems(1)
		flood = append(flood, submitAsync(context.Background(), b, "flood", items))
	}
	big, bigFakes := batchTestItems(40)
	flood = append(flood, submitAsync(context.Background(), b, "flood", big))
	waitUntil(t, "the flood is queued", func() bool { return b.Stats().Queued == 100 })
	for round := range 3 {
		var occasional []<-chan batchSubmitOutcome
		var vals []float32
		for k := range 3 {
			items, fakes := batchTestItems(1)
			vals = append(vals, fakes[0].val)
			occasional = append(occasional, submitAsync(context.Background(), b, fmt.Sprintf("cam-%d", k), items))
		}
		// Each round runs one flood image with the occasional ones and
		// four in the batch after.
		want := 100 - 5*round + 3
		waitUntil(t, "the occasional images are queued", func() bool { return b.Stats().Queued == want })
		before := len(eng.recorded())
		eng.gate <- struct{}{} // finish the running batch; the next one starts
		waitUntil(t, "the next batch started", func() bool { return len(eng.recorded()) == before+1 })
		next := eng.recorded()[before]
		for _, v := range vals {
			if !slices.Contains(next, v) {
				t.Fatalf("round %d: occasional image %v not in the next batch %v", round, v, next)
			}
		}
		eng.gate <- struct{}{}
		for _, ch := range occasional {
			if o := receive(t, ch); o.err != nil {
				t.Fatalf("occasional request: %v", o.err)
			}
		}
	}
	eng.openGate() // let the rest run
	if o := receive(t, blocker); o.err != nil {
		t.Fatalf("blocker: %v", o.err)
	}
	for i, ch := range flood {
		o := receive(t, ch)
		if o.err != nil {
			t.Fatalf("flood request %d: %v", i, o.err)
		}
		if i == len(flood)-1 {
			checkBatchResults(t, o.res, bigFakes)
		}
	}
}

// Under real concurrency, a flooding key does not starve the others: each
// occasional request finishes within a bounded number of batches, far
// fewer than the flood's backlog.
func TestBatcherNoStarvationUnderLoad(t *testing.T) {
	eng := &slowEngine{Engine: &batchTestEngine{name: "fake"}, d: 100 * time.Microsecond}
	var runs atomic.Int64
	obs := &batchCountObserver{runs: &runs}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, MaxQueueDelay: time.Millisecond, QueueSize: 400,
		Observer: obs, Engines: []engine.Engine{eng},
	})
	stop := make(chan struct{})
	var flooders sync.WaitGroup
	for range 4 {
		flooders.Add(1)
		go func() {
			defer flooders.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				items, _ := batchTestItems(100)
				_, err := submit(b, context.Background(), "flood", items)
				if errors.Is(err, batcher.ErrQueueFull) {
					time.Sleep(time.Millisecond)
				} else if err != nil {
					t.Errorf("flood: %v", err)
					return
				}
			}
		}()
	}
	waitUntil(t, "the flood has a backlog", func() bool { return b.Stats().Queued >= 200 })
	worst := int64(0)
	for i := range 30 {
		items, fakes := batchTestItems(1)
		before := runs.Load()
		res, err := submit(b, context.Background(), fmt.Sprintf("cam-%d", i%3), items)
		if err != nil {
			t.Fatalf("occasional: %v", err)
		}
		checkBatchResults(t, res, fakes)
		worst = max(worst, runs.Load()-before)
	}
	close(stop)
	flooders.Wait()
	// With fair round robin an occasional image goes into the batch after
	// the one running; 16 leaves room for a descheduled test goroutine,
	// while first-come-first-served would wait behind a backlog of 200
	// or more images, 50 batches.
	if worst > 16 {
		t.Errorf("an occasional request waited %d batches behind the flood", worst)
	}
	t.Logf("worst wait: %d batches", worst)
}

// batchCountObserver counts released batches.
type batchCountObserver struct {
	batcher.NopBatchObserver
	runs *atomic.Int64
}

func (o *batchCountObserver) BatchReleased(ctx context.Context, _ batcher.BatchReleaseEvent) context.Context {
	o.runs.Add(1)
	return ctx
}

// Batches on several engine instances run at the same time: each run
// waits at a barrier until all three are running.
func TestBatcherInstancesRunConcurrently(t *testing.T) {
	barrier := newBatchTestBarrier(3)
	var engines []engine.Engine
	for i := range 3 {
		engines = append(engines, &batchTestEngine{name: fmt.Sprintf("fake-%d", i), barrier: barrier})
	}
	b := newTestBatcher(t, batcher.Config{MaxBatchSize: 2, MaxQueueDelay: time.Hour, Engines: engines})
	// One request of six images: three full batches, formed at once on
	// the three idle engines.
	items, fakes := batchTestItems(6)
	res, err := submit(b, context.Background(), "", items)
	if err != nil {
		t.Fatalf("Submit: %v", err)
	}
	checkBatchResults(t, res, fakes)
	backends := map[string]bool{}
	for _, r := range res {
		backends[r.Backend] = true
	}
	if len(backends) != 3 {
		t.Errorf("results came from %v, want all three engines", backends)
	}
}

func TestBatcherEngineFailureIsolation(t *testing.T) {
	errBoom := errors.New("device lost")
	for _, tt := range []struct {
		name string
		err  error // nil: the engine panics
	}{{"error", errBoom}, {"panic", nil}} {
		t.Run(tt.name, func(t *testing.T) {
			poisoned, poisonFakes := batchTestItems(1)
			eng := &batchTestEngine{name: "fake-backend", poison: poisonFakes[0].val, err: tt.err}
			obs := &batchTestObserver{}
			// Room for all nine requests at once: this is about a failing
			// batch, not a full queue (the default, 8, made it flaky).
			b := newTestBatcher(t, batcher.Config{
				Model: "yolo", MaxBatchSize: 1, QueueSize: 16, Observer: obs, Engines: []engine.Engine{eng},
			})
			var wg sync.WaitGroup
			for range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					items, fakes := batchTestItems(1)
					res, err := submit(b, context.Background(), "", items)
					if err != nil {
						t.Errorf("healthy request failed: %v", err)
						return
					}
					checkBatchResults(t, res, fakes)
				}()
			}
			_, err := submit(b, context.Background(), "", poisoned)
			wg.Wait()
			if err == nil {
				t.Fatal("the poisoned batch succeeded")
			}
			if !strings.Contains(err.Error(), `"yolo"`) || !strings.Contains(err.Error(), "fake-backend") {
				t.Errorf("error %q should name the model and the backend", err)
			}
			var pe *batcher.BatchPanicError
			if tt.err != nil && !errors.Is(err, errBoom) {
				t.Errorf("error %v does not wrap the engine's error", err)
			}
			if tt.err == nil && !errors.As(err, &pe) {
				t.Errorf("error %v is not a BatchPanicError", err)
			}
			if poisonFakes[0].posts.Load() != 0 {
				t.Error("image of a failed batch was postprocessed")
			}
			// The batcher goes on serving.
			items, fakes := batchTestItems(1)
			res, err := submit(b, context.Background(), "", items)
			if err != nil {
				t.Fatalf("after the failure: %v", err)
			}
			checkBatchResults(t, res, fakes)
		})
	}
}

// A failing or panicking image fails alone: the other images of its batch
// and of its own request still get their results.
func TestBatcherItemFailureIsolation(t *testing.T) {
	errBad := errors.New("bad pixels")
	tests := []struct {
		name  string
		spoil func(*batchTestItem)
		check func(error) bool
	}{
		{"fill error", func(it *batchTestItem) { it.fillErr = errBad }, func(err error) bool { return errors.Is(err, errBad) }},
		{"fill panic", func(it *batchTestItem) { it.fillPanic = true }, func(err error) bool {
			var pe *batcher.BatchPanicError
			return errors.As(err, &pe) && pe.Where == "fill" && len(pe.Stack) > 0
		}},
		{"postprocess panic", func(it *batchTestItem) { it.postPanic = true }, func(err error) bool {
			var pe *batcher.BatchPanicError
			return errors.As(err, &pe) && pe.Where == "postprocess"
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newTestBatcher(t, batcher.Config{
				MaxBatchSize: 4, MaxQueueDelay: time.Hour,
				Engines: []engine.Engine{&batchTestEngine{name: "fake"}},
			})
			items, fakes := batchTestItems(4)
			tt.spoil(fakes[1])
			res, err := submit(b, context.Background(), "", items)
			if err == nil || !tt.check(err) {
				t.Fatalf("Submit error %v does not report the spoilt image's failure", err)
			}
			if !strings.Contains(err.Error(), "image 1 of 4") {
				t.Errorf("error %q should name image 1 of 4", err)
			}
			// The others are right: image 2 and 3 moved up a slot when
			// the spoilt image's Fill failed, and their rows still match.
			checkBatchResults(t, []testResult{res[0], res[2], res[3]}, []*batchTestItem{fakes[0], fakes[2], fakes[3]})
		})
	}
}

// Close runs everything accepted before it, refuses what comes after, and
// returns once the workers exited (goleak checks that at the end).
func TestBatcherCloseDrains(t *testing.T) {
	eng := newGatedEngine()
	b, err := batcher.New(batcher.Config{
		Model: "m", MaxBatchSize: 2, MaxQueueDelay: time.Hour, C: 1, H: 1, W: 1,
		Engines: []engine.Engine{eng},
	})
	if err != nil {
		t.Fatal(err)
	}
	type queued struct {
		ch    <-chan batchSubmitOutcome
		fakes []*batchTestItem
	}
	var accepted []queued
	for i := range 5 {
		items, fakes := batchTestItems(1 + i%3)
		accepted = append(accepted, queued{submitAsync(context.Background(), b, fmt.Sprint(i), items), fakes})
	}
	waitUntil(t, "all are accepted", func() bool {
		s := b.Stats()
		return s.Queued+2*s.Busy >= 9 // 9 images, the running batch holds up to 2
	})
	closed := make(chan error, 1)
	go func() { closed <- b.Close(context.Background()) }()
	waitUntil(t, "Close refuses new work", func() bool {
		// A probe accepted before Close began gives up at once.
		ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
		defer cancel()
		items, _ := batchTestItems(1)
		_, err := submit(b, ctx, "", items)
		return errors.Is(err, batcher.ErrBatcherClosed)
	})
	eng.openGate()
	for _, q := range accepted {
		o := receive(t, q.ch)
		if o.err != nil {
			t.Fatalf("accepted request failed: %v", o.err)
		}
		checkBatchResults(t, o.res, q.fakes)
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	if err := b.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
	items, fakes := batchTestItems(1)
	if _, err := submit(b, context.Background(), "", items); !errors.Is(err, batcher.ErrBatcherClosed) {
		t.Errorf("Submit after Close: %v, want ErrBatcherClosed", err)
	}
	if fakes[0].fills.Load() != 0 {
		t.Error("an image submitted after Close was filled")
	}
}

// An idle batcher parks its workers: no polling, no timers ticking.
func TestBatcherIdleBurnsNoCPU(t *testing.T) {
	var engines []engine.Engine
	for range 4 {
		engines = append(engines, &batchTestEngine{name: "fake"})
	}
	b := newTestBatcher(t, batcher.Config{MaxBatchSize: 4, MaxQueueDelay: time.Millisecond, Engines: engines})
	items, fakes := batchTestItems(3) // wake everything once
	res, err := submit(b, context.Background(), "", items)
	if err != nil {
		t.Fatal(err)
	}
	checkBatchResults(t, res, fakes)
	before := batchCPUTime(t)
	time.Sleep(300 * time.Millisecond)
	used := batchCPUTime(t) - before
	// Four polling workers would burn most of the 300ms each.
	if used > 60*time.Millisecond {
		t.Errorf("the idle batcher used %v of CPU in 300ms", used)
	}
	t.Logf("CPU used while idle for 300ms: %v", used)
}

// batchCPUTime is the CPU time this process used so far.
func batchCPUTime(t *testing.T) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Skipf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// When Close's context expires, queued images fail with ErrBatcherClosed,
// the running engine call is cancelled, and Close still waits for it.
func TestBatcherCloseTimeout(t *testing.T) {
	eng := newGatedEngine() // never opened: the run ends by cancellation
	alloc := &batchTestAllocEngine{batchTestEngine: eng}
	b, err := batcher.New(batcher.Config{
		Model: "m", MaxBatchSize: 1, C: 1, H: 1, W: 1, Engines: []engine.Engine{alloc},
	})
	if err != nil {
		t.Fatal(err)
	}
	items, _ := batchTestItems(1)
	running := submitAsync(context.Background(), b, "", items)
	<-eng.started
	more, moreFakes := batchTestItems(3)
	queued := submitAsync(context.Background(), b, "", more)
	waitUntil(t, "the second request is queued", func() bool { return b.Stats().Queued == 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := b.Close(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want DeadlineExceeded", err)
	}
	if o := receive(t, queued); !errors.Is(o.err, batcher.ErrBatcherClosed) {
		t.Errorf("queued request: %v, want ErrBatcherClosed", o.err)
	}
	if o := receive(t, running); !errors.Is(o.err, context.Canceled) {
		t.Errorf("running request: %v, want the engine's cancellation", o.err)
	}
	for _, f := range moreFakes {
		if f.fills.Load() != 0 {
			t.Error("an image queued at shutdown was filled")
		}
	}
	if alloc.allocs.Load() != 1 || alloc.frees.Load() != 1 {
		t.Errorf("batch buffer allocated %d and freed %d times, want once each", alloc.allocs.Load(), alloc.frees.Load())
	}
}

// Each worker allocates its buffer once, through the engine's
// BatchAllocator, and reuses it for every batch.
func TestBatcherReusesAllocatedBuffer(t *testing.T) {
	eng := &batchTestAllocEngine{batchTestEngine: &batchTestEngine{name: "pinned"}}
	b, err := batcher.New(batcher.Config{
		Model: "m", MaxBatchSize: 3, C: 1, H: 2, W: 2, Engines: []engine.Engine{eng},
	})
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		items, fakes := batchTestItems(2)
		res, err := submit(b, context.Background(), "", items)
		if err != nil {
			t.Fatal(err)
		}
		checkBatchResults(t, res, fakes)
	}
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if len(eng.dataPtrs) != 1 {
		t.Errorf("batches ran on %d different buffers, want 1", len(eng.dataPtrs))
	}
	if eng.allocs.Load() != 1 || eng.frees.Load() != 1 {
		t.Errorf("AllocBatch called %d times, free %d times; want 1 and 1", eng.allocs.Load(), eng.frees.Load())
	}
}

// The batcher tells each item the timings it knows, the backend and batch
// size.
func TestBatcherResultFields(t *testing.T) {
	eng := &batchTestEngine{name: "fake-ort"}
	slow := &slowEngine{Engine: eng, d: 20 * time.Millisecond}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, MaxQueueDelay: 30 * time.Millisecond, Engines: []engine.Engine{slow},
	})
	items, fakes := batchTestItems(3)
	res, err := submit(b, context.Background(), "", items)
	if err != nil {
		t.Fatal(err)
	}
	checkBatchResults(t, res, fakes)
	for i, r := range res {
		if r.Backend != "fake-ort" || r.BatchSize != 3 {
			t.Errorf("image %d: backend %q batch size %d, want fake-ort and 3", i, r.Backend, r.BatchSize)
		}
		if r.Timings.Queue < 30*time.Millisecond {
			t.Errorf("image %d: queue %v, less than the delay it waited", i, r.Timings.Queue)
		}
		if r.Timings.Inference < 20*time.Millisecond {
			t.Errorf("image %d: inference %v, less than the engine took", i, r.Timings.Inference)
		}
		if r.Timings.Fill <= 0 {
			t.Errorf("image %d: fill %v, want it measured", i, r.Timings.Fill)
		}
	}
}

// slowEngine takes at least d per run.
type slowEngine struct {
	engine.Engine
	d time.Duration
}

func (e *slowEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	time.Sleep(e.d)
	return e.Engine.Run(ctx, b)
}

// An engine returning outputs that do not match the batch fails the
// batch with an error instead of letting items read rows they lack.
func TestBatcherBadEngineOutputs(t *testing.T) {
	tests := []struct {
		name string
		outs []engine.Tensor
	}{
		{"none", nil},
		{"wrong batch dimension", []engine.Tensor{{Name: "o", Shape: []int64{1, 2}, Data: make([]float32, 2)}}},
		{"data shorter than shape", []engine.Tensor{{Name: "o", Shape: []int64{2, 2}, Data: make([]float32, 3)}}},
		{"scalar", []engine.Tensor{{Name: "o", Data: make([]float32, 1)}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newTestBatcher(t, batcher.Config{
				MaxBatchSize: 2, MaxQueueDelay: time.Hour,
				Engines: []engine.Engine{&enginefake.Engine{RunFunc: func(context.Context, *engine.Batch) ([]engine.Tensor, error) {
					return tt.outs, nil
				}}},
			})
			items, fakes := batchTestItems(2)
			_, err := submit(b, context.Background(), "", items)
			if err == nil || !strings.Contains(err.Error(), "engine returned") {
				t.Fatalf("Submit error %v, want a refusal of the outputs", err)
			}
			for _, f := range fakes {
				if f.posts.Load() != 0 {
					t.Error("an image was postprocessed from bad outputs")
				}
			}
		})
	}
}

type batchTestCtxKey struct{}

// ctxEngine records the value under batchTestCtxKey of each run's context.
type ctxEngine struct {
	batchTestEngine
	mu   sync.Mutex
	seen []any
}

func (e *ctxEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	e.mu.Lock()
	e.seen = append(e.seen, ctx.Value(batchTestCtxKey{}))
	e.mu.Unlock()
	return e.batchTestEngine.Run(ctx, b)
}

// spanObserver tags each batch's context with its sequence number, as a
// tracer would with a span.
type spanObserver struct {
	batchTestObserver
	doneCtx []any
}

func (o *spanObserver) BatchReleased(ctx context.Context, e batcher.BatchReleaseEvent) context.Context {
	o.batchTestObserver.BatchReleased(ctx, e)
	return context.WithValue(ctx, batchTestCtxKey{}, e.Seq)
}

func (o *spanObserver) BatchDone(ctx context.Context, e batcher.BatchDoneEvent) {
	o.batchTestObserver.BatchDone(ctx, e)
	o.mu.Lock()
	o.doneCtx = append(o.doneCtx, ctx.Value(batchTestCtxKey{}))
	o.mu.Unlock()
}

// The observer sees every batch released and done, with matching numbers
// and sizes, the contexts of the requests in it, and the context it
// returns reaches the engine run and BatchDone.
func TestBatcherObserverEvents(t *testing.T) {
	eng := &ctxEngine{batchTestEngine: batchTestEngine{name: "fake"}}
	obs := &spanObserver{}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 3, MaxQueueDelay: time.Hour, Observer: obs, Engines: []engine.Engine{eng},
	})
	type reqKey struct{}
	ctx := context.WithValue(context.Background(), reqKey{}, "request-1")
	items, fakes := batchTestItems(6)
	res, err := submit(b, ctx, "cam", items)
	if err != nil {
		t.Fatal(err)
	}
	checkBatchResults(t, res, fakes)
	// BatchDone comes after the results were handed over.
	waitUntil(t, "both batches are reported done", func() bool {
		obs.mu.Lock()
		defer obs.mu.Unlock()
		return len(obs.done) == 2
	})

	obs.mu.Lock()
	defer obs.mu.Unlock()
	if obs.enqueued != 1 {
		t.Errorf("%d enqueue events, want 1", obs.enqueued)
	}
	if len(obs.released) != 2 || len(obs.done) != 2 {
		t.Fatalf("%d released and %d done events, want 2 and 2", len(obs.released), len(obs.done))
	}
	for i, r := range obs.released {
		d := obs.done[i]
		if r.Seq != d.Seq || r.Size != 3 || d.Size != 3 || d.Backend != "fake" || d.Err != nil || r.Reason != "full" {
			t.Errorf("batch %d: released %+v, done %+v", i, r, d)
		}
		if len(r.Requests) != 1 || r.Requests[0].Value(reqKey{}) != "request-1" {
			t.Errorf("batch %d lists request contexts %v, want the one request", i, r.Requests)
		}
		if r.Model != "testmodel" || d.Model != "testmodel" {
			t.Errorf("batch %d: model %q/%q", i, r.Model, d.Model)
		}
	}
	eng.mu.Lock()
	defer eng.mu.Unlock()
	for i, v := range eng.seen {
		if v != obs.released[i].Seq || obs.doneCtx[i] != obs.released[i].Seq {
			t.Errorf("batch %d: engine saw context tag %v, BatchDone %v, want %v", i, v, obs.doneCtx[i], obs.released[i].Seq)
		}
	}
	if r := res[5]; r.Timings.Queue < 0 || r.BatchSize != 3 {
		t.Errorf("last image result %+v", r)
	}
}

// failingAllocEngine's AllocBatch fails, or returns a buffer of the wrong
// size.
type failingAllocEngine struct {
	batchTestEngine
	short bool
	frees atomic.Int32
}

func (e *failingAllocEngine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	if e.short {
		return make([]float32, maxN*c*h*w-1), func() { e.frees.Add(1) }, nil
	}
	return nil, nil, errors.New("out of pinned memory")
}

// A batch buffer that cannot be had fails New, and the buffers
// already allocated for the other engines are freed.
func TestBatcherAllocationFailure(t *testing.T) {
	for _, short := range []bool{false, true} {
		t.Run(fmt.Sprintf("short=%v", short), func(t *testing.T) {
			good := &batchTestAllocEngine{batchTestEngine: &batchTestEngine{name: "ok"}}
			bad := &failingAllocEngine{short: short}
			_, err := batcher.New(batcher.Config{
				Model: "m", MaxBatchSize: 2, C: 1, H: 1, W: 1, Engines: []engine.Engine{good, bad},
			})
			if err == nil || !strings.Contains(err.Error(), "engine 1") {
				t.Fatalf("New error %v, want one naming engine 1", err)
			}
			if good.allocs.Load() != 1 || good.frees.Load() != 1 {
				t.Errorf("engine 0's buffer allocated %d and freed %d times, want 1 and 1", good.allocs.Load(), good.frees.Load())
			}
			if short && bad.frees.Load() != 1 {
				t.Errorf("the short buffer was freed %d times, want 1", bad.frees.Load())
			}
		})
	}
}

// Chaos: many callers on several keys and two engines, with random
// cancellations, short deadlines, failing and panicking images and a
// failing engine, all at once. Every Submit returns, with its own results
// or an error of an expected kind; no item is touched after its Submit
// returned; nothing is left queued or busy.
func TestBatcherChaos(t *testing.T) {
	errFill := errors.New("bad image")
	errEngine := errors.New("engine hiccup")
	poison := float32(-1) // fakes get positive values; this one never ran
	engines := []engine.Engine{
		&slowEngine{Engine: &batchTestEngine{name: "a"}, d: 300 * time.Microsecond},
		&batchTestEngine{name: "b", poison: poison, err: errEngine},
	}
	b := newTestBatcher(t, batcher.Config{
		MaxBatchSize: 4, MaxQueueDelay: 500 * time.Microsecond, PreferredBatchSizes: []int{1},
		QueueSize: 32, Engines: engines,
	})
	var kinds sync.Map // error kind -> *atomic.Int32, to log what happened
	count := func(kind string) {
		n, _ := kinds.LoadOrStore(kind, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
	}
	type finished struct {
		fakes       []*batchTestItem
		fills, post []int32 // counts when Submit returned
	}
	var (
		mu   sync.Mutex
		done []finished
	)
	var wg sync.WaitGroup
	for c := range 12 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(c), 7))
			for range 40 {
				items, fakes := batchTestItems(1 + rng.IntN(5))
				for _, f := range fakes {
					switch rng.IntN(40) {
					case 0:
						f.fillErr = errFill
					case 1:
						f.fillPanic = true
					case 2:
						f.postPanic = true
					}
				}
				if rng.IntN(30) == 0 {
					fakes[0].val = poison // fails its batch when engine b runs it
				}
				ctx, cancel := context.Background(), context.CancelFunc(func() {})
				switch rng.IntN(5) {
				case 0:
					ctx, cancel = context.WithTimeout(ctx, time.Duration(rng.IntN(3000))*time.Microsecond)
				case 1:
					var cancelNow context.CancelFunc
					ctx, cancelNow = context.WithCancel(ctx)
					timer := time.AfterFunc(time.Duration(rng.IntN(2000))*time.Microsecond, cancelNow)
					cancel = func() { timer.Stop(); cancelNow() }
				}
				res, err := submit(b, ctx, fmt.Sprint("k", rng.IntN(6)), items)
				f := finished{fakes: fakes}
				for _, fk := range fakes {
					f.fills = append(f.fills, fk.fills.Load())
					f.post = append(f.post, fk.posts.Load())
				}
				cancel()
				mu.Lock()
				done = append(done, f)
				mu.Unlock()
				if err == nil {
					count("ok")
					checkBatchResults(t, res, fakes)
					continue
				}
				var pe *batcher.BatchPanicError
				switch {
				case errors.Is(err, context.Canceled):
					count("canceled")
				case errors.Is(err, context.DeadlineExceeded):
					count("deadline")
				case errors.Is(err, batcher.ErrQueueFull):
					count("queue full")
				case errors.Is(err, errFill):
					count("fill error")
				case errors.Is(err, errEngine):
					count("engine error")
				case errors.As(err, &pe):
					count("panic")
				default:
					t.Errorf("unexpected error: %v", err)
				}
				if len(res) != 0 && len(res) != len(fakes) {
					t.Errorf("%d results for %d images", len(res), len(fakes))
				}
			}
		}()
	}
	wg.Wait()
	kinds.Range(func(k, v any) bool {
		t.Logf("%s: %d requests", k, v.(*atomic.Int32).Load())
		return true
	})
	waitUntil(t, "the batcher is idle", func() bool { s := b.Stats(); return s.Queued == 0 && s.Busy == 0 })
	for _, f := range done {
		for i, fk := range f.fakes {
			if fk.fills.Load() != f.fills[i] || fk.posts.Load() != f.post[i] {
				t.Fatalf("an image was filled or postprocessed after its Submit returned")
			}
			if fk.fills.Load() > 1 || fk.posts.Load() > 1 {
				t.Fatalf("an image was filled %d and postprocessed %d times", fk.fills.Load(), fk.posts.Load())
			}
		}
	}
}

// TestReserveHoldsRoom: room reserved for images still being prepared
// counts against the queue, so a request that cannot fit is refused
// before its images are prepared; the room comes back on release, and
// SubmitReserved uses it.
func TestReserveHoldsRoom(t *testing.T) {
	b := newTestBatcher(t, batcher.Config{MaxBatchSize: 2, QueueSize: 4, Engines: []engine.Engine{&batchTestEngine{name: "e"}}})
	r1, err := b.Reserve("a", 3)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Reserve("b", 2); !errors.Is(err, batcher.ErrQueueFull) {
		t.Fatalf("reserve past the room: %v, want ErrQueueFull", err)
	}
	if _, err := b.Reserve("b", 5); !errors.Is(err, batcher.ErrRequestTooLarge) {
		t.Fatalf("reserve past the queue: %v, want ErrRequestTooLarge", err)
	}
	if err := b.Submit(context.Background(), "b", first(batchTestItems(2))); !errors.Is(err, batcher.ErrQueueFull) {
		t.Fatalf("submit into reserved room: %v, want ErrQueueFull", err)
	}
	// The reserved room is used by the one who holds it.
	if err := b.SubmitReserved(context.Background(), "a", first(batchTestItems(3)), r1); err != nil {
		t.Fatal(err)
	}
	r1.Release() // after use: nothing more to return
	r2, err := b.Reserve("b", 4)
	if err != nil {
		t.Fatalf("the whole queue after the reserved request ran: %v", err)
	}
	r2.Release()
	r2.Release()
	if _, err := b.Reserve("c", 4); err != nil {
		t.Fatalf("room not returned by Release: %v", err)
	}
}

func first[A, B any](a A, _ B) A { return a }
