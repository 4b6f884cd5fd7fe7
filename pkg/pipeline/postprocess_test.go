package pipeline

import (
	"errors"
	"math"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

func softmaxRef(row []float64) []float64 {
	mx := math.Inf(-1)
	for _, v := range row {
		mx = math.Max(mx, v)
	}
	var sum float64
	out := make([]float64, len(row))
	for i, v := range row {
		out[i] = math.Exp(v - mx)
		sum += out[i]
	}
	for i := range out {
		out[i] /= sum
	}
	return out
}

func TestClassify(t *testing.T) {
	tests := []struct {
		name     string
		decoding modelrepo.Decoding
		row      []float32
		k        int
		want     []int // indices, best first
		wantErr  string
	}{
		{name: "logits top 2", decoding: modelrepo.DecodeLogits, row: []float32{1, 3, 2, -1}, k: 2, want: []int{1, 2}},
		{name: "k beyond classes", decoding: modelrepo.DecodeLogits, row: []float32{0.5, -2, 4, 0}, k: 10, want: []int{2, 0, 3, 1}},
		{name: "ties keep index order", decoding: modelrepo.DecodeLogits, row: []float32{1, 2, 2, 2}, k: 3, want: []int{1, 2, 3}},
		{name: "huge logits stay finite", decoding: modelrepo.DecodeLogits, row: []float32{1000, 999, -1000, 998}, k: 3, want: []int{0, 1, 3}},
		{name: "probabilities pass through", decoding: modelrepo.DecodeProbabilities, row: []float32{0.1, 0.6, 0.3, 0}, k: 1, want: []int{1}},
		{name: "NaN refused", decoding: modelrepo.DecodeLogits, row: []float32{1, float32(math.NaN()), 0, 0}, k: 1, wantErr: "non-finite"},
		{name: "Inf refused", decoding: modelrepo.DecodeLogits, row: []float32{1, 0, float32(math.Inf(1)), 0}, k: 1, wantErr: "non-finite"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 224, 224, len(tt.row))
			m.Config.Output.Decoding = tt.decoding
			pp, err := NewPostprocessor(m)
			if err != nil {
				t.Fatal(err)
			}
			// Image 1 of a batch of 2; image 0 is different on purpose.
			data := append(make([]float32, len(tt.row)), tt.row...)
			data[0] = 50
			out := []engine.Tensor{{Name: "logits", Shape: []int64{2, int64(len(tt.row))}, Data: data}}
			res, err := pp.Decode(out, 1, &Prepared{Width: 7, Height: 9}, Options{TopK: tt.k})
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Classes) != len(tt.want) {
				t.Fatalf("got %d classes %+v, want %v", len(res.Classes), res.Classes, tt.want)
			}
			ref := make([]float64, len(tt.row))
			for i, v := range tt.row {
				ref[i] = float64(v)
			}
			if tt.decoding == modelrepo.DecodeLogits {
				ref = softmaxRef(ref)
			}
			for k, c := range res.Classes {
				if c.Index != tt.want[k] {
					t.Errorf("class %d: index %d, want %d", k, c.Index, tt.want[k])
				}
				if math.Abs(float64(c.Score)-ref[c.Index]) > 1e-6 || math.IsNaN(float64(c.Score)) {
					t.Errorf("class %d: score %v, want %v", k, c.Score, ref[c.Index])
				}
				if c.Label != m.LabelNames[c.Index] {
					t.Errorf("class %d: label %q, want %q", k, c.Label, m.LabelNames[c.Index])
				}
			}
			if res.Width != 7 || res.Height != 9 {
				t.Errorf("result size %dx%d, want 7x9", res.Width, res.Height)
			}
		})
	}
}

// yoloBox is one anchor of a synthetic YOLOv8 output.
type yoloBox struct {
	cx, cy, w, h float32
	cls          int
	score        float32
}

// yoloOutput builds a [n, 4+nc, anchors] tensor with the boxes in image
// img of the batch and zeros elsewhere; a few other classes score a bit
// less than the best so that the best-class search matters.
func yoloOutput(n, img, nc, anchors int, boxes []yoloBox) engine.Tensor {
	data := make([]float32, n*(4+nc)*anchors)
	base := img * (4 + nc) * anchors
	for a, b := range boxes {
		set := func(row int, v float32) { data[base+row*anchors+a] = v }
		set(0, b.cx)
		set(1, b.cy)
		set(2, b.w)
		set(3, b.h)
		set(4+b.cls, b.score)
		set(4+(b.cls+1)%nc, b.score*0.9)
	}
	return engine.Tensor{Name: "output0", Shape: []int64{int64(n), int64(4 + nc), int64(anchors)}, Data: data}
}

