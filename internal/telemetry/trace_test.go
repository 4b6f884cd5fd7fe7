package telemetry_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/test/bufconn"

	"github.com/visionserve/visionserve/internal/telemetry"
	"github.com/visionserve/visionserve/pkg/batcher"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
	"github.com/visionserve/visionserve/pkg/pipeline"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// item keeps a result with the stage timings the server would give it.
type item struct{ res pipeline.Result }

func (*item) Fill([]float32) error { return nil }
func (it *item) Postprocess(_ []engine.Tensor, _ int, run batcher.Run) error {
	it.res = pipeline.Result{Timings: pipeline.StageTimings{
		Decode: time.Millisecond, Queue: run.Queue, Preprocess: run.Fill, Inference: run.Inference,
	}}
	return nil
}

// vision serves Classify through a real batcher and records the stage
// spans as the server does, and logs one line with the request context.
type vision struct {
	visionv1.UnimplementedVisionServiceServer
	b   *batcher.Batcher
	log *slog.Logger
}

func (v *vision) Classify(ctx context.Context, req *visionv1.ClassifyRequest) (*visionv1.ClassifyResponse, error) {
	start := time.Now()
	items := make([]batcher.Item, len(req.GetImages()))
	res := make([]pipeline.Result, len(items))
	for i := range items {
		items[i] = &item{}
	}
	if err := v.b.Submit(ctx, "k", items); err != nil {
		return nil, err
	}
	for i, it := range items {
		res[i] = it.(*item).res
	}
	telemetry.RecordResults(ctx, req.GetModel(), start, res)
	v.log.InfoContext(ctx, "classified", "images", len(res))
	return &visionv1.ClassifyResponse{Model: req.GetModel()}, nil
}

