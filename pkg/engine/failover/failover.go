// Package failover keeps serving when the GPU fails: an Engine wraps a
// primary engine (ONNX Runtime on a GPU) and a fallback (a CPU engine)
// behind a circuit breaker. A CUDA failure or out-of-memory fails only the
// batch it hit, or reruns it on the fallback when configured; after
// FailureThreshold failures the primary is marked unhealthy and batches go
// to the fallback until, after Cooldown, one batch probes the primary again.
package failover

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
)

// ErrBackendUnavailable is wrapped by the errors of batches that could not
// run because the primary backend failed or is unhealthy and no fallback
// took them. The server maps it to codes.Unavailable: the request may
// succeed if retried.
var ErrBackendUnavailable = errors.New("inference backend unavailable")

// State is the circuit breaker's state.
type State int

// Breaker states.
const (
	// Closed: the primary serves every batch.
	Closed State = iota
	// Open: the primary is unhealthy; the fallback serves every batch.
	Open
	// HalfOpen: the cooldown has passed; the next batch probes the primary.
	HalfOpen
)

func (s State) String() string {
	switch s {
	case Closed:
		return "closed"
	case Open:
		return "open"
	case HalfOpen:
		return "half-open"
	}
	return fmt.Sprintf("State(%d)", int(s))
}

// EventKind says what an Event reports.
type EventKind int

// Event kinds.
const (
	// PrimaryFailed: a batch failed on the primary with a backend failure.
	PrimaryFailed EventKind = iota
	// StateChanged: the breaker moved From one state To another.
	StateChanged
	// FellBack: the fallback ran a batch (Err is the primary's failure
	// when it was a retry, nil when the breaker was open).
	FellBack
)

// Event is what the observer hook gets, for metrics and logs.
type Event struct {
	Kind     EventKind
	From, To State
	// Backend is the backend the event concerns.
	Backend string
	Err     error
}

// Options configure an Engine; zero values take the defaults.
type Options struct {
	// FailureThreshold is the number of consecutive backend failures that
	// open the breaker; default 3.
	FailureThreshold int
	// Cooldown is how long the breaker stays open before one batch probes
	// the primary again; default 30s.
	Cooldown time.Duration
	// RetryOnFallback reruns a batch that failed on the primary on the
	// fallback, so its requests succeed; otherwise they fail with
	// ErrBackendUnavailable.
	RetryOnFallback bool
	// IsBackendFailure says whether a primary error is the backend's fault
	// (counts against it) rather than the batch's or the caller's. The
	// default counts every error but cancellation, deadlines and
	// engine.ErrBadBatch.
	IsBackendFailure func(error) bool
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Observe, when set, is called synchronously for every Event; it must
	// not call back into the Engine.
	Observe func(Event)
}

// Breaker is the circuit breaker over one primary backend. Engines that
// run on the same GPU share one, so a failing device is taken out of
// service once, not per engine instance. It is safe for concurrent use.
type Breaker struct {
	backend string
	opts    Options

	mu       sync.Mutex // guards the fields below
	state    State
	failures int // consecutive backend failures while closed
	openedAt time.Time
	probing  bool // a half-open probe batch is in flight
}

// NewBreaker returns a closed breaker for backend; it takes
// FailureThreshold, Cooldown and Now from opts (defaults as for New).
// Events still go to each Engine's own Observe.
func NewBreaker(backend string, opts Options) *Breaker {
	return &Breaker{backend: backend, opts: opts.withDefaults()}
}

