package pipeline

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"
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

// BatchItem is one image waiting for a batch. The batcher calls Fill once,
// on a batch worker, when the image has been put in a batch, and
// Postprocess once after the engine ran that batch, unless the request
// was cancelled in between. It never calls either after Submit returned,
// so the caller may free the item's resources then.
type BatchItem interface {
	// Fill writes the preprocessed image into its batch slot, exactly
	// C×H×W floats. An error fails only this image. The batcher adds the
	// time Fill took to Result.Timings.Preprocess.
	Fill(slot []float32) error
	// Postprocess turns row i of the batch outputs into the image's
	// result. The outputs are only valid during the call. The batcher then
	// sets Timings.Queue, Timings.Inference, Timings.Postprocess, Backend
	// and BatchSize of the result.
	Postprocess(outputs []Tensor, i int) (Result, error)
}

// BatcherConfig configures one model's Batcher.
type BatcherConfig struct {
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
	// goes at once, while a backlog is batched by eight.
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
	Engines []Engine
	// Observer receives queue and batch events (metrics, traces). Nil for
	// none.
	Observer BatchObserver
	// FairnessQuantum is how many images a fairness key may put into a
	// batch before the next key with waiting images gets its turn
	// (deficit round robin). 0 means 1: strict image-by-image round robin,
	// so a newly waiting key is served by the next batch released.
	FairnessQuantum int
	// DeadlineSlack is the margin kept before a request's deadline, on top
	// of the measured batch run time, when releasing a batch early so that
	// the request makes its deadline. 0 means 2ms.
	DeadlineSlack time.Duration
}

// BatchObserver receives the batcher's events, for metrics and traces.
// Methods are called synchronously from Submit and from the batch workers,
// concurrently, never with the batcher's lock held; they must be fast,
// must not block and must not call back into the Batcher. Embed
// NopBatchObserver to implement only some of them.
type BatchObserver interface {
	// Enqueued: a request's images entered the queue.
	Enqueued(e BatchEnqueueEvent)
	// Rejected: Submit refused a request without queueing it.
	Rejected(e BatchRejectEvent)
	// Dropped: queued images of a request were removed without being run.
	Dropped(e BatchDropEvent)
	// BatchReleased: a worker took a batch off the queue and is about to
	// fill and run it. The context returned is passed to Engine.Run and
	// to BatchDone (return ctx itself, or one carrying a trace span).
	BatchReleased(ctx context.Context, e BatchReleaseEvent) context.Context
	// BatchDone: a batch finished: its engine run and its postprocessing.
	BatchDone(ctx context.Context, e BatchDoneEvent)
}

// BatchEnqueueEvent describes a request accepted into the queue.
type BatchEnqueueEvent struct {
	Model  string
	Key    string // fairness key
	Images int
	Depth  int // images queued after it entered
}

// BatchRejectEvent describes a request Submit refused.
type BatchRejectEvent struct {
	Model  string
	Key    string
	Images int
	Reason string // RejectQueueFull, RejectClosed, RejectTooLarge, RejectExpired, RejectInvalid
	Err    error
}

// BatchDropEvent describes queued images removed without being run.
type BatchDropEvent struct {
	Model  string
	Key    string
	Images int
	Reason string        // DropDeadline, DropCanceled or DropShutdown
	Waited time.Duration // how long they had been queued
}

// BatchReleaseEvent describes a batch taken off the queue.
type BatchReleaseEvent struct {
	Model  string
	Worker int    // index of the engine instance that runs it
	Seq    uint64 // batch number, unique per Batcher; BatchDone repeats it
	Size   int    // images taken (some may still be skipped if cancelled)
	Reason string // ReleaseFull, ReleasePreferred, ReleaseDelay, ReleaseDeadline, ReleaseDrain
	// Depth is the number of images still queued after it was taken.
	Depth int
	// OldestWait is how long the batch's longest-waiting image waited.
	OldestWait time.Duration
	// Requests holds the contexts of the requests with images in the
	// batch, each once (to link their traces). The slice is reused after
	// the call returns: copy what you keep.
	Requests []context.Context
}

