package batcher

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
)

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
	engine  engine.Engine
	backend string
	batch   *engine.Batch
	free    func() // frees batch.Data when it came from a engine.BatchAllocator
	wake    chan struct{}
	timer   *time.Timer
	entries []batchEntry
	ctxs    []context.Context
	drops   []BatchDropEvent
}

func newBatchWorker(b *Batcher, id int, e engine.Engine, maxN, c, h, w int) (*batchWorker, error) {
	wk := &batchWorker{
		b:       b,
		id:      id,
		engine:  e,
		backend: e.Backend(),
		wake:    make(chan struct{}, 1),
		entries: make([]batchEntry, 0, maxN),
		ctxs:    make([]context.Context, 0, maxN),
	}
	if alloc, ok := e.(engine.BatchAllocator); ok {
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
		wk.batch = &engine.Batch{Cap: maxN, C: c, H: h, W: w, Data: data}
		wk.free = free
	} else {
		wk.batch = engine.NewBatch(maxN, c, h, w)
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
		rel, ok := w.take()
		if !ok {
			return
		}
		w.run(rel)
	}
}

// batchReleaseInfo describes a batch just taken off the queue.
type batchReleaseInfo struct {
	reason string
	start  time.Time // when it was taken: the end of its images' queueing
	seq    uint64
	depth  int           // images still queued
	oldest time.Duration // the longest wait of its images
}

// take waits until the release policy lets it take a batch and takes it
// into w.entries, and the contexts of its requests into w.ctxs. It returns
// false when the batcher is closed and empty.
func (w *batchWorker) take() (rel batchReleaseInfo, ok bool) {
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
			b.seq++
			rel = batchReleaseInfo{reason: why, start: now, seq: b.seq, depth: b.queued}
			for _, e := range w.entries {
				if e.req.lastSeq != rel.seq {
					e.req.lastSeq = rel.seq
					w.ctxs = append(w.ctxs, e.req.ctx)
					rel.oldest = max(rel.oldest, now.Sub(e.req.enqueued))
				}
			}
			if b.queued > 0 && len(b.idle) > 0 {
				// More is waiting: let another idle worker look at it.
				b.idle[len(b.idle)-1].wakeUp()
			}
			b.mu.Unlock()
			w.reportDrops()
			return rel, true
		}
		if b.closing && b.queued == 0 {
			b.mu.Unlock()
			return rel, false
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
func (w *batchWorker) run(rel batchReleaseInfo) {
	b := w.b
	start, seq := rel.start, rel.seq
	ctx := b.runCtx
	if b.observer != nil {
		ctx = b.observer.BatchReleased(ctx, BatchReleaseEvent{
			Model: b.model, Worker: w.id, Seq: seq, Size: len(w.entries), Reason: rel.reason,
			Depth: rel.depth, OldestWait: rel.oldest, Requests: w.ctxs,
		})
	}
	clear(w.ctxs) // let the requests be collected
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
		outs      []engine.Tensor
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

	post := time.Now()
	var fill time.Duration
	for i := range w.entries {
		e := &w.entries[i]
		fill += e.fill
		if e.slot < 0 {
			continue
		}
		run := Run{Queue: start.Sub(e.req.enqueued), Fill: e.fill, Inference: inference, Backend: w.backend, Size: filled}
		if err := batchPostprocess(e.req.items[e.idx], outs, e.slot, run); err != nil {
			e.err = fmt.Errorf("model %q: postprocessing: %w", b.model, err)
		}
	}

	postprocess := time.Since(post)
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
			Fill: fill, Inference: inference, Postprocess: postprocess, Total: total, Err: runErr,
		})
	}
	clear(w.entries) // let the requests be collected
	w.entries = w.entries[:0]
}

// batchFill calls it.Fill, turning a panic into an error.
func batchFill(it Item, slot []float32) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &BatchPanicError{Where: "fill", Value: r, Stack: debug.Stack()}
		}
	}()
	return it.Fill(slot)
}

// batchPostprocess calls it.Postprocess, turning a panic into an error.
func batchPostprocess(it Item, outs []engine.Tensor, i int, run Run) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &BatchPanicError{Where: "postprocess", Value: r, Stack: debug.Stack()}
		}
	}()
	return it.Postprocess(outs, i, run)
}

// batchRunEngine calls e.Run, turning a panic into an error.
func batchRunEngine(ctx context.Context, e engine.Engine, bt *engine.Batch) (outs []engine.Tensor, err error) {
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
func batchCheckOutputs(outs []engine.Tensor, n int) error {
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
