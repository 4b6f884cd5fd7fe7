package server

import (
	"encoding/binary"
	"math"
	"slices"
	"testing"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// shapeOf turns fuzz bytes into a shape: 8 bytes a dimension.
func shapeOf(b []byte) []int64 {
	var s []int64
	for len(b) >= 8 && len(s) < 6 {
		s = append(s, int64(binary.LittleEndian.Uint64(b)))
		b = b[8:]
	}
	return s
}

func shapeBytes(dims ...int64) []byte {
	var b []byte
	for _, d := range dims {
		b = binary.LittleEndian.AppendUint64(b, uint64(d))
	}
	return b
}

// FuzzOIPInputs feeds ModelInfer input tensors of any datatype, shape and
// contents to the request checks: they must refuse or accept without
// panicking, and what they accept must be consistent with the shape.
func FuzzOIPInputs(f *testing.F) {
	f.Add("FP32", shapeBytes(1, 3, 64, 64), make([]byte, 4*3*64*64), true)
	f.Add("UINT8", shapeBytes(2, 2, 3), make([]byte, 12), true)
	f.Add("UINT8", shapeBytes(1<<40, 1<<40, 3), []byte{}, false)
	f.Add("BYTES", shapeBytes(2), []byte{1, 0, 0, 0, 'x', 0, 0, 0, 0}, true)
	f.Add("BYTES", shapeBytes(1), []byte{255, 255, 255, 255}, true)
	f.Add("FP32", shapeBytes(-1, 3, 64, 64), []byte{}, true)
	s := &oipService{limits: Limits{MaxPixels: 1 << 20, MaxImagesPerRequest: 8, MaxStreams: 1}}
	m := model.New(modeltest.Model("cls", modelrepo.TaskClassify, 10), nil)
	f.Fuzz(func(t *testing.T, datatype string, shape, data []byte, raw bool) {
		in := &inference.ModelInferRequest_InferInputTensor{Name: "images", Datatype: datatype, Shape: shapeOf(shape)}
		req := &inference.ModelInferRequest{ModelName: "cls", Inputs: []*inference.ModelInferRequest_InferInputTensor{in}}
		if raw {
			req.RawInputContents = [][]byte{data}
		} else {
			c := &inference.InferTensorContents{BytesContents: [][]byte{data}}
			for i := 0; i+4 <= len(data); i += 4 {
				v := binary.LittleEndian.Uint32(data[i:])
				c.Fp32Contents = append(c.Fp32Contents, float32(v))
				c.UintContents = append(c.UintContents, v)
			}
			in.Contents = c
		}
		inputs, err := s.inferInputs(req, m)
		if err != nil {
			return
		}
		if len(inputs) == 0 || len(inputs) > 8 {
			t.Fatalf("%d inputs accepted", len(inputs))
		}
		for _, x := range inputs {
			switch {
			case x.Tensor != nil:
				if len(x.Tensor) != 3*64*64 {
					t.Fatalf("tensor of %d floats accepted", len(x.Tensor))
				}
			case x.Pixels != nil:
				if len(x.Pixels) != x.Height*x.Width*3 || x.Height*x.Width > 1<<20 {
					t.Fatalf("pixels %d for %dx%d accepted", len(x.Pixels), x.Width, x.Height)
				}
			}
		}
	})
}

// FuzzVisionTensor feeds vision API tensors of any datatype, shape and
// data to toInput.
func FuzzVisionTensor(f *testing.F) {
	f.Add(int32(1), shapeBytes(3, 64, 64), make([]byte, 4*3*64*64))
	f.Add(int32(2), shapeBytes(4, 4, 3), make([]byte, 48))
	f.Add(int32(2), shapeBytes(1<<62, 4, 3), make([]byte, 48))
	f.Add(int32(7), shapeBytes(1), []byte{1})
	m := model.New(modeltest.Model("cls", modelrepo.TaskClassify, 10), nil)
	lim := Limits{MaxPixels: 1 << 20, MaxImagesPerRequest: 8, MaxStreams: 1}
	f.Fuzz(func(t *testing.T, dt int32, shape, data []byte) {
		img := &visionv1.Image{Source: &visionv1.Image_Tensor{Tensor: &visionv1.Tensor{Datatype: visionv1.Tensor_DataType(dt), Shape: shapeOf(shape), Data: data}}}
		in, err := toInput(img, m, lim)
		if err != nil {
			return
		}
		if in.Tensor == nil && len(in.Pixels) != in.Height*in.Width*3 {
			t.Fatalf("accepted %d bytes for %dx%d", len(in.Pixels), in.Width, in.Height)
		}
	})
}

func TestRawFloatsRoundTrip(t *testing.T) {
	want := []float32{0, -1.5, 3.25e-20, float32(math.Inf(1)), 7}
	raw := fp32Raw(want)
	// Aligned (aliased) and unaligned (converted) input give the same.
	unaligned := append([]byte{0}, raw...)[1:]
	for _, b := range [][]byte{raw, unaligned} {
		got := floatsFromLE(b)
		if !slices.Equal(got, want) {
			t.Errorf("floatsFromLE = %v, want %v", got, want)
		}
	}
	if got := floatsToLE(want); !slices.Equal(got, raw) {
		t.Errorf("floatsToLE = %v, want %v", got, raw)
	}
	if len(floatsFromLE(nil)) != 0 || len(floatsToLE(nil)) != 0 {
		t.Error("empty input")
	}
}
