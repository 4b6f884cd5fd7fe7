package batcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
)

// Refusals and failures of the dynamic batcher. They are returned wrapped
// with detail; test with errors.Is.
var (
	// ErrQueueFull: the model's queue has no room for the request's images
	// right now. It is returned at once; the server maps it to
	// codes.ResourceExhausted and the client may retry later.
	ErrQueueFull = errors.New("batch queue full")
	// ErrBatcherClosed: the batcher is shutting down or shut down; the
	// server maps it to codes.Unavailable. Images accepted before Close are
	// still run unless Close's context expires first, in which case those
	// still queued fail with this error too.
	ErrBatcherClosed = errors.New("batcher closed")
	// ErrRequestTooLarge: the request has more images than the queue can
	// ever hold, so retrying cannot help; the server maps it to
	// codes.InvalidArgument.
	ErrRequestTooLarge = errors.New("request has more images than the batch queue holds")
)

// Batch release reasons, as reported to BatchObserver.BatchReleased.
const (
	// ReleaseFull: MaxBatchSize images were waiting.
	ReleaseFull = "full"
	// ReleasePreferred: the waiting images were exactly one of the
	// preferred batch sizes.
	ReleasePreferred = "preferred"
	// ReleaseDelay: the oldest waiting image had waited MaxQueueDelay.
	ReleaseDelay = "delay"
	// ReleaseDeadline: waiting any longer would have made a waiting image
	// miss its request's deadline.
	ReleaseDeadline = "deadline"
	// ReleaseDrain: the batcher is closing and runs what is left at once.
	ReleaseDrain = "drain"
)

// Reasons queued images are dropped without being run, as reported to
// BatchObserver.Dropped.
const (
	DropDeadline = "deadline" // the request's deadline passed while queued
	DropCanceled = "canceled" // the client went away while queued
	DropShutdown = "shutdown" // Close's context expired before they ran
)

// Reasons a request is refused at Submit, as reported to
// BatchObserver.Rejected.
const (
	RejectQueueFull = "queue_full" // ErrQueueFull
	RejectClosed    = "closed"     // ErrBatcherClosed
	RejectTooLarge  = "too_large"  // ErrRequestTooLarge
	RejectExpired   = "expired"    // the deadline had passed or ctx was done
	RejectInvalid   = "invalid"    // a nil item
)

// Item is one image waiting for a batch. The batcher calls Fill once,
// on a batch worker, when the image has been put in a batch, and
// Postprocess once after the engine ran that batch, unless the request
// was cancelled in between. It never calls either after Submit returned,
// so the caller may free the item's resources then.
type Item interface {
	// Fill writes the preprocessed image into its batch slot, exactly
	// C×H×W floats. An error fails only this image.
	Fill(slot []float32) error
	// Postprocess turns row i of the batch outputs into the image's
	// result, which the item keeps. The outputs are only valid during the
	// call; run says how the image was run. An error fails only this
	// image.
	Postprocess(outputs []engine.Tensor, i int, run Run) error
}

// Run describes the engine run an image was part of, for its result.
type Run struct {
	Queue     time.Duration // from Submit to the start of the batch
	Fill      time.Duration // the item's Fill
	Inference time.Duration // the engine run of the whole batch
	Backend   string        // the engine's Backend()
	Size      int           // images in the engine run
}

