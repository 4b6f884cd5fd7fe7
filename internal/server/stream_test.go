package server

import (
	"context"
	"io"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/visionserve/visionserve/pkg/model/modeltest"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

func frame(id uint64, img *visionv1.Image) *visionv1.StreamRequest {
	return &visionv1.StreamRequest{FrameId: id, Timestamp: timestamppb.New(time.Unix(int64(id), 0)), Image: img}
}

// recvAll reads responses until the stream ends.
func recvAll(t *testing.T, st visionv1.VisionService_StreamDetectClient) ([]*visionv1.StreamResponse, error) {
	t.Helper()
	var out []*visionv1.StreamResponse
	for {
		r, err := st.Recv()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, r)
	}
}

func TestStreamInOrderEveryFrameAnswered(t *testing.T) {
	e := newEnv(t)
	st, err := e.vision.StreamDetect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	img := uint8Tensor(48, 64, 90)
	const n = 30
	for id := uint64(1); id <= n; id++ {
		f := frame(id, img)
		if id == 1 {
			f.Model = "det"
		}
		if err := st.Send(f); err != nil {
			t.Fatal(err)
		}
	}
	st.CloseSend()
	resps, err := recvAll(t, st)
	if err != nil {
		t.Fatal(err)
	}
	// Every frame is answered or counted as dropped in the next answer,
	// exactly once; answers come in order.
	var accounted uint64
	last := uint64(0)
	for _, r := range resps {
		if r.FrameId <= last {
			t.Fatalf("frame %d answered after frame %d", r.FrameId, last)
		}
		if r.FrameId-last-1 != r.DroppedFrames {
			t.Errorf("frame %d: %d dropped, but %d frames came since frame %d", r.FrameId, r.DroppedFrames, r.FrameId-last-1, last)
		}
		last = r.FrameId
		accounted += 1 + r.DroppedFrames
		if r.Dropped || r.Result == nil || len(r.Result.Detections) != 1 || r.Result.Width != 64 || r.Timestamp.AsTime().Unix() != int64(r.FrameId) {
			t.Errorf("frame %d: result %v", r.FrameId, r.Result)
		}
	}
	if accounted != n || last != n {
		t.Errorf("%d frames accounted for of %d; the last (%d) must be served", accounted, n, last)
	}
}

func TestStreamKeepsNewestFrameAndCountsDrops(t *testing.T) {
	started := make(chan struct{}, 1)
	e := newEnv(t, func(c *envConfig) {
		c.det = &modeltest.Engine{Classes: 3, Detect: true, Anchors: 84, Delay: 300 * time.Millisecond, Started: started}
	})
	st, err := e.vision.StreamDetect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	img := uint8Tensor(16, 16, 90)
	f := frame(1, img)
	f.Model = "det"
	if err := st.Send(f); err != nil {
		t.Fatal(err)
	}
	<-started
	// Frames 2..10 arrive while frame 1 is on the slow engine: only 10,
	// the newest, is kept; its answer counts 2..9 as dropped.
	for id := uint64(2); id <= 10; id++ {
		if err := st.Send(frame(id, img)); err != nil {
			t.Fatal(err)
		}
	}
	st.CloseSend()
	resps, err := recvAll(t, st)
	if err != nil {
		t.Fatal(err)
	}
	if len(resps) != 2 || resps[0].FrameId != 1 || resps[0].DroppedFrames != 0 || resps[1].FrameId != 10 || resps[1].DroppedFrames != 8 {
		for _, r := range resps {
			t.Logf("frame %d dropped before it %d", r.FrameId, r.DroppedFrames)
		}
		t.Errorf("want frame 1, then frame 10 counting 8 dropped")
	}
	if runs := e.det.Runs(); runs != 2 {
		t.Errorf("engine ran %d times, want 2", runs)
	}
}