// BatchDoneEvent describes a finished batch.
type BatchDoneEvent struct {
	Model   string
	Worker  int
	Seq     uint64
	Backend string
	// Size is the number of images the engine ran (0 when all images were
	// cancelled or failed to fill, and nothing ran).
	Size int
	// Inference is the engine run; Total is from release to the last
	// result delivered (fill, run and postprocess).
	Inference, Total time.Duration
	// Err is the engine's failure, nil when the run succeeded. Failures of
	// single images (Fill, Postprocess) are not reported here.
	Err error
}

// NopBatchObserver ignores every event; embed it in an observer that
// implements only some methods.
type NopBatchObserver struct{}

// Enqueued does nothing.
func (NopBatchObserver) Enqueued(BatchEnqueueEvent) {}

// Rejected does nothing.
func (NopBatchObserver) Rejected(BatchRejectEvent) {}

// Dropped does nothing.
func (NopBatchObserver) Dropped(BatchDropEvent) {}

// BatchReleased returns ctx.
func (NopBatchObserver) BatchReleased(ctx context.Context, _ BatchReleaseEvent) context.Context {
	return ctx
}

// BatchDone does nothing.
func (NopBatchObserver) BatchDone(context.Context, BatchDoneEvent) {}

// BatchPanicError is the error a panic in an engine or an item becomes.
type BatchPanicError struct {
	Where string // "engine run", "fill" or "postprocess"
	Value any    // what was passed to panic
	Stack []byte // the panicking goroutine's stack
}

func (e *BatchPanicError) Error() string {
	return fmt.Sprintf("panic in %s: %v", e.Where, e.Value)
}

// BatcherStats is a snapshot of a Batcher's queue, for gauges.
type BatcherStats struct {
	Queued     int           // images waiting for a batch
	Keys       int           // fairness keys with images waiting
	OldestWait time.Duration // how long the oldest waiting image has waited
	Busy       int           // workers filling, running or postprocessing a batch
	Workers    int           // engine instances
}

// Batcher is one model's dynamic batcher: it queues images of concurrent
// requests, forms batches by the release policy in BatcherConfig, takes
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