// Config configures one model's Batcher.
type Config struct {
	// Model names the model in errors and observer events.
	Model string
	// MaxBatchSize is the most images in one engine run (> 0).
	MaxBatchSize int
	// MaxQueueDelay is how long the oldest queued image may wait for more
	// images before a smaller batch is released. 0 releases at once.
	MaxQueueDelay time.Duration
	// PreferredBatchSizes are batch sizes released at once when exactly
	// that many images are waiting, without waiting for MaxQueueDelay
	// (each 1..MaxBatchSize). With [1, 8] and a maximum of 8, a lone image
	// goes at once, while a backlog goes in batches of up to eight (eight
	// at once, fewer once the oldest waited MaxQueueDelay).
	PreferredBatchSizes []int
	// QueueSize is the most images queued and not yet in a batch; a
	// request that does not fit is refused with ErrQueueFull. 0 means
	// 8×MaxBatchSize×len(Engines).
	QueueSize int
	// C, H and W are the shape of one image in the batch buffer.
	C, H, W int
	// Engines are the model's engine instances: one worker goroutine each,
	// so batches run concurrently on all of them. The Batcher does not
	// close them; close them after Batcher.Close returned.
	Engines []engine.Engine
	// Observer receives queue and batch events (metrics, traces). Nil for
	// none.
	Observer BatchObserver
	// FairnessQuantum is how many images a fairness key may put into a
	// batch before the next key with waiting images gets its turn
	// (deficit round robin). 0 means 1: strict image-by-image round robin,
	// so that while fewer than MaxBatchSize keys are waiting, a newly
	// waiting key gets an image into the next batch released.
	FairnessQuantum int
	// DeadlineSlack is the margin kept before a request's deadline, on top
	// of the measured batch run time, when releasing a batch early so that
	// the request makes its deadline. 0 means 2ms.
	DeadlineSlack time.Duration
}

// BatchPanicError is the error a panic in an engine or an item becomes.
type BatchPanicError struct {
	Where string // "engine run", "fill" or "postprocess"
	Value any    // what was passed to panic
	Stack []byte // the panicking goroutine's stack
}

func (e *BatchPanicError) Error() string {
	return fmt.Sprintf("panic in %s: %v", e.Where, e.Value)
}

// Stats is a snapshot of a Batcher's queue, for gauges.
type Stats struct {
	Queued     int           // images waiting for a batch
	Keys       int           // fairness keys with images waiting
	OldestWait time.Duration // how long the oldest waiting image has waited
	Busy       int           // workers filling, running or postprocessing a batch
	Workers    int           // engine instances
}

// Batcher is one model's dynamic batcher: it queues images of concurrent
// requests, forms batches by the release policy in Config, takes
// images from per-key queues round robin so that no key starves the others,
// runs the batches on the engine instances concurrently and hands every
// caller its own results. It is safe for concurrent use.
type Batcher struct {
	model       string
	queueSize   int
	quantum     int
	slack       time.Duration
	observer    BatchObserver // nil: none
	workers     []*batchWorker
	runCtx      context.Context // engine runs; cancelled when Close gives up
	cancelRun   context.CancelFunc
	stopped     chan struct{} // closed when every worker exited
	closeOnce   sync.Once
	workersDone sync.WaitGroup

	mu sync.Mutex // guards the fields below
	// The release policy; SetPolicy (autotune_batcher.go) changes it
	// while the batcher runs.
	maxBatch  int
	delay     time.Duration
	preferred []int // sorted, below maxBatch
	closing   bool
	queued    int                       // images queued, not yet taken
	reserved  int                       // room held by Reserve for images not yet submitted
	keys      map[string]*batchKeyQueue // keys with images queued
	keyFree   []*batchKeyQueue          // emptied key queues for reuse
	cur       *batchKeyQueue            // round-robin cursor into the ring of keys
	ageHead   *batchRequest             // requests with images queued, oldest first
	ageTail   *batchRequest             // newest
	deadlines batchDeadlineHeap         // requests with images queued and a deadline
	idle      []*batchWorker            // workers waiting for images; last is woken first
	busy      int                       // workers with a batch
	estimate  time.Duration             // moving average of a batch's fill+run+postprocess
	seq       uint64                    // batches released
}

// New validates cfg, allocates one batch buffer per engine instance
// (through the engine's BatchAllocator when it has one) and starts one
// worker per instance. Close stops them.
func New(cfg Config) (*Batcher, error) {
	fail := func(format string, args ...any) (*Batcher, error) {
		return nil, fmt.Errorf("batcher for model %q: %s", cfg.Model, fmt.Sprintf(format, args...))
	}
	switch {
	case cfg.MaxBatchSize < 1:
		return fail("max batch size %d, want at least 1", cfg.MaxBatchSize)
	case cfg.MaxQueueDelay < 0:
		return fail("negative max queue delay %v", cfg.MaxQueueDelay)
	case cfg.QueueSize < 0:
		return fail("negative queue size %d", cfg.QueueSize)
	case cfg.C < 1 || cfg.H < 1 || cfg.W < 1:
		return fail("bad image shape %dx%dx%d", cfg.C, cfg.H, cfg.W)
	case len(cfg.Engines) == 0:
		return fail("no engines")
	case cfg.FairnessQuantum < 0:
		return fail("negative fairness quantum %d", cfg.FairnessQuantum)
	case cfg.DeadlineSlack < 0:
		return fail("negative deadline slack %v", cfg.DeadlineSlack)
	}
	var preferred []int
	for _, p := range cfg.PreferredBatchSizes {
		if p < 1 || p > cfg.MaxBatchSize {
			return fail("preferred batch size %d outside 1..%d", p, cfg.MaxBatchSize)
		}
		// MaxBatchSize itself is already released as "full".
		if p < cfg.MaxBatchSize && !slices.Contains(preferred, p) {
			preferred = append(preferred, p)
		}
	}
	slices.Sort(preferred)
	queueSize := cfg.QueueSize
	if queueSize == 0 {
		queueSize = 8 * cfg.MaxBatchSize * len(cfg.Engines)
	}
	quantum := max(cfg.FairnessQuantum, 1)
	slack := cfg.DeadlineSlack
	if slack == 0 {
		slack = 2 * time.Millisecond
	}
	b := &Batcher{
		model:     cfg.Model,
		maxBatch:  cfg.MaxBatchSize,
		delay:     cfg.MaxQueueDelay,
		preferred: preferred,
		queueSize: queueSize,
		quantum:   quantum,
		slack:     slack,
		observer:  cfg.Observer,
		stopped:   make(chan struct{}),
		keys:      make(map[string]*batchKeyQueue),
		idle:      make([]*batchWorker, 0, len(cfg.Engines)),
	}
	for i, e := range cfg.Engines {
		if e == nil {
			b.freeBuffers()
			return fail("engine %d is nil", i)
		}
		w, err := newBatchWorker(b, i, e, cfg.MaxBatchSize, cfg.C, cfg.H, cfg.W)
		if err != nil {
			b.freeBuffers()
			return nil, fmt.Errorf("batcher for model %q: engine %d: %w", cfg.Model, i, err)
		}
		b.workers = append(b.workers, w)
	}
	b.runCtx, b.cancelRun = context.WithCancel(context.Background())
	b.workersDone.Add(len(b.workers))
	for _, w := range b.workers {
		go w.loop()
	}
	go func() {
		b.workersDone.Wait()
		close(b.stopped)
	}()
	return b, nil
}

func (b *Batcher) freeBuffers() {
	for _, w := range b.workers {
		if w.free != nil {
			w.free()
			w.free = nil
		}
	}
}

// Submit queues items, all the images of one request, under a fairness
// key (a stream or client id; "" is shared by all callers without one) and
// waits for their results, returned in the order of items. Images of one
// request may run in different batches.
//
// It refuses at once, queueing nothing: a ctx already done or past its
// deadline, more images than the queue holds (ErrRequestTooLarge), no room
// in the queue now (ErrQueueFull), a closing batcher (ErrBatcherClosed).
// If ctx ends while images are still queued, they are removed unrun and
// Submit returns an error wrapping ctx.Err() (context.DeadlineExceeded or
// context.Canceled); results of images already in a running batch are
// discarded. When some images fail (engine error, Fill or Postprocess
// error, panic), Submit returns an error naming the first failed image;
// the items that did not fail hold their results.
func (b *Batcher) Submit(ctx context.Context, key string, items []Item) error {
	return b.SubmitReserved(ctx, key, items, nil)
}

// Reservation is room in a batcher's queue held for images that are
// still being prepared. Hold it for as short a time as the preparation
// takes; Release returns what SubmitReserved did not use.
type Reservation struct {
	b *Batcher
	n int // images held; 0 once used or released
}

// Reserve holds room for n images of client key in the queue, so that a
// request is refused before its images are decoded rather than after:
// it refuses at once, as Submit would, when the request can never fit
// (ErrRequestTooLarge), when there is no room now (ErrQueueFull) or when
// the batcher is closing (ErrBatcherClosed). Release the reservation, or
// pass it to SubmitReserved.
func (b *Batcher) Reserve(key string, n int) (*Reservation, error) {
	reject := func(reason string, err error) (*Reservation, error) {
		if b.observer != nil {
			b.observer.Rejected(BatchRejectEvent{Model: b.model, Key: key, Images: n, Reason: reason, Err: err})
		}
		return nil, err
	}
	if n > b.queueSize {
		return reject(RejectTooLarge, fmt.Errorf("model %q: %w: %d images, the queue holds %d", b.model, ErrRequestTooLarge, n, b.queueSize))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closing {
		return reject(RejectClosed, fmt.Errorf("model %q: %w", b.model, ErrBatcherClosed))
	}
	if b.queued+b.reserved+n > b.queueSize {
		return reject(RejectQueueFull, fmt.Errorf("model %q: %w: %d of %d images queued or being prepared, request has %d", b.model, ErrQueueFull, b.queued+b.reserved, b.queueSize, n))
	}
	b.reserved += n
	return &Reservation{b: b, n: n}, nil
}

// Release returns the room the reservation still holds. It is safe to
// call more than once, and after SubmitReserved.
func (r *Reservation) Release() {
	if r == nil {
		return
	}
	r.b.mu.Lock()
	defer r.b.mu.Unlock()
	r.b.reserved -= r.n
	r.n = 0
}

// SubmitReserved is Submit for images whose room res holds (nil: none);
// res is used up, whatever the outcome.
func (b *Batcher) SubmitReserved(ctx context.Context, key string, items []Item, res *Reservation) error {
	if res != nil && res.b != b {
		return fmt.Errorf("model %q: a reservation of another batcher", b.model)
	}
	defer res.Release()
	if len(items) == 0 {
		return nil
	}
	reject := func(reason string, err error) error {
		if b.observer != nil {
			b.observer.Rejected(BatchRejectEvent{Model: b.model, Key: key, Images: len(items), Reason: reason, Err: err})
		}
		return err
	}
	for i, it := range items {
		if it == nil {
			return reject(RejectInvalid, fmt.Errorf("model %q: image %d of %d is nil", b.model, i, len(items)))
		}
	}
	if len(items) > b.queueSize {
		return reject(RejectTooLarge, fmt.Errorf("model %q: %w: %d images, the queue holds %d", b.model, ErrRequestTooLarge, len(items), b.queueSize))
	}
	if err := ctx.Err(); err != nil {
		return reject(RejectExpired, fmt.Errorf("model %q: refused before queueing: %w", b.model, err))
	}
	deadline, _ := ctx.Deadline()
	req := &batchRequest{
		ctx:      ctx,
		key:      key,
		items:    items,
		deadline: deadline,
		done:     make(chan struct{}),
		heapIdx:  -1,
		pending:  len(items),
	}

	b.mu.Lock()
	now := time.Now()
	if !deadline.IsZero() && !now.Before(deadline) {
		b.mu.Unlock()
		return reject(RejectExpired, fmt.Errorf("model %q: deadline already passed: %w", b.model, context.DeadlineExceeded))
	}
	if b.closing {
		b.mu.Unlock()
		return reject(RejectClosed, fmt.Errorf("model %q: %w", b.model, ErrBatcherClosed))
	}
	if res != nil {
		// The room held becomes the room queued.
		b.reserved -= res.n
		res.n = 0
	}
	if b.queued+b.reserved+len(items) > b.queueSize {
		queued := b.queued
		b.mu.Unlock()
		return reject(RejectQueueFull, fmt.Errorf("model %q: %w: %d of %d images queued, request has %d", b.model, ErrQueueFull, queued, b.queueSize, len(items)))
	}
	req.enqueued = now
	b.queueAddLocked(req)
	depth := b.queued
	if n := len(b.idle); n > 0 {
		b.idle[n-1].wakeUp()
	}
	b.mu.Unlock()
	if b.observer != nil {
		b.observer.Enqueued(BatchEnqueueEvent{Model: b.model, Key: key, Images: len(items), Depth: depth})
	}

	select {
	case <-req.done:
		if !req.gone.Load() {
			return req.outcome()
		}
		// A worker dropped it at its deadline, maybe a moment before ctx
		// itself noticed: report it like the deadline.
	case <-ctx.Done():
	}
	b.mu.Lock()
	if req.pending == 0 && !req.abandoned {
		// Finished while ctx ended: the results are there, give them.
		b.mu.Unlock()
		return req.outcome()
	}
	dropped, waited := 0, time.Duration(0)
	if !req.abandoned {
		dropped, waited = b.queueAbandonLocked(req, time.Now())
	}
	var released chan struct{}
	if req.active > 0 {
		// A worker is filling or postprocessing one of the images: wait
		// for it, so that the caller may free the items on return.
		req.released = make(chan struct{})
		released = req.released
	}
	b.mu.Unlock()
	if dropped > 0 && b.observer != nil {
		b.observer.Dropped(BatchDropEvent{Model: b.model, Key: key, Images: dropped, Reason: dropReason(ctx.Err()), Waited: waited})
	}
	if released != nil {
		<-released
	}
	err := ctx.Err()
	if err == nil {
		err = context.DeadlineExceeded
	}
	return fmt.Errorf("model %q: request dropped after %v: %w", b.model, time.Since(req.enqueued).Round(time.Microsecond), err)
}

func dropReason(err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return DropDeadline
	}
	return DropCanceled
}

