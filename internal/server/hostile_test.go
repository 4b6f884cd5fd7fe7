package server

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// The regression tests of the unary findings of the hostile-traffic
// review: admission before reading, malformed messages, echoed strings.

// TestUnauthenticatedBodyIsNotRead: without the token a call is refused
// from its headers. Its message, even one over --max-message-bytes, is
// never read: the answer is Unauthenticated, not the ResourceExhausted
// that reading it would give.
func TestUnauthenticatedBodyIsNotRead(t *testing.T) {
	e := newEnv(t, func(c *envConfig) { c.opts.AuthToken = "s3cret" })
	big := encoded(make([]byte, 5<<20)) // over the env's 4 MiB limit
	_, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{big}})
	wantCode(t, err, codes.Unauthenticated, "bearer token")
	// With the token the same body is refused for its size.
	_, err = e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{big}},
		grpc.PerRPCCredsCallOption{Creds: bearer("s3cret")})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("oversized with the token: %v, want ResourceExhausted", err)
	}
}

// TestBearerSchemeAnyCase: RFC 7235 makes the scheme case-insensitive.
func TestBearerSchemeAnyCase(t *testing.T) {
	e := newEnv(t, func(c *envConfig) { c.opts.AuthToken = "s3cret" })
	for _, h := range []string{"Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer  s3cret"} {
		if _, err := e.vision.ListModels(ctxT(t), &visionv1.ListModelsRequest{}, grpc.PerRPCCredsCallOption{Creds: header(h)}); err != nil {
			t.Errorf("authorization %q: %v", h, err)
		}
	}
	for _, h := range []string{"Basic s3cret", "Bearers3cret", "Bearer s3cre", "s3cret"} {
		_, err := e.vision.ListModels(ctxT(t), &visionv1.ListModelsRequest{}, grpc.PerRPCCredsCallOption{Creds: header(h)})
		wantCode(t, err, codes.Unauthenticated, "bearer token")
	}
}

// header sends one authorization header as it is.
type header string

func (h header) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": string(h)}, nil
}

func (header) RequireTransportSecurity() bool { return false }

// TestConcurrentCallsBound: beyond --max-concurrent-calls a call is
// refused at once, and the count returns to zero on every path.
func TestConcurrentCallsBound(t *testing.T) {
	gate := make(chan struct{})
	e := newEnv(t, func(c *envConfig) {
		c.opts.MaxConcurrentCalls = 2
		c.cls = &modeltest.Engine{Classes: 10, Gate: gate}
	})
	img := encoded(jpegBytes(t, 20, 20, 128))
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			if _, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}}); err != nil {
				t.Errorf("admitted call: %v", err)
			}
		})
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.srv.admit.inProgress() < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	start := time.Now()
	_, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}})
	wantCode(t, err, codes.ResourceExhausted, "--max-concurrent-calls")
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusal took %v", d)
	}
	// Health checking is not an API call: it stays open.
	if got := healthStatus(t, e, ""); got != "SERVING" {
		t.Errorf("health while busy: %s", got)
	}
	close(gate)
	wg.Wait()
	// A call whose client gave up, and one refused for its size, leave no
	// count behind.
	ctx, cancel := context.WithTimeout(ctxT(t), time.Millisecond)
	_, _ = e.vision.Classify(ctx, &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}})
	cancel()
	_, _ = e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encoded(make([]byte, 5<<20))}})
	deadline = time.Now().Add(5 * time.Second)
	for e.srv.admit.inProgress() != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := e.srv.admit.inProgress(); n != 0 {
		t.Errorf("%d calls counted in progress after all ended", n)
	}
}

// rawCodec sends bytes as they are, to speak malformed protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.([]byte))}, nil
}
func (rawCodec) Unmarshal(mem.BufferSlice, any) error { return nil }
func (rawCodec) Name() string                         { return "proto" }