func TestStreamBadFrameDoesNotEndStream(t *testing.T) {
	e := newEnv(t)
	st, err := e.vision.StreamClassify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	good := encoded(jpegBytes(t, 20, 20, 128))
	frames := []*visionv1.StreamRequest{frame(1, good), frame(2, encoded([]byte("junk"))), frame(3, good)}
	frames[0].Model = "cls"
	for _, f := range frames {
		if err := st.Send(f); err != nil {
			t.Fatal(err)
		}
		// One at a time, so that none is dropped.
		r, err := st.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if r.FrameId != f.FrameId {
			t.Fatalf("got frame %d, want %d", r.FrameId, f.FrameId)
		}
		if f.FrameId == 2 {
			if r.Error == nil || codes.Code(r.Error.Code) != codes.InvalidArgument || r.Result != nil {
				t.Errorf("bad frame: %v", r)
			}
		} else if r.Error != nil || len(r.Result.GetClasses()) == 0 {
			t.Errorf("frame %d: %v", f.FrameId, r)
		}
	}
	st.CloseSend()
	if rest, err := recvAll(t, st); err != nil || len(rest) != 0 {
		t.Errorf("end of stream: %v %v", rest, err)
	}
}

func TestStreamOversizedFrame(t *testing.T) {
	e := newEnv(t)
	st, err := e.vision.StreamClassify(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f := frame(1, encoded(jpegBytes(t, 20, 20, 1)))
	f.Model = "cls"
	st.Send(f)
	if r, err := st.Recv(); err != nil || r.Result == nil {
		t.Fatalf("first frame: %v %v", r, err)
	}
	st.Send(frame(2, encoded(make([]byte, 5<<20))))
	_, err = st.Recv()
	wantCode(t, err, codes.ResourceExhausted, "larger than max")
}

func TestStreamRefusals(t *testing.T) {
	e := newEnv(t)
	for _, tt := range []struct {
		model string
		code  codes.Code
	}{{"nope", codes.NotFound}, {"cls", codes.InvalidArgument}, {"", codes.InvalidArgument}} {
		st, err := e.vision.StreamDetect(ctxT(t))
		if err != nil {
			t.Fatal(err)
		}
		f := frame(1, uint8Tensor(8, 8, 1))
		f.Model = tt.model
		st.Send(f)
		_, err = st.Recv()
		if status.Code(err) != tt.code {
			t.Errorf("model %q: %v, want %v", tt.model, err, tt.code)
		}
	}
}

func TestStreamLimit(t *testing.T) {
	const limit, clients = 64, 1000
	e := newEnv(t, func(c *envConfig) { c.opts.Limits.MaxStreams = limit })
	ctx, cancel := context.WithCancel(ctxT(t))
	defer cancel()
	img := uint8Tensor(8, 8, 50)
	var (
		wg        sync.WaitGroup
		mu        sync.Mutex
		ok, full  int
		other     []error
		release   = make(chan struct{})
		allIn     sync.WaitGroup
		openStrms []visionv1.VisionService_StreamDetectClient
	)
	allIn.Add(clients)
	for range clients {
		wg.Go(func() {
			counted := false
			count := func() {
				if !counted {
					counted = true
					allIn.Done()
				}
			}
			defer count()
			st, err := e.vision.StreamDetect(ctx)
			if err != nil {
				mu.Lock()
				other = append(other, err)
				mu.Unlock()
				return
			}
			f := frame(1, img)
			f.Model = "det"
			st.Send(f)
			_, err = st.Recv()
			mu.Lock()
			switch status.Code(err) {
			case codes.OK:
				ok++
				openStrms = append(openStrms, st)
			case codes.ResourceExhausted:
				full++
				if s, _ := status.FromError(err); s.Message() != "too many concurrent streams: the limit is 64 (--max-streams)" {
					other = append(other, err)
				}
			default:
				other = append(other, err)
			}
			mu.Unlock()
			count()
			if err == nil {
				// Hold the slot until every client had its answer.
				<-release
				st.CloseSend()
				recvAll(t, st)
			}
		})
	}
	allIn.Wait()
	close(release)
	wg.Wait()
	if ok != limit || full != clients-limit || len(other) > 0 {
		t.Fatalf("%d served, %d refused, others %v; want %d and %d", ok, full, other, limit, clients-limit)
	}
	// Slots come back: a new stream is served.
	st, err := e.vision.StreamDetect(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	f := frame(1, img)
	f.Model = "det"
	st.Send(f)
	if _, err := st.Recv(); err != nil {
		t.Fatalf("stream after the flood: %v", err)
	}
	st.CloseSend()
	recvAll(t, st)
}