// NewBatcher validates cfg, allocates one batch buffer per engine instance
// (through the engine's BatchAllocator when it has one) and starts one
// worker per instance. Close stops them.
func NewBatcher(cfg BatcherConfig) (*Batcher, error) {
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
// error, panic), Submit returns an error naming the first failed image
// together with the results, where the failed ones are zero.
func (b *Batcher) Submit(ctx context.Context, key string, items []BatchItem) ([]Result, error) {
	if len(items) == 0 {
		return []Result{}, nil
	}
	reject := func(reason string, err error) ([]Result, error) {
		if b.observer != nil {
			b.observer.Rejected(BatchRejectEvent{Model: b.model, Key: key, Images: len(items), Reason: reason, Err: err})
		}
		return nil, err
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
		results:  make([]Result, len(items)),
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
	if b.queued+len(items) > b.queueSize {
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
		return req.outcome(b.model)
	case <-ctx.Done():
	}
	b.mu.Lock()
	if req.pending == 0 && !req.abandoned {
		// Finished while ctx ended: the results are there, give them.
		b.mu.Unlock()
		return req.outcome(b.model)
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
	return nil, fmt.Errorf("model %q: request dropped after %v: %w", b.model, time.Since(req.enqueued).Round(time.Microsecond), ctx.Err())
}

func dropReason(err error) string {
	if errors.Is(err, context.DeadlineExceeded) {
		return DropDeadline
	}
	return DropCanceled
}

// Stats returns a snapshot of the queue.
func (b *Batcher) Stats() BatcherStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := BatcherStats{Queued: b.queued, Keys: len(b.keys), Busy: b.busy, Workers: len(b.workers)}
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
	b.cancelRun()
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
	if b.observer != nil {
		for _, d := range drops {
			b.observer.Dropped(BatchDropEvent{Model: b.model, Key: d.key, Images: d.images, Reason: DropShutdown, Waited: d.waited})
		}
	}
}

// batchRequest is one Submit call. Its fields after the first block are
// guarded by Batcher.mu.
type batchRequest struct {
	ctx      context.Context
	key      string
	items    []BatchItem
	results  []Result // written by workers for distinct images; read after done
	deadline time.Time
	enqueued time.Time
	done     chan struct{} // closed when pending reaches 0
	// gone mirrors abandoned for a lock-free check before Fill.
	gone atomic.Bool

	next      int           // items[next:] are still queued
	pending   int           // images not finished: queued or in a batch
	active    int           // images a worker is filling or postprocessing now
	abandoned bool          // ctx ended: skip what is left, deliver nothing
	released  chan struct{} // closed when abandoned and active reaches 0
	nerr      int
	firstErr  error
	errIdx    int
	lastSeq   uint64 // last batch that listed this request's context

	kq               *batchKeyQueue
	kprev, knext     *batchRequest // FIFO of its key
	ageprev, agenext *batchRequest // all requests with images queued, by age
	heapIdx          int           // in Batcher.deadlines, -1 when not there
}

// failLocked records the failure of image i.
func (r *batchRequest) failLocked(i int, err error) {
	if r.nerr == 0 || i < r.errIdx {
		r.firstErr, r.errIdx = err, i
	}
	r.nerr++
	r.finishLocked()
}

// finishLocked counts one image as finished.
func (r *batchRequest) finishLocked() {
	r.pending--
	if r.pending == 0 {
		close(r.done)
	}
}

// outcome is what Submit returns once every image finished.
func (r *batchRequest) outcome(model string) ([]Result, error) {
	switch {
	case r.nerr == 0:
		return r.results, nil
	case len(r.items) == 1:
		return r.results, r.firstErr
	case r.nerr == 1:
		return r.results, fmt.Errorf("image %d of %d: %w", r.errIdx, len(r.items), r.firstErr)
	default:
		return r.results, fmt.Errorf("image %d of %d (and %d more failed): %w", r.errIdx, len(r.items), r.nerr-1, r.firstErr)
	}
}

// batchKeyQueue holds the queued requests of one fairness key. It is in
// the ring of keys exactly while it has images queued. Guarded by
// Batcher.mu.
type batchKeyQueue struct {
	key        string
	head, tail *batchRequest
	queued     int // images
	deficit    int // images it may still take in its current turn
	prev, next *batchKeyQueue
}

// queueAddLocked appends req to its key's queue, the age list and the
// deadline heap.
func (b *Batcher) queueAddLocked(req *batchRequest) {
	kq := b.keys[req.key]
	if kq == nil {
		if n := len(b.keyFree); n > 0 {
			kq = b.keyFree[n-1]
			b.keyFree = b.keyFree[:n-1]
			kq.key = req.key
		} else {
			kq = &batchKeyQueue{key: req.key}
		}
		b.keys[req.key] = kq
		// A new key joins at the end of the current round.
		if b.cur == nil {
			kq.prev, kq.next = kq, kq
			b.cur = kq
		} else {
			last := b.cur.prev
			kq.prev, kq.next = last, b.cur
			last.next = kq
			b.cur.prev = kq
		}
	}
	req.kq = kq
	req.kprev = kq.tail
	if kq.tail != nil {
		kq.tail.knext = req
	} else {
		kq.head = req
	}
	kq.tail = req
	kq.queued += len(req.items)

	req.ageprev = b.ageTail
	if b.ageTail != nil {
		b.ageTail.agenext = req
	} else {
		b.ageHead = req
	}
	b.ageTail = req

	if !req.deadline.IsZero() {
		heap.Push(&b.deadlines, req)
	}
	b.queued += len(req.items)
}

// queueUnlinkLocked removes req, whose last n queued images are leaving
// the queue, from its key's queue, the age list and the deadline heap,
// and drops its key from the ring when nothing of it is left.
func (b *Batcher) queueUnlinkLocked(req *batchRequest, n int) {
	kq := req.kq
	kq.queued -= n
	b.queued -= n
	if req.kprev != nil {
		req.kprev.knext = req.knext
	} else {
		kq.head = req.knext
	}
	if req.knext != nil {
		req.knext.kprev = req.kprev
	} else {
		kq.tail = req.kprev
	}
	req.kprev, req.knext = nil, nil

	if req.ageprev != nil {
		req.ageprev.agenext = req.agenext
	} else {
		b.ageHead = req.agenext
	}
	if req.agenext != nil {
		req.agenext.ageprev = req.ageprev
	} else {
		b.ageTail = req.ageprev
	}
	req.ageprev, req.agenext = nil, nil

	if req.heapIdx >= 0 {
		heap.Remove(&b.deadlines, req.heapIdx)
	}
	if kq.head == nil {
		b.queueDropKeyLocked(kq)
	}
}

// queueDropKeyLocked takes an empty key out of the ring and the map.
func (b *Batcher) queueDropKeyLocked(kq *batchKeyQueue) {
	if kq.next == kq {
		b.cur = nil
	} else {
		if b.cur == kq {
			b.cur = kq.next
		}
		kq.prev.next = kq.next
		kq.next.prev = kq.prev
	}
	delete(b.keys, kq.key)
	// Streams come and go with every request; keep a few key queues so
	// that steady traffic allocates none.
	*kq = batchKeyQueue{}
	if len(b.keyFree) < batchKeyFreeMax {
		b.keyFree = append(b.keyFree, kq)
	}
}

// batchKeyFreeMax bounds the key queues kept for reuse.
const batchKeyFreeMax = 256

// queueAbandonLocked removes what is left of req from the queue because
// its context ended, marks it abandoned so that workers skip its images,
// and returns how many queued images it dropped and how long they waited.
func (b *Batcher) queueAbandonLocked(req *batchRequest, now time.Time) (int, time.Duration) {
	req.abandoned = true
	req.gone.Store(true)
	n := len(req.items) - req.next
	if n == 0 {
		return 0, 0
	}
	b.queueUnlinkLocked(req, n)
	req.next = len(req.items)
	req.pending -= n
	if req.pending == 0 {
		close(req.done)
	}
	return n, now.Sub(req.enqueued)
}

// batchDecideLocked applies the release policy: how many images to take
// now and why, or else how long to wait before deciding again (0: until
// woken).
func (b *Batcher) batchDecideLocked(now time.Time) (n int, reason string, wait time.Duration) {
	q := b.queued
	switch {
	case q == 0:
		return 0, "", 0
	case b.closing:
		return min(q, b.maxBatch), ReleaseDrain, 0
	case q >= b.maxBatch:
		return b.maxBatch, ReleaseFull, 0
	case slices.Contains(b.preferred, q):
		return q, ReleasePreferred, 0
	}
	// From here on fewer than maxBatch images wait, so a batch takes all.
	delayAt := b.ageHead.enqueued.Add(b.delay)
	if !now.Before(delayAt) {
		return q, ReleaseDelay, 0
	}
	wait = delayAt.Sub(now)
	if len(b.deadlines) > 0 {
		// Release when the earliest deadline minus a batch's run time
		// and the slack is reached.
		at := b.deadlines[0].deadline.Add(-b.estimate - b.slack)
		if !now.Before(at) {
			return q, ReleaseDeadline, 0
		}
		wait = min(wait, at.Sub(now))
	}
	return 0, "", wait
}

// batchDeadlineHeap orders requests by deadline, earliest first.
type batchDeadlineHeap []*batchRequest

func (h batchDeadlineHeap) Len() int           { return len(h) }
func (h batchDeadlineHeap) Less(i, j int) bool { return h[i].deadline.Before(h[j].deadline) }
func (h batchDeadlineHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].heapIdx = i
	h[j].heapIdx = j
}
func (h *batchDeadlineHeap) Push(x any) {
	r := x.(*batchRequest)
	r.heapIdx = len(*h)
	*h = append(*h, r)
}
func (h *batchDeadlineHeap) Pop() any {
	old := *h
	r := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	r.heapIdx = -1
	return r
}

// batchEntry is one image in a worker's current batch.
type batchEntry struct {
	req  *batchRequest
	idx  int           // index in req.items
	slot int           // slot in the batch; -1 when it has no result to deliver
	fill time.Duration // time Fill took
	err  error         // this image's failure, delivered with slot -1
}

// batchWorker runs batches on one engine instance. Everything but wake is
// owned by its goroutine.
type batchWorker struct {
	b       *Batcher
	id      int
	engine  Engine
	backend string
	batch   *Batch
	free    func() // frees batch.Data when it came from a BatchAllocator
	wake    chan struct{}
	timer   *time.Timer
	entries []batchEntry
	ctxs    []context.Context
	drops   []BatchDropEvent
}

func newBatchWorker(b *Batcher, id int, e Engine, maxN, c, h, w int) (*batchWorker, error) {
	wk := &batchWorker{
		b:       b,
		id:      id,
		engine:  e,
		backend: e.Backend(),
		wake:    make(chan struct{}, 1),
		entries: make([]batchEntry, 0, maxN),
		ctxs:    make([]context.Context, 0, maxN),
	}
	if alloc, ok := e.(BatchAllocator); ok {
		data, free, err := alloc.AllocBatch(maxN, c, h, w)
		if err != nil {
			return nil, fmt.Errorf("allocating batch buffer: %w", err)
		}
		if len(data) != maxN*c*h*w {
			if free != nil {
				free()
			}
			return nil, fmt.Errorf("allocating batch buffer: got %d floats, want %d", len(data), maxN*c*h*w)
		}
		wk.batch = &Batch{Cap: maxN, C: c, H: h, W: w, Data: data}
		wk.free = free
	} else {
		wk.batch = NewBatch(maxN, c, h, w)
	}
	wk.timer = time.NewTimer(time.Hour)
	wk.timer.Stop()
	return wk, nil
}

// wakeUp makes the worker re-evaluate the queue; it never blocks.
func (w *batchWorker) wakeUp() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *batchWorker) loop() {
	defer w.b.workersDone.Done()
	defer func() {
		w.timer.Stop()
		if w.free != nil {
			w.free()
			w.free = nil
		}
	}()
	for {
		reason, start, ok := w.take()
		if !ok {
			return
		}
		w.run(reason, start)
	}
}

