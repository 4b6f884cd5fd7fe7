package batcher

// TuneObserver is told what the self-tuner decided, for metrics: what the
// warm-up measurement chose and each policy it then set on a model's
// batcher. Methods are called from the tuning goroutine (warm-up, or a
// LatencyLoop's); they must be fast and must not call back into the
// Batcher or the tuner.
type TuneObserver interface {
	// BatchSizesTuned: the batch sizes of d.Model were measured and
	// chosen.
	BatchSizesTuned(d TuneDecision)
	// PolicySet: the self-tuner set model's batcher to p. s is the state
	// of the latency controller that chose p, nil when the warm-up
	// decision alone did (no latency target).
	PolicySet(model string, p BatchPolicy, s *ControlState)
}
