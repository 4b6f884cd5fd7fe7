package batcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"
)

// LatencyTarget configures a LatencyController.
type LatencyTarget struct {
	// P99 is the budget: the 99th percentile of the time an image spends
	// in the batcher, from queueing to its result (queue wait, fill, run,
	// postprocess). Decoding before the queue is not under the batcher's
	// control and not counted.
	P99 time.Duration
	// Sizes is the ladder of batch sizes the controller moves along,
	// smallest first (normally TuneDecision.Preferred); default
	// CandidateSizes(Capacity).
	Sizes []int
	// Capacity is the Batcher's built-in maximum batch size (> 0).
	Capacity int
	// MaxDelay bounds the queue delay (default P99/4); DelayStep is its
	// additive step (default MaxDelay/8, at least 100µs).
	MaxDelay, DelayStep time.Duration
	// Window is how many batches one decision looks at (default 16).
	Window int
	// Headroom: the controller only grows the batch while the window's
	// p99 is below P99×(1-Headroom) (default 0.25), so that it settles
	// below the budget instead of oscillating around it.
	Headroom float64
}

// ControlState is what a LatencyController has decided so far, for logs,
// metrics and ModelInfo.
type ControlState struct {
	// Target is the p99 budget.
	Target time.Duration
	// MaxBatchSize and MaxQueueDelay are the policy in force.
	MaxBatchSize  int
	MaxQueueDelay time.Duration
	// P99 is the last full window's p99 of batcher latency, Batches the
	// number of batches it held and Backlog whether images were still
	// queued when a batch of it was released.
	P99 time.Duration
	// RunP99 is the window's p99 of the batch run alone (fill, engine,
	// postprocess), without the queue wait.
	RunP99  time.Duration
	Batches int
	Backlog bool
	// Decisions counts windows decided; Reason says what the last one did
	// and why, and Action says what it did in one fixed word (an Action
	// constant), for metric labels.
	Decisions int
	Reason    string
	Action    string
}

// Actions of a LatencyController decision (ControlState.Action).
const (
	// ActionStart: no window decided yet; the smallest batch, no delay.
	ActionStart = "start"
	// ActionSmallerBatch: the batch run alone was over budget; smaller
	// batch, shorter delay.
	ActionSmallerBatch = "smaller_batch"
	// ActionShorterDelay: over budget from queueing; shorter delay.
	ActionShorterDelay = "shorter_delay"
	// ActionDrainQueue: over budget from queueing with a backlog;
	// shorter delay and a bigger batch to drain the queue.
	ActionDrainQueue = "drain_queue"
	// ActionBiggerBatch: images queued with budget to spare; bigger batch.
	ActionBiggerBatch = "bigger_batch"
	// ActionLongerDelay: images queued at the largest batch with budget
	// to spare; longer delay.
	ActionLongerDelay = "longer_delay"
	// ActionHold: within budget; nothing changed.
	ActionHold = "hold"
)

// LatencyController adapts a batcher's maximum batch size and queue delay
// to the most throughput that keeps the p99 latency budget, AIMD-style
// (as TCP does: back off fast, probe slowly). It tells apart the two ways
// a budget is missed:
//
//   - the batch run itself is too slow for the budget: multiplicative
//     decrease of the batch size and the delay;
//   - the run fits but images queue too long (more offered than served):
//     a smaller batch would serve less and queue longer, so the delay is
//     halved and, when a bigger batch is predicted to still fit, the batch
//     grows by one step to drain the queue faster.
//
// While the p99 has headroom and images queue up, it grows additively:
// one step of the ladder of sizes, then the delay. Everything it chooses
// stays within the ladder and the delay bounds. It is safe for concurrent
// use.
type LatencyController struct {
	cfg LatencyTarget

	mu      sync.Mutex // guards the fields below
	samples []time.Duration
	runs    []time.Duration
	backlog bool
	level   int // index into cfg.Sizes of the maximum batch size
	delay   time.Duration
	state   ControlState
}