// take waits until the release policy lets it take a batch and takes it
// into w.entries. It returns false when the batcher is closed and empty.
func (w *batchWorker) take() (reason string, start time.Time, ok bool) {
	b := w.b
	b.mu.Lock()
	for {
		now := time.Now()
		n, why, wait := b.batchDecideLocked(now)
		if n > 0 {
			w.takeLocked(n, now)
			if len(w.entries) == 0 {
				// Everything it looked at had expired; decide again.
				w.reportDropsUnlocked()
				continue
			}
			b.busy++
			if b.queued > 0 && len(b.idle) > 0 {
				// More is waiting: let another idle worker look at it.
				b.idle[len(b.idle)-1].wakeUp()
			}
			b.mu.Unlock()
			w.reportDrops()
			return why, now, true
		}
		if b.closing && b.queued == 0 {
			b.mu.Unlock()
			return "", time.Time{}, false
		}
		b.idle = append(b.idle, w)
		b.mu.Unlock()
		w.reportDrops()
		if wait > 0 {
			w.timer.Reset(wait)
			select {
			case <-w.wake:
			case <-w.timer.C:
			}
			w.timer.Stop()
		} else {
			<-w.wake
		}
		b.mu.Lock()
		if i := slices.Index(b.idle, w); i >= 0 {
			b.idle = slices.Delete(b.idle, i, i+1)
		}
	}
}