func TestNMS(t *testing.T) {
	identity := &Prepared{Width: 640, Height: 640, Transform: Transform{ScaleX: 1, ScaleY: 1}}
	tests := []struct {
		name  string
		boxes []yoloBox
		opts  Options
		want  []int // anchors kept, in output order
	}{
		{"different classes overlapping both kept",
			[]yoloBox{{100, 100, 50, 50, 0, 0.9}, {102, 101, 50, 50, 1, 0.8}}, Options{}, []int{0, 1}},
		{"same class overlapping suppressed",
			[]yoloBox{{100, 100, 50, 50, 3, 0.7}, {102, 101, 50, 50, 3, 0.9}}, Options{}, []int{1}},
		{"same class apart both kept",
			[]yoloBox{{100, 100, 50, 50, 3, 0.7}, {300, 300, 50, 50, 3, 0.9}}, Options{}, []int{1, 0}},
		{"overlap below the IoU threshold kept",
			// IoU of these two is 1/3.
			[]yoloBox{{100, 100, 60, 60, 2, 0.9}, {130, 100, 60, 60, 2, 0.8}}, Options{IoU: 0.4}, []int{0, 1}},
		{"overlap above a low IoU threshold suppressed",
			[]yoloBox{{100, 100, 60, 60, 2, 0.9}, {130, 100, 60, 60, 2, 0.8}}, Options{IoU: 0.3}, []int{0}},
		{"confidence threshold",
			[]yoloBox{{100, 100, 10, 10, 0, 0.3}, {300, 300, 10, 10, 0, 0.2}, {500, 500, 10, 10, 0, 0.6}}, Options{Confidence: 0.25}, []int{2, 0}},
		{"max detections keeps the best",
			[]yoloBox{{50, 50, 10, 10, 0, 0.5}, {150, 50, 10, 10, 1, 0.95}, {250, 50, 10, 10, 2, 0.7}, {350, 50, 10, 10, 0, 0.8}}, Options{MaxDetections: 2}, []int{1, 3}},
		{"suppressed boxes do not count against max detections",
			[]yoloBox{{50, 50, 40, 40, 0, 0.9}, {52, 50, 40, 40, 0, 0.85}, {300, 50, 40, 40, 0, 0.5}}, Options{MaxDetections: 2}, []int{0, 2}},
		{"degenerate and non-finite boxes dropped",
			[]yoloBox{{100, 100, 0, 10, 0, 0.9}, {float32(math.NaN()), 100, 10, 10, 0, 0.9}, {200, 200, 10, 10, 0, float32(math.NaN())}, {300, 300, 10, 10, 0, 0.5}}, Options{}, []int{3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pp, err := NewPostprocessor(testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 640, 640, 5))
			if err != nil {
				t.Fatal(err)
			}
			out := yoloOutput(2, 1, 5, 16, tt.boxes)
			res, err := pp.Decode([]engine.Tensor{out}, 1, identity, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.Detections) != len(tt.want) {
				t.Fatalf("got %d detections %+v, want anchors %v", len(res.Detections), res.Detections, tt.want)
			}
			for k, d := range res.Detections {
				b := tt.boxes[tt.want[k]]
				want := Box{b.cx - b.w/2, b.cy - b.h/2, b.cx + b.w/2, b.cy + b.h/2}
				if d.Index != b.cls || d.Score != b.score || d.Box != want || d.Label != pp.label(b.cls) {
					t.Errorf("detection %d = %+v, want anchor %d %+v", k, d, tt.want[k], b)
				}
			}
			// The batch's other image is empty.
			res, err = pp.Decode([]engine.Tensor{out}, 0, identity, tt.opts)
			if err != nil || len(res.Detections) != 0 {
				t.Errorf("image 0: %d detections, %v", len(res.Detections), err)
			}
		})
	}
}