// NewLatencyController validates cfg, fills its defaults and starts at the
// smallest batch size with no queue delay: the lowest latency, from which
// it grows while the budget allows.
func NewLatencyController(cfg LatencyTarget) (*LatencyController, error) {
	if cfg.P99 <= 0 {
		return nil, fmt.Errorf("latency target: p99 budget %v must be positive", cfg.P99)
	}
	if cfg.Capacity < 1 {
		return nil, fmt.Errorf("latency target: capacity %d", cfg.Capacity)
	}
	if len(cfg.Sizes) == 0 {
		cfg.Sizes = CandidateSizes(cfg.Capacity)
	}
	cfg.Sizes = slices.Clone(cfg.Sizes)
	slices.Sort(cfg.Sizes)
	cfg.Sizes = slices.Compact(cfg.Sizes)
	if cfg.Sizes[0] < 1 || cfg.Sizes[len(cfg.Sizes)-1] > cfg.Capacity {
		return nil, fmt.Errorf("latency target: sizes %v outside 1..%d", cfg.Sizes, cfg.Capacity)
	}
	if cfg.MaxDelay < 0 || cfg.DelayStep < 0 || cfg.Window < 0 || cfg.Headroom < 0 || cfg.Headroom >= 1 {
		return nil, errors.New("latency target: negative delay, step or window, or headroom outside [0,1)")
	}
	if cfg.MaxDelay == 0 {
		cfg.MaxDelay = cfg.P99 / 4
	}
	if cfg.DelayStep == 0 {
		cfg.DelayStep = max(cfg.MaxDelay/8, 100*time.Microsecond)
	}
	if cfg.Window == 0 {
		cfg.Window = 16
	}
	if cfg.Headroom == 0 {
		cfg.Headroom = 0.25
	}
	c := &LatencyController{cfg: cfg, samples: make([]time.Duration, 0, cfg.Window), runs: make([]time.Duration, 0, cfg.Window)}
	c.state = ControlState{Target: cfg.P99, MaxBatchSize: cfg.Sizes[0], Reason: "start at the smallest batch, no delay", Action: ActionStart}
	return c, nil
}

// Config returns the controller's settings with the defaults filled in.
func (c *LatencyController) Config() LatencyTarget { return c.cfg }

// Observe records one batch: the latency of its longest-waiting image
// (queue wait plus run), the batch's own run time (fill, engine,
// postprocess) and whether images were still queued when it was released.
func (c *LatencyController) Observe(latency, run time.Duration, backlog bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.samples = append(c.samples, latency)
	c.runs = append(c.runs, run)
	c.backlog = c.backlog || backlog
}

func p99Of(d []time.Duration) time.Duration {
	slices.Sort(d)
	return d[min(len(d)-1, len(d)*99/100)]
}

// Step decides once a full window of batches was observed, and reports
// the state and whether the policy changed. With less than a window it
// changes nothing.
func (c *LatencyController) Step() (ControlState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.samples) < c.cfg.Window {
		return c.state, false
	}
	p99, runP99 := p99Of(c.samples), p99Of(c.runs)
	batches, backlog := len(c.samples), c.backlog
	c.samples, c.runs, c.backlog = c.samples[:0], c.runs[:0], false

	target := c.cfg.P99
	roomy := time.Duration(float64(target) * (1 - c.cfg.Headroom))
	level, delay := c.level, c.delay
	// nextFits: the next size up, its run time predicted as growing in
	// proportion to the batch (pessimistic: ladder sizes are faster per
	// image), still leaves headroom.
	nextFits := level < len(c.cfg.Sizes)-1 &&
		time.Duration(float64(runP99)*float64(c.cfg.Sizes[level+1])/float64(c.cfg.Sizes[level])) < roomy
	halveDelay := func() {
		delay /= 2
		if delay < c.cfg.DelayStep {
			delay = 0
		}
	}
	var reason, action string
	switch {
	case runP99 > target:
		half := max(c.cfg.Sizes[level]/2, 1)
		for level > 0 && c.cfg.Sizes[level] > half {
			level--
		}
		halveDelay()
		action = ActionSmallerBatch
		reason = fmt.Sprintf("batch run p99 %v over budget %v: smaller batch", runP99.Round(time.Microsecond), target)
	case p99 > target:
		halveDelay()
		action = ActionShorterDelay
		reason = fmt.Sprintf("p99 %v over budget %v from queueing: shorter delay", p99.Round(time.Microsecond), target)
		if backlog && nextFits {
			level++
			action = ActionDrainQueue
			reason += ", bigger batch to drain the queue"
		}
	case p99 < roomy && backlog:
		switch {
		case nextFits:
			level++
			action, reason = ActionBiggerBatch, "images queued with budget to spare: bigger batch"
		case level == len(c.cfg.Sizes)-1 && delay < c.cfg.MaxDelay:
			delay = min(delay+c.cfg.DelayStep, c.cfg.MaxDelay)
			action, reason = ActionLongerDelay, "images queued at the largest batch: longer delay"
		default:
			action, reason = ActionHold, "within budget, no bigger batch fits"
		}
	default:
		action, reason = ActionHold, "within budget"
	}
	changed := level != c.level || delay != c.delay
	c.level, c.delay = level, delay
	c.state = ControlState{
		Target: target, MaxBatchSize: c.cfg.Sizes[level], MaxQueueDelay: delay,
		P99: p99, RunP99: runP99, Batches: batches, Backlog: backlog, Decisions: c.state.Decisions + 1, Reason: reason, Action: action,
	}
	return c.state, changed
}

// State returns the last decision.
func (c *LatencyController) State() ControlState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Policy is the batcher policy of state s: its maximum and delay, with the
// ladder sizes up to it as preferred sizes.
func (c *LatencyController) Policy(s ControlState) BatchPolicy {
	var pref []int
	for _, z := range c.cfg.Sizes {
		if z <= s.MaxBatchSize {
			pref = append(pref, z)
		}
	}
	return BatchPolicy{MaxBatchSize: s.MaxBatchSize, PreferredBatchSizes: pref, MaxQueueDelay: s.MaxQueueDelay}
}

