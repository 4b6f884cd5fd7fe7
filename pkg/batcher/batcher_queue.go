package batcher

import (
	"container/heap"
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"time"
)

// batchRequest is one Submit call. The first block is set before it is
// queued and not changed after; the fields after it are guarded by
// Batcher.mu.
type batchRequest struct {
	ctx      context.Context
	key      string
	items    []Item
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
func (r *batchRequest) outcome() error {
	switch {
	case r.nerr == 0:
		return nil
	case len(r.items) == 1:
		return r.firstErr
	case r.nerr == 1:
		return fmt.Errorf("image %d of %d: %w", r.errIdx, len(r.items), r.firstErr)
	default:
		return fmt.Errorf("image %d of %d (and %d more failed): %w", r.errIdx, len(r.items), r.nerr-1, r.firstErr)
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
