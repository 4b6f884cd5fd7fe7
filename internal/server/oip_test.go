package server

import (
	"context"
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/proto/inference"
)

type inferInput = inference.ModelInferRequest_InferInputTensor

func fp32Raw(vals []float32) []byte {
	b := make([]byte, 4*len(vals))
	for i, v := range vals {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}

func TestOIPMetadata(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	live, err := e.oip.ServerLive(ctx, &inference.ServerLiveRequest{})
	if err != nil || !live.Live {
		t.Errorf("ServerLive: %v %v", live, err)
	}
	ready, err := e.oip.ServerReady(ctx, &inference.ServerReadyRequest{})
	if err != nil || !ready.Ready {
		t.Errorf("ServerReady: %v %v", ready, err)
	}
	mr, err := e.oip.ModelReady(ctx, &inference.ModelReadyRequest{Name: "det", Version: "1"})
	if err != nil || !mr.Ready {
		t.Errorf("ModelReady: %v %v", mr, err)
	}
	_, err = e.oip.ModelReady(ctx, &inference.ModelReadyRequest{Name: "nope"})
	wantCode(t, err, codes.NotFound, `"nope"`)
	_, err = e.oip.ModelReady(ctx, &inference.ModelReadyRequest{Name: "det", Version: "7"})
	wantCode(t, err, codes.NotFound, `version "7"`)
	sm, err := e.oip.ServerMetadata(ctx, &inference.ServerMetadataRequest{})
	if err != nil || sm.Name != "visionserve" || sm.Version == "" {
		t.Errorf("ServerMetadata: %v %v", sm, err)
	}
	md, err := e.oip.ModelMetadata(ctx, &inference.ModelMetadataRequest{Name: "det"})
	if err != nil {
		t.Fatal(err)
	}
	if md.Name != "det" || !slices.Equal(md.Versions, []string{"1"}) || len(md.Inputs) != 1 || len(md.Outputs) != 1 ||
		md.Inputs[0].Name != "images" || md.Inputs[0].Datatype != "FP32" || !slices.Equal(md.Inputs[0].Shape, []int64{-1, 3, 64, 64}) ||
		md.Outputs[0].Name != "output0" || !slices.Equal(md.Outputs[0].Shape, []int64{-1, 7, 84}) {
		t.Errorf("ModelMetadata: %v", md)
	}
}

// TestOIPRawFP32IsEngineOutput checks that ModelInfer on preprocessed
// FP32 inputs returns exactly, bit for bit, what the engine returns for
// the same batch run directly.
func TestOIPRawFP32IsEngineOutput(t *testing.T) {
	e := newEnv(t)
	const n = 3
	per := 3 * 64 * 64
	in := make([]float32, n*per)
	for i := range in {
		in[i] = float32(math.Sin(float64(i)*0.37)) * float32(1+i%5)
	}
	resp, err := e.oip.ModelInfer(ctxT(t), &inference.ModelInferRequest{
		ModelName: "cls", Id: "req-7",
		Inputs:           []*inferInput{{Name: "images", Datatype: "FP32", Shape: []int64{n, 3, 64, 64}}},
		RawInputContents: [][]byte{fp32Raw(in)},
	})
	if err != nil {
		t.Fatal(err)
	}
	direct := (&modeltest.Engine{Classes: 10}).Outputs(&engine.Batch{N: n, Cap: n, C: 3, H: 64, W: 64, Data: in})[0]
	if resp.Id != "req-7" || resp.ModelName != "cls" || len(resp.Outputs) != 1 || len(resp.RawOutputContents) != 1 {
		t.Fatalf("response %v", resp)
	}
	out := resp.Outputs[0]
	if out.Name != "logits" || out.Datatype != "FP32" || !slices.Equal(out.Shape, direct.Shape) || out.Contents != nil {
		t.Errorf("output tensor %v, want shape %v raw", out, direct.Shape)
	}
	if got, want := resp.RawOutputContents[0], fp32Raw(direct.Data); !slices.Equal(got, want) {
		t.Errorf("raw output differs from the engine's")
	}

	// Typed contents in, raw contents out, as Triton answers (tritonclient
	// reads only raw_output_contents).
	resp, err = e.oip.ModelInfer(ctxT(t), &inference.ModelInferRequest{
		ModelName: "cls",
		Inputs: []*inferInput{{Name: "images", Datatype: "FP32", Shape: []int64{3, 64, 64},
			Contents: &inference.InferTensorContents{Fp32Contents: in[:per]}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.RawOutputContents[0]; resp.Outputs[0].Contents != nil || !slices.Equal(got, fp32Raw(direct.Data[:10])) || !slices.Equal(resp.Outputs[0].Shape, []int64{1, 10}) {
		t.Errorf("output to typed input: %v, raw %d bytes; want raw %v", resp.Outputs[0], len(got), direct.Data[:10])
	}
}

func TestOIPImages(t *testing.T) {
	e := newEnv(t)
	ctx := ctxT(t)
	// Two 8x12 RGB images, raw.
	pix := make([]byte, 2*8*12*3)
	for i := range pix {
		pix[i] = byte(i)
	}
	resp, err := e.oip.ModelInfer(ctx, &inference.ModelInferRequest{
		ModelName:        "det",
		Inputs:           []*inferInput{{Name: "images", Datatype: "UINT8", Shape: []int64{2, 8, 12, 3}}},
		RawInputContents: [][]byte{pix},
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(resp.Outputs[0].Shape, []int64{2, 7, 84}) || len(resp.RawOutputContents[0]) != 4*2*7*84 {
		t.Errorf("UINT8: shape %v, %d bytes", resp.Outputs[0].Shape, len(resp.RawOutputContents[0]))
	}
	// Encoded images as BYTES, typed and raw (4-byte length prefixes).
	a, b := jpegBytes(t, 30, 20, 40), pngBytes(t, 10, 10)
	raw := binary.LittleEndian.AppendUint32(nil, uint32(len(a)))
	raw = append(raw, a...)
	raw = binary.LittleEndian.AppendUint32(raw, uint32(len(b)))
	raw = append(raw, b...)
	for _, req := range []*inference.ModelInferRequest{
		{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "BYTES", Shape: []int64{2}, Contents: &inference.InferTensorContents{BytesContents: [][]byte{a, b}}}}},
		{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "BYTES", Shape: []int64{2}}}, RawInputContents: [][]byte{raw}},
	} {
		resp, err := e.oip.ModelInfer(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(resp.Outputs[0].Shape, []int64{2, 10}) {
			t.Errorf("BYTES: shape %v", resp.Outputs[0].Shape)
		}
	}
}

func TestOIPBadRequestsThenGoodOne(t *testing.T) {
	e := newEnv(t)
	good := &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "UINT8", Shape: []int64{4, 4, 3},
		Contents: &inference.InferTensorContents{UintContents: make([]uint32, 48)}}}}
	fp := func(shape ...int64) *inferInput { return &inferInput{Name: "images", Datatype: "FP32", Shape: shape} }
	tests := []struct {
		name string
		req  *inference.ModelInferRequest
		code codes.Code
		msg  string
	}{
		{"unknown model", &inference.ModelInferRequest{ModelName: "nope", Inputs: good.Inputs}, codes.NotFound, `"nope" not found`},
		{"unknown version", &inference.ModelInferRequest{ModelName: "cls", ModelVersion: "2", Inputs: good.Inputs}, codes.NotFound, `version "2"`},
		{"no inputs", &inference.ModelInferRequest{ModelName: "cls"}, codes.InvalidArgument, "exactly one input"},
		{"wrong input name", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "x", Datatype: "FP32", Shape: []int64{3, 64, 64}}}}, codes.InvalidArgument, `no input "x"`},
		{"wrong datatype", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "INT64", Shape: []int64{1}}}}, codes.InvalidArgument, `datatype "INT64" not supported`},
		{"wrong shape", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{fp(1, 3, 32, 32)}, RawInputContents: [][]byte{make([]byte, 4*3*32*32)}}, codes.InvalidArgument, "shape [1 3 32 32], want [N 3 64 64]"},
		{"short raw", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{fp(1, 3, 64, 64)}, RawInputContents: [][]byte{make([]byte, 10)}}, codes.InvalidArgument, "needs 49152 raw bytes, got 10"},
		{"short contents", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "FP32", Shape: []int64{3, 64, 64}, Contents: &inference.InferTensorContents{Fp32Contents: []float32{1}}}}}, codes.InvalidArgument, "needs 12288 fp32_contents, got 1"},
		{"zero dim", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{fp(0, 3, 64, 64)}}, codes.InvalidArgument, "below 1"},
		{"batch over limit", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{fp(9, 3, 64, 64)}}, codes.InvalidArgument, "batch of 9 images, over the limit of 8"},
		{"uint8 over 255", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "UINT8", Shape: []int64{1, 1, 3}, Contents: &inference.InferTensorContents{UintContents: []uint32{1, 2, 300}}}}}, codes.InvalidArgument, "over 255"},
		{"uint8 pixel bomb", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "UINT8", Shape: []int64{100000, 100000, 3}}}}, codes.InvalidArgument, "over the limit of 40000000 pixels"},
		{"bytes corrupt", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "BYTES", Shape: []int64{1}, Contents: &inference.InferTensorContents{BytesContents: [][]byte{[]byte("GIF89a")}}}}}, codes.InvalidArgument, "image 0"},
		{"bytes header bomb", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "BYTES", Shape: []int64{1}, Contents: &inference.InferTensorContents{BytesContents: [][]byte{headerBombPNG()}}}}}, codes.InvalidArgument, "pixels"},
		{"raw bytes overrun", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "BYTES", Shape: []int64{1}}}, RawInputContents: [][]byte{{200, 0, 0, 0, 1}}}, codes.InvalidArgument, "runs past the end"},
		{"contents and raw", &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inferInput{{Name: "images", Datatype: "FP32", Shape: []int64{3, 64, 64}, Contents: &inference.InferTensorContents{}}}, RawInputContents: [][]byte{{1}}}, codes.InvalidArgument, "use one"},
		{"unknown output", &inference.ModelInferRequest{ModelName: "cls", Inputs: good.Inputs, Outputs: []*inference.ModelInferRequest_InferRequestedOutputTensor{{Name: "probs"}}}, codes.InvalidArgument, `no output "probs"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := e.oip.ModelInfer(ctxT(t), tt.req)
			wantCode(t, err, tt.code, tt.msg)
			if _, err := e.oip.ModelInfer(ctxT(t), good); err != nil {
				t.Fatalf("good request after %s: %v", tt.name, err)
			}
		})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 0)
	defer cancel()
	_, err := e.oip.ModelInfer(ctx, good)
	wantCode(t, err, codes.DeadlineExceeded, "")
}

func TestOIPRefusesAnswersOverTheMessageLimit(t *testing.T) {
	// det answers 7x84 floats (2352 bytes) an image: 2 fit in 5000 bytes,
	// 3 do not, and are refused before the engine runs.
	e := newEnv(t, func(c *envConfig) { c.opts.MaxMessageBytes = 5000 })
	req := func(n int64) *inference.ModelInferRequest {
		return &inference.ModelInferRequest{ModelName: "det", Inputs: []*inferInput{{Name: "images", Datatype: "UINT8", Shape: []int64{n, 2, 2, 3}}},
			RawInputContents: [][]byte{make([]byte, n*12)}}
	}
	_, err := e.oip.ModelInfer(ctxT(t), req(3))
	wantCode(t, err, codes.InvalidArgument, "the output of 3 images would be 7056 bytes, over the 5000 byte message limit")
	if runs := e.det.Runs(); runs != 0 {
		t.Errorf("engine ran %d times for a refused request", runs)
	}
	if _, err := e.oip.ModelInfer(ctxT(t), req(2)); err != nil {
		t.Fatal(err)
	}
}
