package server

import (
	"bytes"
	"context"
	"encoding/binary"
	"hash/crc32"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

func TestClassify(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	resp, err := e.vision.Classify(ctx, &visionv1.ClassifyRequest{
		Model:   "cls",
		Images:  []*visionv1.Image{encoded(jpegBytes(t, 100, 80, 128)), encoded(jpegBytes(t, 30, 40, 230))},
		Options: &visionv1.Options{TopK: 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Results) != 2 {
		t.Fatalf("%d results, want 2", len(resp.Results))
	}
	for i, want := range []struct {
		w, h, top int32
	}{{100, 80, 5}, {30, 40, 9}} {
		r := resp.Results[i]
		if r.Width != want.w || r.Height != want.h {
			t.Errorf("image %d: size %dx%d, want %dx%d", i, r.Width, r.Height, want.w, want.h)
		}
		if len(r.Classes) != 3 {
			t.Fatalf("image %d: %d classes, want top_k 3", i, len(r.Classes))
		}
		if c := r.Classes[0]; c.Index != want.top || c.Label != modeltest.Model("x", modelrepo.TaskClassify, 10).LabelNames[want.top] {
			t.Errorf("image %d: top class %d %q, want %d", i, c.Index, c.Label, want.top)
		}
		if r.Classes[0].Score < r.Classes[1].Score || r.Classes[0].Score > 1 {
			t.Errorf("image %d: scores not sorted probabilities: %v", i, r.Classes)
		}
		if r.Backend != "fake" || r.BatchSize < 1 || r.BatchSize > 2 {
			t.Errorf("image %d: backend %q batch %d", i, r.Backend, r.BatchSize)
		}
		if r.Timings.GetTotal().AsDuration() <= 0 || r.Timings.GetDecode().AsDuration() <= 0 {
			t.Errorf("image %d: timings not set: %v", i, r.Timings)
		}
	}
}

func TestDetectBoxesInOriginalPixels(t *testing.T) {
	e := newEnv(t)
	// 128x64 letterboxed into 64x64: scale 0.5, 16 rows of padding above.
	// The fake finds the centre half of the input: (16,16)-(48,48), which
	// is (32,0)-(96,64) in the original.
	resp, err := e.vision.Detect(ctxT(t), &visionv1.DetectRequest{Model: "det", Images: []*visionv1.Image{encoded(jpegBytes(t, 128, 64, 90))}})
	if err != nil {
		t.Fatal(err)
	}
	r := resp.Results[0]
	if len(r.Detections) != 1 {
		t.Fatalf("%d detections, want 1: %v", len(r.Detections), r.Detections)
	}
	d := r.Detections[0]
	if d.Index != 0 || d.Label != "classAa" || math.Abs(float64(d.Score-0.9)) > 1e-6 {
		t.Errorf("detection %v", d)
	}
	want := [4]float32{32, 0, 96, 64}
	got := [4]float32{d.Box.X1, d.Box.Y1, d.Box.X2, d.Box.Y2}
	for i := range want {
		if math.Abs(float64(got[i]-want[i])) > 1 {
			t.Errorf("box %v, want %v", got, want)
			break
		}
	}
}

func float32Tensor(shape []int64, fill float32) *visionv1.Image {
	n := 1
	for _, d := range shape {
		n *= int(d)
	}
	b := make([]byte, 4*n)
	for i := range n {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(fill))
	}
	return &visionv1.Image{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{Datatype: visionv1.Tensor_DATA_TYPE_FLOAT32, Shape: shape, Data: b}}}
}

func uint8Tensor(h, w int, v byte) *visionv1.Image {
	return &visionv1.Image{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{
		Datatype: visionv1.Tensor_DATA_TYPE_UINT8, Shape: []int64{int64(h), int64(w), 3}, Data: bytes.Repeat([]byte{v}, h*w*3),
	}}}
}