func (o Options) withDefaults() Options {
	if o.FailureThreshold <= 0 {
		o.FailureThreshold = 3
	}
	if o.Cooldown <= 0 {
		o.Cooldown = 30 * time.Second
	}
	if o.IsBackendFailure == nil {
		o.IsBackendFailure = DefaultIsBackendFailure
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return o
}

// State returns the breaker's state.
func (br *Breaker) State() State {
	br.mu.Lock()
	defer br.mu.Unlock()
	return br.state
}

// admit says whether the primary takes the next batch. An open breaker
// whose cooldown has passed turns half-open and admits exactly one probe
// batch; the others keep going to the fallback until it reports.
func (br *Breaker) admit(events *[]Event) (primary, probe bool) {
	br.mu.Lock()
	defer br.mu.Unlock()
	switch br.state {
	case Closed:
		return true, false
	case Open:
		if br.opts.Now().Sub(br.openedAt) < br.opts.Cooldown {
			return false, false
		}
		br.setLocked(HalfOpen, nil, events)
	}
	if br.probing {
		return false, false
	}
	br.probing = true
	return true, true
}

// success records a batch the primary ran.
func (br *Breaker) success(probe bool, events *[]Event) {
	br.mu.Lock()
	defer br.mu.Unlock()
	if probe {
		br.probing = false
	}
	br.failures = 0
	if br.state == HalfOpen {
		br.setLocked(Closed, nil, events)
	}
}

// inconclusive records a probe that ended for reasons not the backend's.
func (br *Breaker) inconclusive(probe bool) {
	if !probe {
		return
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	br.probing = false
}

// failure records a backend failure of the primary.
func (br *Breaker) failure(probe bool, err error, events *[]Event) {
	br.mu.Lock()
	defer br.mu.Unlock()
	if probe {
		br.probing = false
	}
	*events = append(*events, Event{Kind: PrimaryFailed, Backend: br.backend, Err: err})
	br.failures++
	if br.state == HalfOpen || (br.state == Closed && br.failures >= br.opts.FailureThreshold) {
		br.setLocked(Open, err, events)
	}
}

// retryIn is how long until the next probe.
func (br *Breaker) retryIn() time.Duration {
	br.mu.Lock()
	defer br.mu.Unlock()
	return max(br.opts.Cooldown-br.opts.Now().Sub(br.openedAt), 0)
}

func (br *Breaker) setLocked(to State, cause error, events *[]Event) {
	if to == br.state {
		return
	}
	*events = append(*events, Event{Kind: StateChanged, From: br.state, To: to, Backend: br.backend, Err: cause})
	br.state = to
	switch to {
	case Open:
		br.openedAt = br.opts.Now()
	case Closed:
		br.failures = 0
	}
}

// Engine is a engine.Engine that fails over from a primary to a fallback
// engine. Like every Engine it is used by one goroutine at a time; Stats
// and State may be called from any goroutine.
type Engine struct {
	primary, fallback engine.Engine
	opts              Options
	breaker           *Breaker

	mu    sync.Mutex // guards the fields below
	last  string     // backend that served the last batch
	stats Stats
}

// Stats counts what the Engine did.
type Stats struct {
	PrimaryBatches, FallbackBatches, PrimaryFailures, FailedBatches int64
}

// New wraps primary and fallback; fallback may be nil, in which case an
// open breaker fails batches fast with ErrBackendUnavailable. breaker may
// be shared by the engines of one device; nil gives the engine its own,
// built from opts.
func New(primary, fallback engine.Engine, breaker *Breaker, opts Options) *Engine {
	opts = opts.withDefaults()
	if breaker == nil {
		breaker = NewBreaker(primary.Backend(), opts)
	}
	return &Engine{primary: primary, fallback: fallback, opts: opts, breaker: breaker, last: primary.Backend()}
}

// DefaultIsBackendFailure counts every error but cancellation, deadlines
// and refusals of bad input.
func DefaultIsBackendFailure(err error) bool {
	return !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, engine.ErrBadBatch)
}

// Run executes the batch on the primary while it is healthy, else on the
// fallback; see the package comment for the rules.
func (e *Engine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	var events []Event
	defer func() { e.emit(events) }()

	usePrimary, probe := e.breaker.admit(&events)
	if !usePrimary {
		return e.runFallback(ctx, b, nil, &events)
	}
	out, err := e.primary.Run(ctx, b)
	if err == nil {
		e.breaker.success(probe, &events)
		e.mu.Lock()
		e.stats.PrimaryBatches++
		e.last = e.primary.Backend()
		e.mu.Unlock()
		return out, nil
	}
	if !e.opts.IsBackendFailure(err) {
		// The batch's or the caller's fault: the backend is fine, and a
		// probe that ends this way proves nothing either way.
		e.breaker.inconclusive(probe)
		return nil, err
	}
	e.breaker.failure(probe, err, &events)
	e.mu.Lock()
	e.stats.PrimaryFailures++
	e.mu.Unlock()
	if e.opts.RetryOnFallback && e.fallback != nil && ctx.Err() == nil {
		return e.runFallback(ctx, b, err, &events)
	}
	e.mu.Lock()
	e.stats.FailedBatches++
	e.mu.Unlock()
	return nil, fmt.Errorf("%w: %s failed: %w", ErrBackendUnavailable, e.primary.Backend(), err)
}

func (e *Engine) runFallback(ctx context.Context, b *engine.Batch, cause error, events *[]Event) ([]engine.Tensor, error) {
	if e.fallback == nil {
		e.mu.Lock()
		e.stats.FailedBatches++
		e.mu.Unlock()
		return nil, fmt.Errorf("%w: %s is unhealthy (next probe in %v) and there is no fallback", ErrBackendUnavailable, e.primary.Backend(), e.breaker.retryIn().Round(time.Millisecond))
	}
	out, err := e.fallback.Run(ctx, b)
	e.mu.Lock()
	defer e.mu.Unlock()
	if err != nil {
		e.stats.FailedBatches++
		if cause != nil {
			return nil, fmt.Errorf("%w: %s failed (%v) and fallback %s failed too: %w", ErrBackendUnavailable, e.primary.Backend(), cause, e.fallback.Backend(), err)
		}
		return nil, fmt.Errorf("fallback %s: %w", e.fallback.Backend(), err)
	}
	e.stats.FallbackBatches++
	e.last = e.fallback.Backend()
	*events = append(*events, Event{Kind: FellBack, Backend: e.fallback.Backend(), Err: cause})
	return out, nil
}

// emit calls the observer outside every lock.
func (e *Engine) emit(events []Event) {
	if e.opts.Observe == nil {
		return
	}
	for _, ev := range events {
		e.opts.Observe(ev)
	}
}

// Backend names the backend that served the last batch (the primary's
// before any batch ran). Call it after Run from the goroutine that ran it,
// to label that batch's results.
func (e *Engine) Backend() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.last
}

// State returns the breaker's state.
func (e *Engine) State() State { return e.breaker.State() }

// Stats returns the counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stats
}

// AllocBatch hands out the primary's batch buffers (pinned memory on a GPU)
// when it has an allocator, so preprocessing writes where the GPU reads;
// the fallback reads any memory.
func (e *Engine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	if a, ok := e.primary.(engine.BatchAllocator); ok {
		return a.AllocBatch(maxN, c, h, w)
	}
	if maxN < 1 || c < 1 || h < 1 || w < 1 {
		return nil, nil, fmt.Errorf("failover: batch buffer %dx%dx%dx%d has an empty dimension", maxN, c, h, w)
	}
	return make([]float32, maxN*c*h*w), func() {}, nil
}

// Close closes both engines.
func (e *Engine) Close() error {
	errs := []error{e.primary.Close()}
	if e.fallback != nil {
		errs = append(errs, e.fallback.Close())
	}
	return errors.Join(errs...)
}

var (
	_ engine.Engine         = (*Engine)(nil)
	_ engine.BatchAllocator = (*Engine)(nil)
)
