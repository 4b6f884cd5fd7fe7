package batcher

import (
	"context"
	"time"
)

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
	// It is called after the results were handed over, so a caller's
	// Submit may return before it.
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
	// Fill is the time spent writing the images into the batch buffer,
	// Inference the engine run, Postprocess the outputs' decoding; Total
	// is from release to the last result delivered.
	Fill, Inference, Postprocess, Total time.Duration
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