// TestMalformedProtobufIsInvalidArgument: bytes that are not the request
// message are the client's fault.
func TestMalformedProtobufIsInvalidArgument(t *testing.T) {
	e := newEnv(t)
	// Field 2 (images) as a length-delimited field claiming 1000 bytes
	// that are not there.
	garbage := []byte{0x12, 0xe8, 0x07, 0x01}
	var out []byte
	err := e.conn.Invoke(ctxT(t), "/visionserve.v1.VisionService/Classify", garbage, &out, grpc.ForceCodecV2(rawCodec{}))
	wantCode(t, err, codes.InvalidArgument, "malformed request message")
	err = e.conn.Invoke(ctxT(t), "/inference.GRPCInferenceService/ModelInfer", []byte{0xff, 0xff, 0xff}, &out, grpc.ForceCodecV2(rawCodec{}))
	wantCode(t, err, codes.InvalidArgument, "malformed request message")
	// A malformed frame ends a stream the same way.
	st, err := e.conn.NewStream(ctxT(t), &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/visionserve.v1.VisionService/StreamClassify", grpc.ForceCodecV2(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.SendMsg(garbage); err != nil {
		t.Fatal(err)
	}
	wantCode(t, st.RecvMsg(&out), codes.InvalidArgument, "malformed request message")
}

// TestEchoedNamesAreBounded: a huge model name comes back cut short.
func TestEchoedNamesAreBounded(t *testing.T) {
	e := newEnv(t)
	name := strings.Repeat("n", 1<<20)
	_, err := e.vision.ModelInfo(ctxT(t), &visionv1.ModelInfoRequest{Model: name})
	st, _ := status.FromError(err)
	if st.Code() != codes.NotFound || len(st.Message()) > 256 || !strings.Contains(st.Message(), "1048576 bytes") {
		t.Errorf("answer %v, %d bytes: %.100q", st.Code(), len(st.Message()), st.Message())
	}
	_, err = e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: name, Images: []*visionv1.Image{encoded([]byte("x"))}})
	if st, _ := status.FromError(err); len(st.Message()) > 256 {
		t.Errorf("Classify echoes %d bytes", len(st.Message()))
	}
}

// TestShedBeforeDecoding: a request that cannot fit in the model's queue
// is refused before any of its images is decoded. Its last image is
// corrupt: decoding first would answer InvalidArgument.
func TestShedBeforeDecoding(t *testing.T) {
	gate := make(chan struct{})
	e := newEnv(t, func(c *envConfig) { c.cls = &modeltest.Engine{Classes: 10, Gate: gate} })
	img := encoded(jpegBytes(t, 20, 20, 128))
	// Fill most of the queue (16 images; the first batch waits at the
	// gate).
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() {
			_, _ = e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img, img, img, img}})
		})
	}
	// Wait until fewer than eight places are left: the fillers alone
	// (20 images for 16 places, the first batch held at the gate) leave
	// at most four.
	m, _ := e.srv.reg.Get("cls")
	stats := m.Runner.(*model.PipelineRunner).Stats
	deadline := time.Now().Add(10 * time.Second)
	for stats().Queued <= 8 {
		if time.Now().After(deadline) {
			t.Fatalf("the fillers queued only %d images", stats().Queued)
		}
		time.Sleep(5 * time.Millisecond)
	}
	// Eight images, the last corrupt: decoding first would answer
	// InvalidArgument.
	bad := encoded([]byte("\xff\xd8\xff garbage"))
	_, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img, img, img, img, img, img, img, bad}})
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("a request that cannot fit: %v, want ResourceExhausted before any decode", err)
	}
	close(gate)
	wg.Wait()
}

// TestGzipBombStopsAtTheLimit: a compressed message that expands past
// --max-message-bytes is refused when decompression reaches the limit,
// whatever its size on the wire.
func TestGzipBombStopsAtTheLimit(t *testing.T) {
	e := newEnv(t) // 4 MiB messages
	bomb := encoded(make([]byte, 6<<20))
	_, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{bomb}}, grpc.UseCompressor(gzip.Name))
	if status.Code(err) != codes.ResourceExhausted {
		t.Errorf("gzip bomb: %v, want ResourceExhausted", err)
	}
}
