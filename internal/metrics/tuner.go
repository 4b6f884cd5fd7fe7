package metrics

import (
	"strconv"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/visionserve/visionserve/pkg/batcher"
)

// ActionWarmup is the action label of AutotunePolicyChanges for the policy
// the warm-up measurement set on a model without a latency target; the
// latency controller's changes carry its pipeline.Action* values.
const ActionWarmup = "warmup"

// tunerSeries are the self-tuning batcher's series: what the warm-up
// measurement found and chose (batching.auto_tune), and the policy in
// force, which the latency controller moves (batching.latency_target_p99).
// Every label value is bounded: batch sizes are the measured candidates,
// reasons and actions fixed words.
type tunerSeries struct {
	imagesPerSec *prometheus.GaugeVec
	preferred    *prometheus.GaugeVec
	took         *prometheus.GaugeVec
	maxBatch     *prometheus.GaugeVec
	maxDelay     *prometheus.GaugeVec
	target       *prometheus.GaugeVec
	changes      *prometheus.CounterVec

	mu sync.Mutex // serialises replacing a model's per-size series
}

func newTunerSeries() *tunerSeries {
	perSize := []string{"model", "backend", "batch_size"}
	model := []string{"model"}
	return &tunerSeries{
		imagesPerSec: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotuneBatchImagesPerSecond,
			Help: "Images per second the engine ran at each candidate batch size, measured at warm-up by the batch-size tuner (batching.auto_tune).",
		}, perSize),
		preferred: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotunePreferredBatchSize,
			Help: "1 for the batch sizes the tuner chose as preferred, 0 for those it measured and left out; reason says why (smallest, faster, dominated, slower).",
		}, append(perSize, "reason")),
		took: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotuneDurationSeconds,
			Help: "Time the batch-size tuner's warm-up measurement took.",
		}, []string{"model", "backend"}),
		maxBatch: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotuneMaxBatchSize,
			Help: "Most images per engine run in the batch policy the self-tuner set (warm-up choice, or the latency controller's current one).",
		}, model),
		maxDelay: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotuneMaxQueueDelaySeconds,
			Help: "Longest an image waits for a fuller batch in the batch policy the self-tuner set.",
		}, model),
		target: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: AutotuneLatencyTargetSeconds,
			Help: "The p99 batcher latency budget the latency controller keeps (batching.latency_target_p99).",
		}, model),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: AutotunePolicyChanges,
			Help: "Batch policies the self-tuner set, by action: warmup (the measured choice) or the latency controller's (start, smaller_batch, shorter_delay, drain_queue, bigger_batch, longer_delay).",
		}, []string{"model", "action"}),
	}
}

func (s *tunerSeries) collectors() []prometheus.Collector {
	return []prometheus.Collector{s.imagesPerSec, s.preferred, s.took, s.maxBatch, s.maxDelay, s.target, s.changes}
}

// remove deletes every series of model.
func (s *tunerSeries) remove(model string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := prometheus.Labels{"model": model}
	for _, v := range []interface{ DeletePartialMatch(prometheus.Labels) int }{
		s.imagesPerSec, s.preferred, s.took, s.maxBatch, s.maxDelay, s.target, s.changes,
	} {
		v.DeletePartialMatch(l)
	}
}

// ObserveTuneDecision records what the batch-size tuner measured for
// d.Model and which sizes it chose, replacing the series of an earlier
// decision for the model.
func (m *Metrics) ObserveTuneDecision(d batcher.TuneDecision) {
	if m == nil {
		return
	}
	s := m.tuner
	s.mu.Lock()
	defer s.mu.Unlock()
	l := prometheus.Labels{"model": d.Model}
	s.imagesPerSec.DeletePartialMatch(l)
	s.preferred.DeletePartialMatch(l)
	s.took.DeletePartialMatch(l)
	for _, ms := range d.Measurements {
		size := strconv.Itoa(ms.Size)
		s.imagesPerSec.WithLabelValues(d.Model, d.Backend, size).Set(ms.ImagesPerSec)
		chosen := 0.0
		if ms.Chosen {
			chosen = 1
		}
		s.preferred.WithLabelValues(d.Model, d.Backend, size, ms.Verdict).Set(chosen)
	}
	s.took.WithLabelValues(d.Model, d.Backend).Set(d.Took.Seconds())
}

// ObserveBatchPolicy records the batch policy the self-tuner set on
// model's batcher; ctrl is the latency controller's state that chose it,
// nil when the warm-up decision did.
func (m *Metrics) ObserveBatchPolicy(model string, p batcher.BatchPolicy, ctrl *batcher.ControlState) {
	if m == nil {
		return
	}
	s := m.tuner
	s.maxBatch.WithLabelValues(model).Set(float64(p.MaxBatchSize))
	s.maxDelay.WithLabelValues(model).Set(p.MaxQueueDelay.Seconds())
	action := ActionWarmup
	if ctrl != nil {
		action = ctrl.Action
		s.target.WithLabelValues(model).Set(ctrl.Target.Seconds())
	}
	s.changes.WithLabelValues(model, action).Inc()
}

// TuneObserver returns the batcher.TuneObserver that feeds the
// self-tuning series; give it to every model's tuner.
func (m *Metrics) TuneObserver() batcher.TuneObserver { return tuneObserver{m} }

type tuneObserver struct{ m *Metrics }

// BatchSizesTuned implements batcher.TuneObserver.
func (o tuneObserver) BatchSizesTuned(d batcher.TuneDecision) { o.m.ObserveTuneDecision(d) }

// PolicySet implements batcher.TuneObserver.
func (o tuneObserver) PolicySet(model string, p batcher.BatchPolicy, s *batcher.ControlState) {
	o.m.ObserveBatchPolicy(model, p, s)
}