// reportDropsUnlocked reports drops while the caller holds the lock: it
// releases the lock around the calls.
func (w *batchWorker) reportDropsUnlocked() {
	if len(w.drops) == 0 {
		return
	}
	w.b.mu.Unlock()
	w.reportDrops()
	w.b.mu.Lock()
}

func (w *batchWorker) reportDrops() {
	if w.b.observer != nil {
		for _, d := range w.drops {
			w.b.observer.Dropped(d)
		}
	}
	clear(w.drops)
	w.drops = w.drops[:0]
}

// takeLocked takes up to n images off the queue into w.entries, key by
// key in deficit round robin, and drops requests found expired.
func (w *batchWorker) takeLocked(n int, now time.Time) {
	b := w.b
	w.entries = w.entries[:0]
	for len(w.entries) < n && b.cur != nil {
		kq := b.cur
		if kq.deficit == 0 {
			kq.deficit = b.quantum
		}
		for kq.deficit > 0 && len(w.entries) < n && kq.head != nil {
			req := kq.head
			if req.ctx.Err() != nil || (!req.deadline.IsZero() && !now.Before(req.deadline)) {
				images, waited := b.queueAbandonLocked(req, now)
				reason := DropDeadline
				if req.ctx.Err() != nil {
					reason = dropReason(req.ctx.Err())
				}
				w.drops = append(w.drops, BatchDropEvent{Model: b.model, Key: req.key, Images: images, Reason: reason, Waited: waited})
				if b.cur != kq {
					break // the key emptied and left the ring
				}
				continue
			}
			m := min(kq.deficit, n-len(w.entries), len(req.items)-req.next)
			for i := req.next; i < req.next+m; i++ {
				w.entries = append(w.entries, batchEntry{req: req, idx: i, slot: -1})
			}
			req.next += m
			req.active += m
			kq.deficit -= m
			if req.next == len(req.items) {
				b.queueUnlinkLocked(req, m)
				if b.cur != kq {
					break // the key emptied and left the ring
				}
			} else {
				kq.queued -= m
				b.queued -= m
			}
		}
		if b.cur == kq && kq.deficit == 0 {
			b.cur = kq.next // its turn is over
		}
	}
}

