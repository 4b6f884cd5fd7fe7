package telemetry

import (
	"context"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Span names of the pipeline stages and of a batch.
const (
	SpanDecode      = "decode"
	SpanQueue       = "queue"
	SpanPreprocess  = "preprocess"
	SpanInference   = "inference"
	SpanPostprocess = "postprocess"
	SpanBatch       = "batch"
)

// Span attribute keys of visionserve's own spans.
const (
	AttrModel     = "visionserve.model"
	AttrBackend   = "visionserve.backend"
	AttrImages    = "visionserve.images"
	AttrBatchSize = "visionserve.batch.size"
	AttrBatchSeq  = "visionserve.batch.seq"
	AttrReason    = "visionserve.batch.reason"
	AttrWorker    = "visionserve.batch.worker"
)

// RecordStages adds one span per pipeline stage (decode, queue,
// preprocess, inference, postprocess) under the request span in ctx, for
// a request that started at start and whose images took timings. The
// stages of a request's images overlap (they share batches), so each
// stage span lasts as long as that stage took for the slowest image; the
// spans are laid end to end from start in pipeline order, because the
// timings are durations measured where the work ran (on batch workers),
// not timestamps. It does nothing when ctx's span is not recording.
func RecordStages(ctx context.Context, model string, start time.Time, timings ...pipeline.StageTimings) {
	if !trace.SpanFromContext(ctx).IsRecording() || len(timings) == 0 {
		return
	}
	var longest pipeline.StageTimings
	for _, t := range timings {
		longest.Decode = max(longest.Decode, t.Decode)
		longest.Queue = max(longest.Queue, t.Queue)
		longest.Preprocess = max(longest.Preprocess, t.Preprocess)
		longest.Inference = max(longest.Inference, t.Inference)
		longest.Postprocess = max(longest.Postprocess, t.Postprocess)
	}
	attrs := trace.WithAttributes(attribute.String(AttrModel, model), attribute.Int(AttrImages, len(timings)))
	at := start
	for _, s := range [...]struct {
		name string
		d    time.Duration
	}{
		{SpanDecode, longest.Decode},
		{SpanQueue, longest.Queue},
		{SpanPreprocess, longest.Preprocess},
		{SpanInference, longest.Inference},
		{SpanPostprocess, longest.Postprocess},
	} {
		_, span := Tracer().Start(ctx, s.name, trace.WithTimestamp(at), attrs)
		at = at.Add(s.d)
		span.End(trace.WithTimestamp(at))
	}
}

// RecordResults is RecordStages for the results a batcher returned.
func RecordResults(ctx context.Context, model string, start time.Time, results []pipeline.Result) {
	if !trace.SpanFromContext(ctx).IsRecording() || len(results) == 0 {
		return
	}
	timings := make([]pipeline.StageTimings, len(results))
	for i := range results {
		timings[i] = results[i].Timings
	}
	RecordStages(ctx, model, start, timings...)
}

// BatchTracer is a batcher.BatchObserver that gives every batch a span
// of its own, linked to the spans of all the requests whose images it
// ran: a batch serves many traces at once, so it cannot be the child of
// one. It passes every event on to Next.
type BatchTracer struct {
	// Next receives every event after the tracer; nil for none.
	Next batcher.BatchObserver
}

// Enqueued implements batcher.BatchObserver.
func (t BatchTracer) Enqueued(e batcher.BatchEnqueueEvent) {
	if t.Next != nil {
		t.Next.Enqueued(e)
	}
}

// Rejected implements batcher.BatchObserver.
func (t BatchTracer) Rejected(e batcher.BatchRejectEvent) {
	if t.Next != nil {
		t.Next.Rejected(e)
	}
}

// Dropped implements batcher.BatchObserver.
func (t BatchTracer) Dropped(e batcher.BatchDropEvent) {
	if t.Next != nil {
		t.Next.Dropped(e)
	}
}

// BatchReleased implements batcher.BatchObserver: it starts the batch
// span, a new root linked to each request's span. The engine runs with the
// returned context, so spans the engine starts are the batch's children.
func (t BatchTracer) BatchReleased(ctx context.Context, e batcher.BatchReleaseEvent) context.Context {
	links := make([]trace.Link, 0, len(e.Requests))
	for _, rc := range e.Requests {
		sc := trace.SpanContextFromContext(rc)
		if !sc.IsValid() {
			continue
		}
		link := trace.Link{SpanContext: sc}
		if id := RequestID(rc); id != "" {
			link.Attributes = []attribute.KeyValue{attribute.String(SpanAttrRequestID, id)}
		}
		links = append(links, link)
	}
	ctx, _ = Tracer().Start(ctx, SpanBatch,
		trace.WithNewRoot(),
		trace.WithLinks(links...),
		trace.WithAttributes(
			attribute.String(AttrModel, e.Model),
			attribute.Int(AttrBatchSize, e.Size),
			attribute.String(AttrReason, e.Reason),
			attribute.Int(AttrWorker, e.Worker),
			attribute.Int64(AttrBatchSeq, int64(e.Seq)),
		))
	if t.Next != nil {
		ctx = t.Next.BatchReleased(ctx, e)
	}
	return ctx
}

// BatchDone implements batcher.BatchObserver: it ends the batch span.
func (t BatchTracer) BatchDone(ctx context.Context, e batcher.BatchDoneEvent) {
	if t.Next != nil {
		t.Next.BatchDone(ctx, e)
	}
	span := trace.SpanFromContext(ctx)
	span.SetAttributes(attribute.String(AttrBackend, e.Backend), attribute.Int(AttrImages, e.Size))
	if e.Err != nil {
		span.RecordError(e.Err)
		span.SetStatus(codes.Error, e.Err.Error())
	}
	span.End()
}

// TraceEngine wraps e so that every Run is an inference span, a child of
// the batch span the batcher passes in its context. The wrapper keeps e's
// pinned-memory allocator when it has one.
func TraceEngine(e engine.Engine) engine.Engine {
	te := tracedEngine{e}
	if a, ok := e.(engine.BatchAllocator); ok {
		return tracedAllocEngine{te, a}
	}
	return te
}

// TraceEngines applies TraceEngine to each engine, in a new slice.
func TraceEngines(es []engine.Engine) []engine.Engine {
	out := make([]engine.Engine, len(es))
	for i, e := range es {
		out[i] = TraceEngine(e)
	}
	return out
}

type tracedEngine struct{ engine.Engine }

// Run implements engine.Engine.
func (e tracedEngine) Run(ctx context.Context, b *engine.Batch) ([]engine.Tensor, error) {
	ctx, span := Tracer().Start(ctx, SpanInference, trace.WithAttributes(
		attribute.String(AttrBackend, e.Backend()),
		attribute.Int(AttrBatchSize, b.N),
	))
	defer span.End()
	out, err := e.Engine.Run(ctx, b)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	return out, err
}

type tracedAllocEngine struct {
	tracedEngine
	engine.BatchAllocator
}
