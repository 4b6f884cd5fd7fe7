package server

import (
	"context"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/model/modeltest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// TestShutdownFinishesAcceptedWork starts requests that the engine holds,
// shuts down, and checks the order: health NOT_SERVING and new calls
// refused at once, every accepted call answered, engines closed last.
func TestShutdownFinishesAcceptedWork(t *testing.T) {
	gate := make(chan struct{})
	started := make(chan struct{}, 1)
	e := newEnv(t, func(c *envConfig) { c.cls = &modeltest.Engine{Classes: 10, Gate: gate, Started: started} })
	img := encoded(jpegBytes(t, 16, 16, 10))

	const inflight = 6
	var wg sync.WaitGroup
	errs := make(chan error, inflight)
	for range inflight {
		wg.Go(func() {
			resp, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}})
			if err == nil && len(resp.Results) != 1 {
				err = status.Error(codes.Internal, "no result")
			}
			errs <- err
		})
	}
	// A stream with one frame on the engine.
	st, err := e.vision.StreamClassify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f := frame(1, img)
	f.Model = "cls"
	st.Send(f)
	<-started
	// Let the unary calls reach the queue behind the held batch.
	time.Sleep(100 * time.Millisecond)

	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background(), 10*time.Second) }()
	deadline := time.Now().Add(5 * time.Second)
	for healthStatus(t, e, VisionServiceName) == "SERVING" {
		if time.Now().After(deadline) {
			t.Fatal("health still SERVING during shutdown")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if ok, _ := e.srv.reg.Ready(); ok {
		t.Error("ready during shutdown")
	}
	// New calls are refused while the accepted ones wait.
	_, err = e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}})
	if c := status.Code(err); c != codes.Unavailable {
		t.Errorf("new call during shutdown: %v, want Unavailable", err)
	}
	select {
	case <-done:
		t.Fatal("shutdown returned with calls in flight")
	default:
	}
	if e.cls.Closed() {
		t.Fatal("engine closed with calls in flight")
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("accepted call lost: %v", err)
		}
	}
	r, err := st.Recv()
	if err != nil || r.FrameId != 1 || r.Result == nil {
		t.Errorf("stream frame in flight: %v %v", r, err)
	}
	if _, err := st.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("stream end: %v, want Unavailable", err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !e.cls.Closed() || !e.det.Closed() {
		t.Error("engines not closed after shutdown")
	}
}
