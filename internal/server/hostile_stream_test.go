package server

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/internal/metrics"
	"github.com/visionserve/visionserve/internal/metrics/metricstest"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// The regression tests of the stream findings of the hostile-traffic
// review: a client that never reads, silent streams, one client holding
// every stream, and streams that vanish mid-flight.

// gaugeValue is the value of the one series of family name whose labels
// include want; 0 when there is none.
func gaugeValue(t *testing.T, reg prometheus.Gatherer, name string, want map[string]string) float64 {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			if ms := metricstest.Matching(f, want); len(ms) == 1 {
				return ms[0].GetGauge().GetValue()
			}
		}
	}
	return 0
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestStreamSlowConsumerBoundedMemory: a client sends frames as fast as
// it can and reads nothing until it is done. The server keeps one frame
// and a count, not a queue of answers: its heap does not grow with the
// frames, and every frame is accounted for once the client reads.
func TestStreamSlowConsumerBoundedMemory(t *testing.T) {
	e := newEnv(t, func(c *envConfig) {
		c.det = &modeltest.Engine{Classes: 3, Detect: true, Anchors: 84, Delay: 20 * time.Millisecond}
	})
	st, err := e.vision.StreamDetect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	img := uint8Tensor(128, 128, 90) // 48 KiB a frame
	const n = 1500                   // 72 MiB in all
	before := heapInUse()
	for id := uint64(1); id <= n; id++ {
		f := frame(id, img)
		if id == 1 {
			f.Model = "det"
		}
		if err := st.Send(f); err != nil {
			t.Fatal(err)
		}
	}
	if grew := int64(heapInUse()) - int64(before); grew > 24<<20 {
		t.Errorf("heap grew %d MiB while %d MiB of frames went unanswered", grew>>20, n*len(img.GetTensor().GetData())>>20)
	}
	st.CloseSend()
	resps, err := recvAll(t, st)
	if err != nil {
		t.Fatal(err)
	}
	var accounted uint64
	for _, r := range resps {
		accounted += 1 + r.GetDroppedFrames()
	}
	if accounted != n || len(resps) >= n/2 {
		t.Errorf("%d responses accounting for %d of %d frames", len(resps), accounted, n)
	}
}

// TestStreamIdleTimeout: a stream that sends no frame, at first or
// later, is ended with DeadlineExceeded and frees its slot.
func TestStreamIdleTimeout(t *testing.T) {
	e := newEnv(t, func(c *envConfig) {
		c.opts.Limits.StreamIdleTimeout = 150 * time.Millisecond
		c.opts.Limits.MaxStreams = 1
	})
	silent, err := e.vision.StreamClassify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := silent.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("silent stream: %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("idle stream ended after %v", d)
	}
	// The slot is free again; a stream that sends once then falls silent
	// ends too.
	st, err := e.vision.StreamClassify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f := frame(1, encoded(jpegBytes(t, 20, 20, 128)))
	f.Model = "cls"
	if err := st.Send(f); err != nil {
		t.Fatal(err)
	}
	if r, err := st.Recv(); err != nil || r.GetResult() == nil {
		t.Fatalf("first frame: %v %v", r, err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("stream silent after a frame: %v, want DeadlineExceeded", err)
	}
}

// TestStreamPerClientLimit: one client cannot hold every stream slot.
func TestStreamPerClientLimit(t *testing.T) {
	e := newEnv(t, func(c *envConfig) { c.opts.Limits.MaxStreamsPerClient = 2 })
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	var open []visionv1.VisionService_StreamClassifyClient
	for range 2 {
		st, err := e.vision.StreamClassify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, st)
	}
	// Let both handlers take their slots.
	deadline := time.Now().Add(5 * time.Second)
	for e.srv.streams.count() < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	third, err := e.vision.StreamClassify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := third.Recv(); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third stream of one client: %v, want ResourceExhausted", err)
	}
	for _, st := range open {
		st.CloseSend()
	}
}

// TestStreamChurnBalancesInflight: streams that vanish at every point of
// their life leave the in-flight gauge, which the autoscaler reads, at
// zero, and leave no goroutine behind (goleak, at the end of the
// package's tests).
func TestStreamChurnBalancesInflight(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := metrics.New(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.ModelLoaded("cls", "fake", time.Second, time.Second)
	e := newEnv(t, func(c *envConfig) {
		c.cls = &modeltest.Engine{Classes: 10, Delay: 2 * time.Millisecond}
		c.opts.StreamInterceptors = []grpc.StreamServerInterceptor{m.StreamServerInterceptor()}
	})
	img := uint8Tensor(16, 16, 90)
	for i := range 300 {
		ctx, cancel := context.WithCancel(ctxT(t))
		st, err := e.vision.StreamClassify(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for id := range uint64(i % 5) {
			f := frame(id, img)
			f.Model = "cls"
			_ = st.Send(f)
		}
		if i%3 == 0 && i%5 != 0 {
			_, _ = st.Recv() // one frame answered, the rest in flight
		}
		cancel() // the client vanishes, mid-frame or not
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		v := gaugeValue(t, reg, metrics.InflightRequests, map[string]string{"model": "cls"})
		if v == 0 && e.srv.streams.count() == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("in flight %v, streams %d after every client left", v, e.srv.streams.count())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
