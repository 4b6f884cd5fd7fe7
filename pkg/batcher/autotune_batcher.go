package batcher

import (
	"fmt"
	"slices"
	"time"
)

// The setters the self-tuner needs from a running Batcher. The policy
// fields they change (maxBatch, preferred, delay) are guarded by b.mu.

// BatchPolicy is the part of a Batcher's release policy that may change
// while it runs.
type BatchPolicy struct {
	// MaxBatchSize is the most images in one engine run, at most the
	// MaxBatchSize the Batcher was built with (its buffers' size).
	MaxBatchSize int
	// PreferredBatchSizes are released at once when exactly that many
	// images wait; sizes above MaxBatchSize are ignored.
	PreferredBatchSizes []int
	// MaxQueueDelay is how long the oldest image may wait for more.
	MaxQueueDelay time.Duration
}

// Policy returns the release policy in force.
func (b *Batcher) Policy() BatchPolicy {
	b.mu.Lock()
	defer b.mu.Unlock()
	return BatchPolicy{MaxBatchSize: b.maxBatch, PreferredBatchSizes: slices.Clone(b.preferred), MaxQueueDelay: b.delay}
}

// Capacity is the MaxBatchSize the Batcher was built with: the most any
// policy may ask for.
func (b *Batcher) Capacity() int { return b.workers[0].batch.Cap }

// SetPolicy changes the release policy of the running Batcher; batches
// already taken are not affected. Waiting workers re-evaluate the queue
// at once, so a shorter delay or a smaller maximum takes effect now.
func (b *Batcher) SetPolicy(p BatchPolicy) error {
	capN := b.Capacity()
	if p.MaxBatchSize < 1 || p.MaxBatchSize > capN {
		return fmt.Errorf("batcher for model %q: max batch size %d outside 1..%d", b.model, p.MaxBatchSize, capN)
	}
	if p.MaxQueueDelay < 0 {
		return fmt.Errorf("batcher for model %q: negative max queue delay %v", b.model, p.MaxQueueDelay)
	}
	var preferred []int
	for _, s := range p.PreferredBatchSizes {
		if s < 1 {
			return fmt.Errorf("batcher for model %q: preferred batch size %d", b.model, s)
		}
		if s < p.MaxBatchSize && !slices.Contains(preferred, s) {
			preferred = append(preferred, s)
		}
	}
	slices.Sort(preferred)
	b.mu.Lock()
	b.maxBatch, b.preferred, b.delay = p.MaxBatchSize, preferred, p.MaxQueueDelay
	for _, w := range b.idle {
		w.wakeUp()
	}
	b.mu.Unlock()
	return nil
}