func TestClassifyTensors(t *testing.T) {
	e := newEnv(t)
	resp, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{
		float32Tensor([]int64{3, 64, 64}, 0.3), uint8Tensor(20, 50, 230),
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Results[0].Classes[0].Index; got != 3 {
		t.Errorf("FLOAT32 tensor of 0.3: top class %d, want 3", got)
	}
	if r := resp.Results[1]; r.Classes[0].Index != 9 || r.Width != 50 || r.Height != 20 {
		t.Errorf("UINT8 tensor: top %d size %dx%d, want 9 and 50x20", r.Classes[0].Index, r.Width, r.Height)
	}
}

func TestModelsInfo(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	list, err := e.vision.ListModels(ctx, &visionv1.ListModelsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.Models) != 2 || list.Models[0].Name != "cls" || list.Models[1].Name != "det" {
		t.Fatalf("ListModels: %v", list.Models)
	}
	info, err := e.vision.ModelInfo(ctx, &visionv1.ModelInfoRequest{Model: "det"})
	if err != nil {
		t.Fatal(err)
	}
	if info.Task != visionv1.Task_TASK_DETECT || info.InputWidth != 64 || info.LabelsCount != 3 || info.Backend != "fake" ||
		info.Batching.GetMaxBatchSize() != 4 || info.Batching.GetQueueSize() != 16 || !info.Ready || info.OutputName != "output0" {
		t.Errorf("ModelInfo: %v", info)
	}
	_, err = e.vision.ModelInfo(ctx, &visionv1.ModelInfoRequest{Model: "nope"})
	wantCode(t, err, codes.NotFound, `"nope"`)
}

func wantCode(t *testing.T, err error, code codes.Code, msgPart string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || !strings.Contains(st.Message(), msgPart) {
		t.Errorf("got %v %q, want %v with %q", st.Code(), st.Message(), code, msgPart)
	}
}

// headerBombPNG is a valid PNG signature and IHDR (correct CRC) claiming
// 30000x30000 pixels, followed by nothing.
func headerBombPNG() []byte {
	var b bytes.Buffer
	b.Write([]byte{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'})
	ihdr := make([]byte, 17)
	copy(ihdr, "IHDR")
	binary.BigEndian.PutUint32(ihdr[4:], 30000)
	binary.BigEndian.PutUint32(ihdr[8:], 30000)
	ihdr[12], ihdr[13] = 8, 2 // 8-bit RGB
	binary.Write(&b, binary.BigEndian, uint32(13))
	b.Write(ihdr)
	binary.Write(&b, binary.BigEndian, crc32.ChecksumIEEE(ihdr))
	return b.Bytes()
}

func TestBadRequestsThenGoodOne(t *testing.T) {
	e := newEnv(t)
	good := jpegBytes(t, 40, 40, 100)
	corrupt := append([]byte(nil), good[:len(good)/2]...)
	for i := 200; i < len(corrupt); i++ {
		corrupt[i] ^= 0x5a
	}
	tooMany := make([]*visionv1.Image, 9)
	for i := range tooMany {
		tooMany[i] = encoded(good)
	}
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	tests := []struct {
		name  string
		ctx   context.Context
		model string
		imgs  []*visionv1.Image
		opts  *visionv1.Options
		code  codes.Code
		msg   string
	}{
		{"empty image", nil, "cls", []*visionv1.Image{encoded(nil)}, nil, codes.InvalidArgument, "image 0: empty image"},
		{"no source", nil, "cls", []*visionv1.Image{{}}, nil, codes.InvalidArgument, "empty image"},
		{"no images", nil, "cls", nil, nil, codes.InvalidArgument, "no images"},
		{"corrupt jpeg", nil, "cls", []*visionv1.Image{encoded(corrupt)}, nil, codes.InvalidArgument, "image 0"},
		{"truncated jpeg", nil, "cls", []*visionv1.Image{encoded(good[:len(good)-20])}, nil, codes.InvalidArgument, "end-of-image marker"},
		{"not an image", nil, "cls", []*visionv1.Image{encoded([]byte("hello, world"))}, nil, codes.InvalidArgument, "unknown image format"},
		{"header bomb png", nil, "cls", []*visionv1.Image{encoded(headerBombPNG())}, nil, codes.InvalidArgument, "limit of 40000000 pixels"},
		{"second image bad", nil, "cls", []*visionv1.Image{encoded(good), encoded(nil)}, nil, codes.InvalidArgument, "image 1: empty image"},
		{"tensor shape", nil, "cls", []*visionv1.Image{float32Tensor([]int64{3, 32, 32}, 0)}, nil, codes.InvalidArgument, "shape [3 32 32], want [3 64 64]"},
		{"tensor bytes", nil, "cls", []*visionv1.Image{{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{Datatype: visionv1.Tensor_DATA_TYPE_UINT8, Shape: []int64{2, 2, 3}, Data: []byte{1}}}}}, nil, codes.InvalidArgument, "holds 1 bytes, want 12"},
		{"tensor datatype", nil, "cls", []*visionv1.Image{{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{Shape: []int64{3, 64, 64}}}}}, nil, codes.InvalidArgument, "datatype"},
		{"uint8 pixel bomb", nil, "cls", []*visionv1.Image{{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{Datatype: visionv1.Tensor_DATA_TYPE_UINT8, Shape: []int64{1 << 40, 1 << 40, 3}}}}}, nil, codes.InvalidArgument, "over the limit"},
		{"nan tensor", nil, "cls", []*visionv1.Image{float32Tensor([]int64{3, 64, 64}, float32(math.NaN()))}, nil, codes.InvalidArgument, "bad input tensor"},
		{"unknown model", nil, "nope", []*visionv1.Image{encoded(good)}, nil, codes.NotFound, `model "nope" not found`},
		{"path model name", nil, "../etc", []*visionv1.Image{encoded(good)}, nil, codes.NotFound, "not found"},
		{"no model", nil, "", []*visionv1.Image{encoded(good)}, nil, codes.InvalidArgument, "model name is missing"},
		{"wrong task", nil, "det", []*visionv1.Image{encoded(good)}, nil, codes.InvalidArgument, "is a detect model"},
		{"too many images", nil, "cls", tooMany, nil, codes.InvalidArgument, "9 images in one request, over the limit of 8"},
		{"bad top_k", nil, "cls", []*visionv1.Image{encoded(good)}, &visionv1.Options{TopK: -1}, codes.InvalidArgument, "top_k"},
		{"bad confidence", nil, "cls", []*visionv1.Image{encoded(good)}, &visionv1.Options{Confidence: 2}, codes.InvalidArgument, "confidence"},
		{"expired deadline", expired, "cls", []*visionv1.Image{encoded(good)}, nil, codes.DeadlineExceeded, ""},
		{"oversized message", nil, "cls", []*visionv1.Image{encoded(make([]byte, 5<<20))}, nil, codes.ResourceExhausted, "larger than max"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := tt.ctx
			if ctx == nil {
				ctx = ctxT(t)
			}
			_, err := e.vision.Classify(ctx, &visionv1.ClassifyRequest{Model: tt.model, Images: tt.imgs, Options: tt.opts})
			wantCode(t, err, tt.code, tt.msg)
			// The server keeps serving everyone else.
			resp, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encoded(good)}})
			if err != nil || len(resp.Results) != 1 {
				t.Fatalf("good request after %s: %v", tt.name, err)
			}
		})
	}
}

