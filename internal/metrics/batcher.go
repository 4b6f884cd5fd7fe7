package metrics

import (
	"context"
	"sync"

	"github.com/visionserve/visionserve/pkg/batcher"
)

// BatchObserver returns a batcher.BatchObserver that feeds the batch
// size and batches-released series and the dropped-images counter from a
// model's batcher. Give each batcher the same one or one each; both work.
func (m *Metrics) BatchObserver() batcher.BatchObserver {
	return &batchObserver{m: m, reasons: map[batchKey]string{}}
}

type batchKey struct {
	model string
	seq   uint64
}

// batchObserver remembers why each batch was released until it is done,
// when its backend and the images it ran are known.
type batchObserver struct {
	batcher.NopBatchObserver
	m *Metrics

	mu      sync.Mutex // guards the fields below
	reasons map[batchKey]string
}

// Dropped implements batcher.BatchObserver.
func (o *batchObserver) Dropped(e batcher.BatchDropEvent) {
	o.m.ObserveDroppedImages(e.Model, e.Images, e.Reason)
}

// BatchReleased implements batcher.BatchObserver.
func (o *batchObserver) BatchReleased(ctx context.Context, e batcher.BatchReleaseEvent) context.Context {
	o.mu.Lock()
	o.reasons[batchKey{e.Model, e.Seq}] = e.Reason
	o.mu.Unlock()
	return ctx
}

// BatchDone implements batcher.BatchObserver.
func (o *batchObserver) BatchDone(_ context.Context, e batcher.BatchDoneEvent) {
	k := batchKey{e.Model, e.Seq}
	o.mu.Lock()
	reason, ok := o.reasons[k]
	delete(o.reasons, k)
	o.mu.Unlock()
	if !ok {
		reason = "unknown"
	}
	o.m.ObserveBatch(e.Model, e.Backend, e.Size, reason)
}

// QueueStatsOf adapts a batcher's Stats to TrackQueue.
func QueueStatsOf(stats func() batcher.Stats) func() QueueStats {
	return func() QueueStats {
		s := stats()
		return QueueStats{Depth: s.Queued, OldestAge: s.OldestWait}
	}
}