// run fills, runs and postprocesses the batch in w.entries and delivers
// every image's result or error.
func (w *batchWorker) run(reason string, start time.Time) {
	b := w.b

	// Describe the batch for the observer while the entries are fresh.
	b.mu.Lock()
	b.seq++
	seq := b.seq
	depth := b.queued
	oldest := time.Duration(0)
	w.ctxs = w.ctxs[:0]
	for _, e := range w.entries {
		if e.req.lastSeq != seq {
			e.req.lastSeq = seq
			w.ctxs = append(w.ctxs, e.req.ctx)
			oldest = max(oldest, start.Sub(e.req.enqueued))
		}
	}
	b.mu.Unlock()
	ctx := b.runCtx
	if b.observer != nil {
		ctx = b.observer.BatchReleased(ctx, BatchReleaseEvent{
			Model: b.model, Worker: w.id, Seq: seq, Size: len(w.entries), Reason: reason,
			Depth: depth, OldestWait: oldest, Requests: w.ctxs,
		})
	}
	clear(w.ctxs)
	w.ctxs = w.ctxs[:0]

	// Fill, skipping images whose request was abandoned meanwhile. A slot
	// whose Fill failed is reused by the next image.
	bt := w.batch
	filled := 0
	for i := range w.entries {
		e := &w.entries[i]
		if e.req.gone.Load() {
			continue
		}
		t := time.Now()
		err := batchFill(e.req.items[e.idx], bt.Slot(filled))
		e.fill = time.Since(t)
		if err != nil {
			e.err = fmt.Errorf("model %q: filling batch slot: %w", b.model, err)
			continue
		}
		e.slot = filled
		filled++
	}
	bt.N = filled

	// Let go of the items during the run: a request cancelled now is not
	// kept waiting for the engine.
	b.mu.Lock()
	for i := range w.entries {
		e := &w.entries[i]
		req := e.req
		req.active--
		switch {
		case req.abandoned:
			e.slot = -1
			req.finishLocked()
		case e.err != nil:
			req.failLocked(e.idx, e.err)
		case e.slot < 0:
			req.finishLocked() // skipped: abandoned before Fill
		}
		if req.active == 0 && req.released != nil {
			close(req.released)
			req.released = nil
		}
	}
	b.mu.Unlock()

	var (
		outs      []Tensor
		runErr    error
		inference time.Duration
	)
	if filled > 0 {
		t := time.Now()
		outs, runErr = batchRunEngine(ctx, w.engine, bt)
		inference = time.Since(t)
		if runErr == nil {
			runErr = batchCheckOutputs(outs, filled)
		}
		if runErr != nil {
			runErr = fmt.Errorf("model %q on %s: running batch of %d: %w", b.model, w.backend, filled, runErr)
		}
	}

	// Claim the images still wanted, postprocess them, deliver.
	b.mu.Lock()
	for i := range w.entries {
		e := &w.entries[i]
		if e.slot < 0 {
			continue
		}
		req := e.req
		switch {
		case req.abandoned:
			e.slot = -1
			req.finishLocked()
		case runErr != nil:
			e.slot = -1
			req.failLocked(e.idx, runErr)
		default:
			req.active++
		}
	}
	b.mu.Unlock()

	for i := range w.entries {
		e := &w.entries[i]
		if e.slot < 0 {
			continue
		}
		t := time.Now()
		res, err := batchPostprocess(e.req.items[e.idx], outs, e.slot)
		post := time.Since(t)
		if err != nil {
			e.err = fmt.Errorf("model %q: postprocessing: %w", b.model, err)
			continue
		}
		res.Timings.Queue = start.Sub(e.req.enqueued)
		res.Timings.Preprocess += e.fill
		res.Timings.Inference = inference
		res.Timings.Postprocess = post
		res.Backend = w.backend
		res.BatchSize = filled
		e.req.results[e.idx] = res
	}

	total := time.Since(start)
	b.mu.Lock()
	for i := range w.entries {
		e := &w.entries[i]
		if e.slot < 0 {
			continue
		}
		req := e.req
		req.active--
		if e.err != nil {
			req.failLocked(e.idx, e.err)
		} else {
			req.finishLocked()
		}
		if req.active == 0 && req.released != nil {
			close(req.released)
			req.released = nil
		}
	}
	if filled > 0 {
		if b.estimate == 0 {
			b.estimate = total
		} else {
			b.estimate += (total - b.estimate) / 8
		}
	}
	b.busy--
	b.mu.Unlock()

	if b.observer != nil {
		b.observer.BatchDone(ctx, BatchDoneEvent{
			Model: b.model, Worker: w.id, Seq: seq, Backend: w.backend, Size: filled,
			Inference: inference, Total: total, Err: runErr,
		})
	}
	clear(w.entries) // let the requests be collected
	w.entries = w.entries[:0]
}