func TestZeroDeadlineNeverRuns(t *testing.T) {
	e := newEnv(t)
	before := e.cls.Runs()
	ctx, cancel := context.WithTimeout(context.Background(), 0)
	defer cancel()
	_, err := e.vision.Classify(ctx, &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{encoded(jpegBytes(t, 8, 8, 1))}})
	wantCode(t, err, codes.DeadlineExceeded, "")
	if got := e.cls.Runs(); got != before {
		t.Errorf("engine ran %d batches for an expired request", got-before)
	}
}

func TestQueueFullIsResourceExhausted(t *testing.T) {
	gate := make(chan struct{})
	e := newEnv(t, func(c *envConfig) {
		c.cls = &modeltest.Engine{Classes: 10, Gate: gate, Started: make(chan struct{}, 1)}
	})
	img := encoded(jpegBytes(t, 16, 16, 10))
	// The engine holds one batch of 4; the queue holds 16 more images.
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for range 40 {
		wg.Go(func() {
			_, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}})
			errs <- err
		})
	}
	var exhausted int
	deadline := time.After(10 * time.Second)
	for exhausted == 0 {
		select {
		case err := <-errs:
			if status.Code(err) == codes.ResourceExhausted {
				wantCode(t, err, codes.ResourceExhausted, "queue full")
				exhausted++
			} else {
				t.Fatalf("before the engine ran: %v", err)
			}
		case <-deadline:
			t.Fatal("no request was refused with a full queue")
		}
	}
	close(gate)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil && status.Code(err) != codes.ResourceExhausted {
			t.Errorf("accepted request failed: %v", err)
		}
	}
	if _, err := e.vision.Classify(ctxT(t), &visionv1.ClassifyRequest{Model: "cls", Images: []*visionv1.Image{img}}); err != nil {
		t.Errorf("after the queue emptied: %v", err)
	}
}

func TestAuthToken(t *testing.T) {
	e := newEnv(t, func(c *envConfig) { c.opts.AuthToken = "s3cret" })
	req := &visionv1.ListModelsRequest{}
	_, err := e.vision.ListModels(ctxT(t), req)
	wantCode(t, err, codes.Unauthenticated, "bearer token")
	_, err = e.vision.ListModels(ctxT(t), req, grpc.PerRPCCredsCallOption{Creds: bearer("wrong")})
	wantCode(t, err, codes.Unauthenticated, "bearer token")
	if _, err := e.vision.ListModels(ctxT(t), req, grpc.PerRPCCredsCallOption{Creds: bearer("s3cret")}); err != nil {
		t.Errorf("with the token: %v", err)
	}
	st, err := e.vision.StreamDetect(ctxT(t))
	if err == nil {
		_, err = st.Recv()
	}
	wantCode(t, err, codes.Unauthenticated, "bearer token")
	// Health checking stays open.
	if got := healthStatus(t, e, ""); got != "SERVING" {
		t.Errorf("health without token: %s", got)
	}
}

// bearer sends a token over an insecure in-memory connection.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }
