// Package metrics defines visionserve's Prometheus metrics: request and
// image counters by gRPC code, per-stage latency histograms, batcher and
// queue series, the self-tuning batcher's choices (tuner.go), model load
// and backend series, and the GPU series read
// through NVML. Everything registers on a registry passed in, never on the
// global one, so tests and embedders get a clean set.
//
// Latency is one histogram, visionserve_stage_duration_seconds, with a
// stage label (queue, decode, preprocess, inference, postprocess, total)
// rather than one histogram per stage: a single name keeps dashboards and
// recording rules to one query per model (sum by (stage)), and the stages
// share buckets so they can be stacked and compared.
package metrics

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metric names, exported so that the Kubernetes manifests' tests and the
// prometheus-adapter rules can be checked against what the server exports.
const (
	RequestsTotal         = "visionserve_requests_total"
	ImagesTotal           = "visionserve_images_total"
	StageDurationSeconds  = "visionserve_stage_duration_seconds"
	BatchSize             = "visionserve_batch_size"
	BatchesTotal          = "visionserve_batches_total"
	QueueDepth            = "visionserve_queue_depth"
	QueueOldestAgeSeconds = "visionserve_queue_oldest_age_seconds"
	QueueDroppedImages    = "visionserve_queue_dropped_images_total"
	InflightRequests      = "visionserve_inflight_requests"
	StreamFramesDropped   = "visionserve_stream_frames_dropped_total"
	ModelBackendInfo      = "visionserve_model_backend_info"
	ModelState            = "visionserve_model_state"
	ModelLoadSeconds      = "visionserve_model_load_duration_seconds"
	ModelWarmupSeconds    = "visionserve_model_warmup_duration_seconds"
	GPUMemoryUsedBytes    = "visionserve_gpu_memory_used_bytes"
	GPUMemoryTotalBytes   = "visionserve_gpu_memory_total_bytes"
	GPUUtilizationRatio   = "visionserve_gpu_utilization_ratio"
	GPUModelMemoryBytes   = "visionserve_gpu_model_memory_bytes"

	AutotuneBatchImagesPerSecond = "visionserve_autotune_batch_images_per_second"
	AutotunePreferredBatchSize   = "visionserve_autotune_preferred_batch_size"
	AutotuneDurationSeconds      = "visionserve_autotune_duration_seconds"
	AutotuneMaxBatchSize         = "visionserve_autotune_max_batch_size"
	AutotuneMaxQueueDelaySeconds = "visionserve_autotune_max_queue_delay_seconds"
	AutotuneLatencyTargetSeconds = "visionserve_autotune_latency_target_seconds"
	AutotunePolicyChanges        = "visionserve_autotune_policy_changes_total"
)

// AutoscalingMetric is the per-pod saturation series the
// HorizontalPodAutoscaler scales on (through prometheus-adapter): requests
// and stream frames accepted but not yet answered. It rises as soon as the
// batcher falls behind, before CPU or GPU utilisation says so.
const AutoscalingMetric = InflightRequests

// Stage label values of StageDurationSeconds.
const (
	StageQueue       = "queue"
	StageDecode      = "decode"
	StagePreprocess  = "preprocess"
	StageInference   = "inference"
	StagePostprocess = "postprocess"
	StageTotal       = "total"
)

// Reasons a batch is released, the reason label of BatchesTotal.
const (
	ReasonFull      = "full"      // max_batch_size images are queued
	ReasonPreferred = "preferred" // a preferred batch size is reached
	ReasonDelay     = "delay"     // max_queue_delay passed for the oldest image
	ReasonDeadline  = "deadline"  // an image's deadline would pass waiting longer
	ReasonDrain     = "drain"     // the server is shutting down and runs what is queued
)

// UnknownModel is the model label of requests naming a model the server
// does not hold. Client-chosen names never become label values: that would
// let any client grow the series without bound. It is not a valid model
// name (those start with a letter or digit), so it cannot collide.
const UnknownModel = "_unknown"