// batchFill calls it.Fill, turning a panic into an error.
func batchFill(it BatchItem, slot []float32) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &BatchPanicError{Where: "fill", Value: r, Stack: debug.Stack()}
		}
	}()
	return it.Fill(slot)
}

// batchPostprocess calls it.Postprocess, turning a panic into an error.
func batchPostprocess(it BatchItem, outs []Tensor, i int) (res Result, err error) {
	defer func() {
		if r := recover(); r != nil {
			res, err = Result{}, &BatchPanicError{Where: "postprocess", Value: r, Stack: debug.Stack()}
		}
	}()
	return it.Postprocess(outs, i)
}

// batchRunEngine calls e.Run, turning a panic into an error.
func batchRunEngine(ctx context.Context, e Engine, bt *Batch) (outs []Tensor, err error) {
	defer func() {
		if r := recover(); r != nil {
			outs, err = nil, &BatchPanicError{Where: "engine run", Value: r, Stack: debug.Stack()}
		}
	}()
	return e.Run(ctx, bt)
}

// batchCheckOutputs checks that the engine returned outputs with batch
// dimension n whose data matches their shape, so that a misbehaving
// engine fails its batch instead of handing items rows they cannot have.
func batchCheckOutputs(outs []Tensor, n int) error {
	if len(outs) == 0 {
		return errors.New("engine returned no outputs")
	}
	for _, t := range outs {
		if len(t.Shape) == 0 || t.Shape[0] != int64(n) {
			return fmt.Errorf("engine returned output %q of shape %v for %d images", t.Name, t.Shape, n)
		}
		size := int64(1)
		for _, d := range t.Shape {
			if d < 0 {
				return fmt.Errorf("engine returned output %q of shape %v", t.Name, t.Shape)
			}
			size *= d
		}
		if size != int64(len(t.Data)) {
			return fmt.Errorf("engine returned output %q of shape %v with %d values", t.Name, t.Shape, len(t.Data))
		}
	}
	return nil
}