// TestDetectionsMapped checks that boxes come back in original pixels
// through the letterbox transform of a real Prepare, clipped to the image.
func TestDetectionsMapped(t *testing.T) {
	checkMats(t)
	m := testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 640, 640, 3)
	pre, err := NewPreprocessor(m, PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p, err := pre.PrepareHWC(make([]byte, 1280*720*3), 720, 1280, true)
	if err != nil {
		t.Fatal(err)
	}
	p.Close() // Decode needs only the transform
	pp, err := NewPostprocessor(m)
	if err != nil {
		t.Fatal(err)
	}
	// 1280x720 letterboxed to 640: scale 1/2, 140 rows of padding on top.
	out := yoloOutput(1, 0, 3, 8, []yoloBox{
		{320, 320, 100, 60, 0, 0.9}, // middle
		{620, 200, 80, 40, 1, 0.8},  // crosses the right edge
		{320, 60, 100, 40, 2, 0.7},  // wholly in the top padding
		{100, 150, 40, 40, 2, 0.6},  // crosses into the top padding
	})
	res, err := pp.Decode([]engine.Tensor{out}, 0, p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	want := []Box{
		{540, 300, 740, 420},
		{1160, 80, 1280, 160},
		{160, 0, 240, 60},
	}
	if len(res.Detections) != len(want) {
		t.Fatalf("got %+v, want boxes %v", res.Detections, want)
	}
	for k, d := range res.Detections {
		if d.Box != want[k] {
			t.Errorf("detection %d box %+v, want %+v", k, d.Box, want[k])
		}
	}
	if res.Width != 1280 || res.Height != 720 {
		t.Errorf("result size %dx%d", res.Width, res.Height)
	}
}

func TestDecodeErrors(t *testing.T) {
	det, err := NewPostprocessor(testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 640, 640, 80))
	if err != nil {
		t.Fatal(err)
	}
	cls, err := NewPostprocessor(testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 224, 224, 1000))
	if err != nil {
		t.Fatal(err)
	}
	p := &Prepared{Width: 10, Height: 10, Transform: Transform{ScaleX: 1, ScaleY: 1}}
	tensor := func(name string, shape []int64, n int) []engine.Tensor {
		return []engine.Tensor{{Name: name, Shape: shape, Data: make([]float32, n)}}
	}
	tests := []struct {
		name    string
		pp      *Postprocessor
		outs    []engine.Tensor
		i       int
		opts    Options
		wantErr string
	}{
		{"no outputs", cls, nil, 0, Options{}, "no outputs"},
		{"output name missing", cls, append(tensor("a", []int64{1, 1000}, 1000), tensor("b", []int64{1, 1000}, 1000)...), 0, Options{}, `no output named "logits"`},
		{"classes differ", cls, tensor("logits", []int64{1, 999}, 999), 0, Options{}, "want [N 1000]"},
		{"rank 1", cls, tensor("logits", []int64{1000}, 1000), 0, Options{}, "want [N 1000]"},
		{"data shorter than shape", cls, tensor("logits", []int64{2, 1000}, 1000), 0, Options{}, "does not match"},
		{"image beyond batch", cls, tensor("logits", []int64{2, 1000}, 2000), 2, Options{}, "out of range"},
		{"negative image", cls, tensor("logits", []int64{2, 1000}, 2000), -1, Options{}, "out of range"},
		{"negative dimension", cls, tensor("logits", []int64{-2, 1000}, 0), 0, Options{}, "does not match"},
		{"yolo rows differ", det, tensor("output0", []int64{1, 85, 8400}, 85*8400), 0, Options{}, "want [N 84 ?]"},
		{"yolo rank 2", det, tensor("output0", []int64{1, 84}, 84), 0, Options{}, "want [N 84 ?]"},
		{"yolo zero anchors", det, tensor("output0", []int64{1, 84, 0}, 0), 0, Options{}, "want [N 84 ?]"},
		{"top_k too big", cls, tensor("logits", []int64{1, 1000}, 1000), 0, Options{TopK: 1001}, "top_k"},
		{"negative top_k", cls, tensor("logits", []int64{1, 1000}, 1000), 0, Options{TopK: -1}, "top_k"},
		{"confidence above 1", det, tensor("output0", []int64{1, 84, 10}, 840), 0, Options{Confidence: 1.5}, "confidence"},
		{"NaN confidence", det, tensor("output0", []int64{1, 84, 10}, 840), 0, Options{Confidence: float32(math.NaN())}, "confidence"},
		{"negative iou", det, tensor("output0", []int64{1, 84, 10}, 840), 0, Options{IoU: -0.1}, "iou"},
		{"max detections too many", det, tensor("output0", []int64{1, 84, 10}, 840), 0, Options{MaxDetections: 10001}, "max_detections"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := tt.pp.Decode(tt.outs, tt.i, p, tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tt.wantErr)
			}
			if strings.Contains(tt.name, "top_k") || strings.Contains(tt.name, "confidence") || strings.Contains(tt.name, "iou") || strings.Contains(tt.name, "max detections") {
				if !errors.Is(err, ErrBadOptions) {
					t.Errorf("error %v is not ErrBadOptions", err)
				}
			}
		})
	}
	// Trailing unit dimensions ([N, classes, 1, 1]) are accepted.
	if _, err := cls.Decode(tensor("logits", []int64{1, 1000, 1, 1}, 1000), 0, p, Options{}); err != nil {
		t.Errorf("[1,1000,1,1]: %v", err)
	}
}