// TestTraceOfBatchedRequests sends concurrent requests through otelgrpc,
// the request-id interceptor and a real batcher, then checks the spans in
// an in-memory exporter: each request span carries its request id and
// has the five stage spans as children, each batch span is a root linked
// to the request spans it served, and the engine run is the batch's child.
func TestTraceOfBatchedRequests(t *testing.T) {
	setEnv(t, nil)
	exp := tracetest.NewInMemoryExporter()
	shutdown, err := telemetry.Setup(context.Background(), telemetry.Options{Exporter: exp, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer shutdown(context.Background())
	var logs syncBuffer
	log, err := telemetry.NewLogger(&logs, telemetry.LogJSON, slog.LevelDebug)
	if err != nil {
		t.Fatal(err)
	}
	b, err := batcher.New(batcher.Config{
		Model: "resnet50", MaxBatchSize: 8, MaxQueueDelay: 20 * time.Millisecond,
		C: 1, H: 1, W: 1, Engines: []engine.Engine{telemetry.TraceEngine(&enginefake.Engine{Delay: 3 * time.Millisecond})},
		Observer: telemetry.BatchTracer{Next: batcher.NopBatchObserver{}},
	})
	if err != nil {
		t.Fatal(err)
	}
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer(
		telemetry.GRPCServerOption(),
		grpc.ChainUnaryInterceptor(telemetry.UnaryServerInterceptor(log)),
	)
	visionv1.RegisterVisionServiceServer(srv, &vision{b: b, log: log})
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	client := visionv1.NewVisionServiceClient(conn)

	// Four requests at once, so that they share batches; the first chooses
	// its request id, one sends an id that must be replaced.
	ids := []string{"client-chosen-1", "", "bad id with spaces", ""}
	echoed := make([]string, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			ctx := context.Background()
			if id != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, telemetry.RequestIDHeader, id)
			}
			var header metadata.MD
			img := &visionv1.Image{Source: &visionv1.Image_Encoded{Encoded: []byte("x")}}
			if _, err := client.Classify(ctx, &visionv1.ClassifyRequest{Model: "resnet50", Images: []*visionv1.Image{img, img}}, grpc.Header(&header)); err != nil {
				t.Error(err)
				return
			}
			if v := header.Get(telemetry.RequestIDHeader); len(v) == 1 {
				echoed[i] = v[0]
			}
		})
	}
	wg.Wait()
	conn.Close()
	srv.GracefulStop()
	<-served
	if err := b.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	flush(t)

	if echoed[0] != "client-chosen-1" {
		t.Errorf("request id echoed = %q, want the client's", echoed[0])
	}
	for i := 1; i < len(ids); i++ {
		if len(echoed[i]) != 32 || strings.Contains(echoed[i], " ") {
			t.Errorf("request %d: echoed id %q, want a generated one", i, echoed[i])
		}
	}

	spans := exp.GetSpans()
	byID := map[trace.SpanID]tracetest.SpanStub{}
	for _, s := range spans {
		byID[s.SpanContext.SpanID()] = s
	}
	requests := map[trace.SpanID]string{} // request span -> its request id
	for _, s := range spans {
		if s.Name != "visionserve.v1.VisionService/Classify" {
			continue
		}
		for _, a := range s.Attributes {
			if string(a.Key) == telemetry.SpanAttrRequestID {
				requests[s.SpanContext.SpanID()] = a.Value.AsString()
			}
		}
	}
	if len(requests) != len(ids) {
		t.Fatalf("%d request spans with a request id, want %d; spans: %v", len(requests), len(ids), names(spans))
	}
	for i, id := range echoed {
		found := false
		for _, rid := range requests {
			found = found || rid == id
		}
		if !found {
			t.Errorf("request %d: id %q is on no request span", i, id)
		}
	}

	// Stage spans: five per request, children of the request span.
	stages := map[trace.SpanID]map[string]bool{}
	for _, s := range spans {
		switch s.Name {
		case telemetry.SpanDecode, telemetry.SpanQueue, telemetry.SpanPreprocess, telemetry.SpanPostprocess:
		case telemetry.SpanInference:
			if _, isBatch := byID[s.Parent.SpanID()]; isBatch && byID[s.Parent.SpanID()].Name == telemetry.SpanBatch {
				continue // the engine's run, checked below
			}
		default:
			continue
		}
		p := s.Parent.SpanID()
		if _, ok := requests[p]; !ok {
			t.Errorf("%s span's parent is not a request span", s.Name)
			continue
		}
		if stages[p] == nil {
			stages[p] = map[string]bool{}
		}
		stages[p][s.Name] = true
	}
	for p := range requests {
		if len(stages[p]) != 5 {
			t.Errorf("request %s has stage spans %v, want all five", requests[p], stages[p])
		}
	}

	// Batch spans: roots, linked to the request spans, each with an
	// engine run as a child.
	linked := map[trace.SpanID]bool{}
	batches := map[trace.SpanID]bool{}
	for _, s := range spans {
		if s.Name != telemetry.SpanBatch {
			continue
		}
		batches[s.SpanContext.SpanID()] = true
		if s.Parent.IsValid() {
			t.Error("batch span has a parent")
		}
		if len(s.Links) == 0 {
			t.Error("batch span links to no request")
		}
		for _, l := range s.Links {
			if _, ok := requests[l.SpanContext.SpanID()]; !ok {
				t.Errorf("batch span links to %v, not a request span", l.SpanContext.SpanID())
			}
			linked[l.SpanContext.SpanID()] = true
		}
	}
	if len(linked) != len(requests) {
		t.Errorf("batch spans link to %d of %d requests", len(linked), len(requests))
	}
	runs := 0
	for _, s := range spans {
		if s.Name == telemetry.SpanInference && batches[s.Parent.SpanID()] {
			runs++
		}
	}
	if runs != len(batches) || runs == 0 {
		t.Errorf("%d engine run spans under %d batch spans", runs, len(batches))
	}

	// Every log line of a request carries its request id and trace id.
	lines := 0
	for line := range strings.SplitSeq(strings.TrimSpace(logs.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		lines++
		if rec[telemetry.LogKeyRequestID] == "" || rec[telemetry.LogKeyRequestID] == nil || rec[telemetry.LogKeyTraceID] == nil {
			t.Errorf("log line without request or trace id: %s", line)
		}
	}
	if lines != 2*len(ids) { // "classified" and the call's own line
		t.Errorf("%d log lines, want %d:\n%s", lines, 2*len(ids), logs.String())
	}
}

func names(spans tracetest.SpanStubs) []string {
	var n []string
	for _, s := range spans {
		n = append(n, s.Name)
	}
	return n
}

// syncBuffer is a bytes.Buffer safe for the concurrent writes of a logger.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// allocEngine is an engine with its own batch buffers.
type allocEngine struct{ enginefake.Engine }

func (*allocEngine) AllocBatch(maxN, c, h, w int) ([]float32, func(), error) {
	return make([]float32, maxN*c*h*w), func() {}, nil
}

func TestTraceEngineKeepsTheAllocator(t *testing.T) {
	traced := telemetry.TraceEngines([]engine.Engine{&enginefake.Engine{}, &allocEngine{}})
	if _, ok := traced[0].(engine.BatchAllocator); ok {
		t.Error("an engine without an allocator gained one")
	}
	if _, ok := traced[1].(engine.BatchAllocator); !ok {
		t.Error("the engine's allocator was lost")
	}
	if traced[1].Backend() != "fake" {
		t.Errorf("backend %q", traced[1].Backend())
	}
}