// stageBuckets span 100µs to ~26s: decode and preprocess of one image take
// well under a millisecond to a few; a queued request on a saturated CPU
// server can wait seconds.
var stageBuckets = prometheus.ExponentialBuckets(0.0001, 2, 19)

// batchBuckets are the batch sizes models are configured with.
var batchBuckets = []float64{1, 2, 4, 8, 16, 32, 64, 128}

// Metrics holds visionserve's collectors. Its methods are safe for
// concurrent use; a nil *Metrics records nothing, so components can take
// one optionally.
type Metrics struct {
	requests      *prometheus.CounterVec
	images        *prometheus.CounterVec
	stages        *prometheus.HistogramVec
	batchSize     *prometheus.HistogramVec
	batches       *prometheus.CounterVec
	inflight      *prometheus.GaugeVec
	dropped       *prometheus.CounterVec
	backendInfo   *prometheus.GaugeVec
	state         *prometheus.GaugeVec
	loadSeconds   *prometheus.GaugeVec
	warmupSeconds *prometheus.GaugeVec
	queueDropped  *prometheus.CounterVec
	queues        *queueCollector
	tuner         *tunerSeries

	mu     sync.RWMutex            // guards the fields below
	models map[string]*modelSeries // loaded models by name
}

// modelSeries is a loaded model's backend and its stage histograms, looked
// up once at load rather than hashed per image on the hot path.
type modelSeries struct {
	backend string
	stages  [len(imageStages)]prometheus.Observer
	total   prometheus.Observer
}

// imageStages are the per-image stages in Timings order.
var imageStages = [...]string{StageQueue, StageDecode, StagePreprocess, StageInference, StagePostprocess}

// NewRegistry returns an empty registry with the Go runtime and process
// collectors, the base every visionserve registry starts from.
func NewRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return reg
}

