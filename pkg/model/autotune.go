package model

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// Self-tuning of a model's batcher (batching.auto_tune and
// batching.latency_target_p99 in config.yaml): at warm-up the batch sizes
// are measured on the model's engine and the batcher is set to the ones
// that are faster per image; with a latency target a controller then
// adapts batch size and queue delay online.

// latencyInterval is how often the latency controller looks for a full
// window of batches.
const latencyInterval = 250 * time.Millisecond

// Tuning is what the self-tuner measured and chose for one model, for
// logs, metrics and ModelInfo.
type Tuning struct {
	// Decision is the warm-up measurement and the batch sizes chosen from
	// it; nil when the model does not tune or has not warmed up yet.
	Decision *batcher.TuneDecision
	// Latency is the latency controller's current state; nil without a
	// latency target.
	Latency *batcher.ControlState
	// Policy is the batcher's release policy in force.
	Policy batcher.BatchPolicy
}

// tuner is a PipelineRunner's self-tuning state.
type tuner struct {
	cfg  modelrepo.BatchingConfig
	loop *batcher.LatencyLoop // nil without a latency target
	obs  batcher.TuneObserver // nil for none

	mu       sync.Mutex // guards the fields below
	decision *batcher.TuneDecision
	started  bool
}

// newTuner returns the tuner of a model's batching config and the batcher
// observer to use: with a latency target the controller's loop, which
// forwards every event to next. obs (nil for none) is told each decision.
func newTuner(m *modelrepo.Model, next batcher.BatchObserver, obs batcher.TuneObserver) (*tuner, batcher.BatchObserver, error) {
	t := &tuner{cfg: m.Batching, obs: obs}
	if m.Batching.LatencyTargetP99 <= 0 {
		return t, next, nil
	}
	// The ladder is set at warm-up from the measurement; until then the
	// controller starts from the configured maximum's candidates.
	ctrl, err := batcher.NewLatencyController(batcher.LatencyTarget{P99: m.Batching.LatencyTargetP99, Capacity: m.Batching.MaxBatchSize})
	if err != nil {
		return nil, nil, fmt.Errorf("model %q: %w", m.Name, err)
	}
	t.loop = batcher.NewLatencyLoop(ctrl, next)
	return t, t.loop, nil
}

// enabled reports whether the model tunes at all.
func (t *tuner) enabled() bool {
	return t != nil && (t.cfg.AutoTune || t.cfg.LatencyTargetP99 > 0)
}

// AutoTune measures the batch sizes on the runner's first engine and sets
// the batcher to the chosen ones; with a latency target it then starts
// the online controller over the chosen sizes. It runs the engine
// directly, so call it while the model is not ready (WarmUp does), and
// only once; a model without tuning configured is left as it is.
func (r *PipelineRunner) AutoTune(ctx context.Context, log *slog.Logger) error {
	t := r.tuner
	if !t.enabled() {
		return nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.started {
		return fmt.Errorf("model %q: tuned already", r.name)
	}
	t.started = true
	c, h, w := r.pre.InputShape()
	d, err := batcher.TuneBatchSizes(ctx, r.name, r.engines[0], c, h, w,
		batcher.MeasureOptions{MaxBatchSize: r.batcher.Capacity()}, batcher.TuneOptions{})
	if err != nil {
		return err
	}
	t.decision = &d
	if log != nil {
		log.Info("batch sizes tuned", "model", r.name, "backend", d.Backend, "decision", d.String(), "took", d.Took.Round(time.Millisecond))
	}
	if t.obs != nil {
		t.obs.BatchSizesTuned(d)
	}
	if t.loop == nil {
		if err := r.batcher.SetPolicy(batcher.BatchPolicy{
			MaxBatchSize: d.MaxBatchSize, PreferredBatchSizes: d.Preferred, MaxQueueDelay: t.cfg.MaxQueueDelay,
		}); err != nil {
			return err
		}
		t.policySet(r.name, r.batcher.Policy(), nil)
		return nil
	}
	ctrl, err := batcher.NewLatencyController(batcher.LatencyTarget{
		P99: t.cfg.LatencyTargetP99, Capacity: r.batcher.Capacity(), Sizes: d.Preferred,
		MaxDelay: max(t.cfg.MaxQueueDelay, t.cfg.LatencyTargetP99/4),
	})
	if err != nil {
		return fmt.Errorf("model %q: %w", r.name, err)
	}
	if err := t.loop.SetController(ctrl); err != nil {
		return fmt.Errorf("model %q: %w", r.name, err)
	}
	// Start applies the controller's start state without reporting it as
	// a change; it is told here, before the loop runs, so that it cannot
	// overtake the loop's first change. A failed Start fails the model's
	// warm-up, which removes the model and its series.
	start := ctrl.State()
	t.policySet(r.name, ctrl.Policy(start), &start)
	return t.loop.Start(r.batcher, latencyInterval, func(s batcher.ControlState) {
		if log != nil {
			log.Info("batching adapted to latency target", "model", r.name, "max_batch", s.MaxBatchSize,
				"delay", s.MaxQueueDelay, "p99", s.P99, "target", s.Target, "reason", s.Reason)
		}
		t.policySet(r.name, ctrl.Policy(s), &s)
	})
}

// policySet tells the observer, if any, the policy set on the batcher.
func (t *tuner) policySet(model string, p batcher.BatchPolicy, s *batcher.ControlState) {
	if t.obs != nil {
		t.obs.PolicySet(model, p, s)
	}
}

// Tuning reports what the self-tuner measured and chose.
func (r *PipelineRunner) Tuning() Tuning {
	out := Tuning{Policy: r.batcher.Policy()}
	if r.tuner == nil {
		return out
	}
	r.tuner.mu.Lock()
	defer r.tuner.mu.Unlock()
	out.Decision = r.tuner.decision
	if r.tuner.loop != nil {
		s := r.tuner.loop.Controller().State()
		out.Latency = &s
	}
	return out
}

// stop ends the latency controller's goroutine, if any.
func (t *tuner) stop() {
	if t != nil && t.loop != nil {
		t.loop.Stop()
	}
}

// EffectiveBatching is the model's batching config with what the
// self-tuner chose in place of the configured sizes and delay, for
// ModelInfo; a model that does not tune reports its config.
func (m *Model) EffectiveBatching() modelrepo.BatchingConfig {
	b := m.Batching
	t, ok := m.Runner.(interface{ Tuning() Tuning })
	if !ok {
		return b
	}
	tu := t.Tuning()
	if tu.Decision == nil {
		return b
	}
	p := tu.Policy
	b.MaxBatchSize, b.MaxQueueDelay = p.MaxBatchSize, p.MaxQueueDelay
	// The batcher keeps the maximum out of its preferred sizes (a full
	// batch is released anyway); the config lists it.
	b.PreferredBatchSizes = append(slices.Clone(p.PreferredBatchSizes), p.MaxBatchSize)
	return b
}