// LatencyLoop runs a LatencyController against a Batcher. It is the
// Batcher's BatchObserver (pass it in Config.Observer; it forwards
// every event to Next), feeding the controller with each batch's latency,
// and it owns one goroutine, started by Start and ended by Stop, that
// applies the controller's decisions: observers must not call back into
// the Batcher, so decisions are applied from outside the event calls.
type LatencyLoop struct {
	next BatchObserver

	mu       sync.Mutex // guards the fields below
	ctrl     *LatencyController
	released map[uint64]batchStart
	stop     chan struct{}
	done     chan struct{}
}

type batchStart struct {
	oldest  time.Duration
	backlog bool
}

// NewLatencyLoop makes the observer for ctrl; next (nil for none) receives
// every event too.
func NewLatencyLoop(ctrl *LatencyController, next BatchObserver) *LatencyLoop {
	return &LatencyLoop{ctrl: ctrl, next: next, released: map[uint64]batchStart{}}
}

// Controller returns the loop's controller.
func (l *LatencyLoop) Controller() *LatencyController {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ctrl
}

// SetController replaces the controller before Start: the batcher needs
// its observer when it is built, and the ladder of sizes is only known
// after the warm-up measurement.
func (l *LatencyLoop) SetController(ctrl *LatencyController) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stop != nil {
		return errors.New("latency loop: already started")
	}
	l.ctrl = ctrl
	return nil
}

// Start applies the controller's first policy to b and then checks for a
// decision every interval until Stop. onChange, when set, is told each
// policy change (to log it), from the loop's goroutine. It fails when b
// refuses the policy or the loop already started.
func (l *LatencyLoop) Start(b *Batcher, interval time.Duration, onChange func(ControlState)) error {
	if interval <= 0 {
		return fmt.Errorf("latency loop: interval %v", interval)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.stop != nil {
		return errors.New("latency loop: already started")
	}
	if err := b.SetPolicy(l.ctrl.Policy(l.ctrl.State())); err != nil {
		return err
	}
	l.stop, l.done = make(chan struct{}), make(chan struct{})
	go l.run(b, l.ctrl, interval, onChange, l.stop, l.done)
	return nil
}

func (l *LatencyLoop) run(b *Batcher, ctrl *LatencyController, interval time.Duration, onChange func(ControlState), stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		s, changed := ctrl.Step()
		if !changed {
			continue
		}
		// The controller only proposes sizes within the capacity, so
		// SetPolicy cannot refuse them.
		_ = b.SetPolicy(ctrl.Policy(s))
		if onChange != nil {
			onChange(s)
		}
	}
}

// Stop ends the loop's goroutine and waits for it; the policy last set
// stays. It is safe to call more than once, and without Start.
func (l *LatencyLoop) Stop() {
	l.mu.Lock()
	stop, done := l.stop, l.done
	if stop != nil {
		select {
		case <-stop:
		default:
			close(stop)
		}
	}
	l.mu.Unlock()
	if done != nil {
		<-done
	}
}

// Enqueued forwards to Next.
func (l *LatencyLoop) Enqueued(e BatchEnqueueEvent) {
	if l.next != nil {
		l.next.Enqueued(e)
	}
}

// Rejected forwards to Next.
func (l *LatencyLoop) Rejected(e BatchRejectEvent) {
	if l.next != nil {
		l.next.Rejected(e)
	}
}

// Dropped forwards to Next.
func (l *LatencyLoop) Dropped(e BatchDropEvent) {
	if l.next != nil {
		l.next.Dropped(e)
	}
}

// BatchReleased remembers how long the batch's oldest image waited and
// whether images stayed queued, then forwards to Next.
func (l *LatencyLoop) BatchReleased(ctx context.Context, e BatchReleaseEvent) context.Context {
	l.mu.Lock()
	l.released[e.Seq] = batchStart{oldest: e.OldestWait, backlog: e.Depth > 0}
	l.mu.Unlock()
	if l.next != nil {
		return l.next.BatchReleased(ctx, e)
	}
	return ctx
}

// BatchDone feeds the controller with the batch's latency, then forwards
// to Next. Batches where nothing ran are not counted.
func (l *LatencyLoop) BatchDone(ctx context.Context, e BatchDoneEvent) {
	l.mu.Lock()
	st, ok := l.released[e.Seq]
	delete(l.released, e.Seq)
	ctrl := l.ctrl
	l.mu.Unlock()
	if ok && e.Size > 0 && e.Err == nil {
		ctrl.Observe(st.oldest+e.Total, e.Total, st.backlog)
	}
	if l.next != nil {
		l.next.BatchDone(ctx, e)
	}
}