// New creates visionserve's metrics and registers them on reg. It fails
// only if reg already holds metrics of the same names.
func New(reg prometheus.Registerer) (*Metrics, error) {
	modelBackend := []string{"model", "backend"}
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: RequestsTotal,
			Help: "Requests (unary calls, or frames of a stream) answered, by model, backend and gRPC status code.",
		}, []string{"model", "backend", "code"}),
		images: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: ImagesTotal,
			Help: "Images in answered requests, by model, backend and gRPC status code of their request.",
		}, []string{"model", "backend", "code"}),
		stages: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    StageDurationSeconds,
			Help:    "Time per image in each pipeline stage (queue, decode, preprocess, inference, postprocess) and server time of whole successful requests (total).",
			Buckets: stageBuckets,
		}, []string{"model", "backend", "stage"}),
		batchSize: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    BatchSize,
			Help:    "Images per engine run.",
			Buckets: batchBuckets,
		}, modelBackend),
		batches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: BatchesTotal,
			Help: "Batches released to an engine, by the reason they were released (full, preferred, delay, deadline).",
		}, []string{"model", "backend", "reason"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: InflightRequests,
			Help: "Requests and stream frames accepted and not yet answered.",
		}, []string{"model"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: StreamFramesDropped,
			Help: "Stream frames answered as dropped because a newer frame replaced them.",
		}, modelBackend),
		backendInfo: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: ModelBackendInfo,
			Help: "The backend serving each loaded model (always 1).",
		}, modelBackend),
		state: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: ModelState,
			Help: "1 for each known model's state (LOADING, READY, UNAVAILABLE, UNLOADING), 0 for the others.",
		}, []string{"model", "state"}),
		loadSeconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: ModelLoadSeconds,
			Help: "Time the last load of each model took, without warm-up.",
		}, modelBackend),
		warmupSeconds: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: ModelWarmupSeconds,
			Help: "Time the warm-up of each model took after loading: its warm-up batch and, with batching.auto_tune, the batch-size measurement.",
		}, modelBackend),
		queueDropped: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: QueueDroppedImages,
			Help: "Queued images removed without being run: their deadline passed, their client went away, or shutdown ran out of time.",
		}, []string{"model", "reason"}),
		queues: newQueueCollector(),
		tuner:  newTunerSeries(),
		models: map[string]*modelSeries{},
	}
	for _, c := range append([]prometheus.Collector{
		m.requests, m.images, m.stages, m.batchSize, m.batches, m.inflight,
		m.dropped, m.backendInfo, m.state, m.loadSeconds, m.warmupSeconds, m.queueDropped, m.queues,
	}, m.tuner.collectors()...) {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// ModelLoaded records that model is loaded and warmed up on backend, and
// how long each took. From then on the model's name is a label value.
func (m *Metrics) ModelLoaded(model, backend string, load, warmup time.Duration) {
	if m == nil {
		return
	}
	series := &modelSeries{backend: backend, total: m.stages.WithLabelValues(model, backend, StageTotal)}
	for i, stage := range imageStages {
		series.stages[i] = m.stages.WithLabelValues(model, backend, stage)
	}
	m.mu.Lock()
	old, had := m.models[model]
	m.models[model] = series
	m.mu.Unlock()
	if had && old.backend != backend {
		m.backendInfo.DeleteLabelValues(model, old.backend)
		m.loadSeconds.DeleteLabelValues(model, old.backend)
		m.warmupSeconds.DeleteLabelValues(model, old.backend)
	}
	m.backendInfo.WithLabelValues(model, backend).Set(1)
	// The autoscaling series exists, at 0, from the moment the model
	// serves: an idle pod reports 0 in-flight requests rather than no
	// series, which prometheus-adapter would answer with "metric not found"
	// and the HPA would hold as an invalid metric (no scale-down). It is
	// not deleted on unload: requests still in flight decrement it.
	m.inflight.WithLabelValues(model)
	m.loadSeconds.WithLabelValues(model, backend).Set(load.Seconds())
	m.warmupSeconds.WithLabelValues(model, backend).Set(warmup.Seconds())
}

// ModelUnloaded removes model's backend, load and self-tuning series.
func (m *Metrics) ModelUnloaded(model string) {
	if m == nil {
		return
	}
	m.mu.Lock()
	series, had := m.models[model]
	delete(m.models, model)
	m.mu.Unlock()
	if had {
		m.backendInfo.DeleteLabelValues(model, series.backend)
		m.loadSeconds.DeleteLabelValues(model, series.backend)
		m.warmupSeconds.DeleteLabelValues(model, series.backend)
	}
	m.queues.remove(model)
	m.tuner.remove(model)
}

// labels returns the model and backend label values for a model name
// taken from a request: UnknownModel and "" for a model not loaded.
func (m *Metrics) labels(model string) (string, string) {
	model, series := m.series(model)
	if series == nil {
		return model, ""
	}
	return model, series.backend
}

// series returns the model label value and, for a loaded model, its
// series; UnknownModel and nil otherwise.
func (m *Metrics) series(model string) (string, *modelSeries) {
	m.mu.RLock()
	series, ok := m.models[model]
	m.mu.RUnlock()
	if !ok {
		return UnknownModel, nil
	}
	return model, series
}

// Timings are the stage durations of one image; a zero field is a stage
// the image did not go through and is not observed.
type Timings struct {
	Queue, Decode, Preprocess, Inference, Postprocess time.Duration
}

// ObserveImage records the stage timings of one image served by model.
func (m *Metrics) ObserveImage(model string, t Timings) {
	if m == nil {
		return
	}
	model, series := m.series(model)
	for i, d := range [...]time.Duration{t.Queue, t.Decode, t.Preprocess, t.Inference, t.Postprocess} {
		if d <= 0 {
			continue
		}
		if series != nil {
			series.stages[i].Observe(d.Seconds())
		} else {
			m.stages.WithLabelValues(model, "", imageStages[i]).Observe(d.Seconds())
		}
	}
}

// ObserveRequest records one answered request (or stream frame) of model
// with its gRPC code name, the number of images it carried, and, for a
// successful one, its total server time (zero leaves total unobserved).
func (m *Metrics) ObserveRequest(model, code string, images int, total time.Duration) {
	if m == nil {
		return
	}
	model, series := m.series(model)
	backend := ""
	if series != nil {
		backend = series.backend
	}
	m.requests.WithLabelValues(model, backend, code).Inc()
	if images > 0 {
		m.images.WithLabelValues(model, backend, code).Add(float64(images))
	}
	if total > 0 && code == "OK" {
		if series != nil {
			series.total.Observe(total.Seconds())
		} else {
			m.stages.WithLabelValues(model, backend, StageTotal).Observe(total.Seconds())
		}
	}
}

// InflightAdd adds delta to model's in-flight requests.
func (m *Metrics) InflightAdd(model string, delta int) {
	if m == nil {
		return
	}
	model, _ = m.labels(model)
	m.inflight.WithLabelValues(model).Add(float64(delta))
}

// StreamFramesDropped counts n frames of model's stream that newer
// frames replaced before they were served.
func (m *Metrics) StreamFramesDropped(model string, n int) {
	if m == nil || n <= 0 {
		return
	}
	model, backend := m.labels(model)
	m.dropped.WithLabelValues(model, backend).Add(float64(n))
}

// ObserveBatch records one batch released to model's engine on backend
// for reason (ReasonFull, ReasonPreferred, ReasonDelay, ReasonDeadline,
// ReasonDrain) that ran size images (0: all were cancelled before it ran).
// model is the server's own name for the model, never a client's.
func (m *Metrics) ObserveBatch(model, backend string, size int, reason string) {
	if m == nil {
		return
	}
	if size > 0 {
		m.batchSize.WithLabelValues(model, backend).Observe(float64(size))
	}
	m.batches.WithLabelValues(model, backend, reason).Inc()
}

// ObserveDroppedImages counts images removed from model's queue without
// being run, for reason (deadline, canceled, shutdown).
func (m *Metrics) ObserveDroppedImages(model string, images int, reason string) {
	if m == nil {
		return
	}
	m.queueDropped.WithLabelValues(model, reason).Add(float64(images))
}

// QueueStats is the state of one model's queue at scrape time.
type QueueStats struct {
	Depth     int           // images waiting for a batch
	OldestAge time.Duration // how long the oldest of them has waited; 0 when empty
}

// TrackQueue makes every scrape read model's queue state from stats, so
// the depth and the age of the oldest item are current rather than as of
// the last event. stats is called from the scraping goroutine and must be
// safe for that; a later call for the same model replaces it.
func (m *Metrics) TrackQueue(model string, stats func() QueueStats) {
	if m == nil {
		return
	}
	m.queues.set(model, stats)
}

// queueCollector reads each model's queue when scraped.
type queueCollector struct {
	depth, age *prometheus.Desc

	mu    sync.Mutex // guards the fields below
	stats map[string]func() QueueStats
}

func newQueueCollector() *queueCollector {
	return &queueCollector{
		depth: prometheus.NewDesc(QueueDepth,
			"Images waiting in the model's queue for a batch.", []string{"model"}, nil),
		age: prometheus.NewDesc(QueueOldestAgeSeconds,
			"How long the oldest image in the model's queue has waited; 0 when the queue is empty.", []string{"model"}, nil),
		stats: map[string]func() QueueStats{},
	}
}

func (c *queueCollector) set(model string, stats func() QueueStats) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stats[model] = stats
}

func (c *queueCollector) remove(model string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.stats, model)
}

// Describe implements prometheus.Collector.
func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.age
}

// Collect implements prometheus.Collector.
func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	stats := make(map[string]func() QueueStats, len(c.stats))
	for model, f := range c.stats {
		stats[model] = f
	}
	c.mu.Unlock()
	// The providers run without c.mu held: they take the batcher's lock,
	// and holding ours too would order the two locks for no reason.
	for model, f := range stats {
		s := f()
		ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(s.Depth), model)
		ch <- prometheus.MustNewConstMetric(c.age, prometheus.GaugeValue, s.OldestAge.Seconds(), model)
	}
}