// Stats returns a snapshot of the queue.
func (b *Batcher) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := Stats{Queued: b.queued, Keys: len(b.keys), Busy: b.busy, Workers: len(b.workers)}
	if b.ageHead != nil {
		s.OldestWait = time.Since(b.ageHead.enqueued)
	}
	return s
}

// Close stops accepting requests (Submit returns ErrBatcherClosed), runs
// everything already accepted, stops the workers and waits for them. If
// ctx ends first, the images still queued fail with ErrBatcherClosed, the
// context of the running engine calls is cancelled, and Close still waits
// for those calls to return, so that the caller may close the engines
// afterwards; it then returns an error wrapping ctx.Err(). Calling Close
// again waits for the same shutdown.
func (b *Batcher) Close(ctx context.Context) error {
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closing = true
		for _, w := range b.idle {
			w.wakeUp()
		}
		b.mu.Unlock()
	})
	select {
	case <-b.stopped:
		b.cancelRun()
		return nil
	case <-ctx.Done():
	}
	b.abort()
	<-b.stopped
	return fmt.Errorf("batcher for model %q: closing: %w", b.model, ctx.Err())
}

// abort fails every queued image with ErrBatcherClosed and cancels the
// running engine calls.
func (b *Batcher) abort() {
	type drop struct {
		key    string
		images int
		waited time.Duration
	}
	var drops []drop
	b.mu.Lock()
	now := time.Now()
	for b.ageHead != nil {
		req := b.ageHead
		n := len(req.items) - req.next
		drops = append(drops, drop{req.key, n, now.Sub(req.enqueued)})
		b.queueUnlinkLocked(req, n)
		for i := req.next; i < len(req.items); i++ {
			req.failLocked(i, fmt.Errorf("model %q: %w before the image ran", b.model, ErrBatcherClosed))
		}
		req.next = len(req.items)
	}
	for _, w := range b.idle {
		w.wakeUp()
	}
	b.mu.Unlock()
	// Only now: a run ending early must not find the queue still full and
	// start on it with a cancelled context.
	b.cancelRun()
	if b.observer != nil {
		for _, d := range drops {
			b.observer.Dropped(BatchDropEvent{Model: b.model, Key: d.key, Images: d.images, Reason: DropShutdown, Waited: d.waited})
		}
	}
}
