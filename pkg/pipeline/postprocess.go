package pipeline

import (
	"cmp"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// Postprocessor turns a model's output tensors into Results. It is safe for
// concurrent use.
type Postprocessor struct {
	name       string
	task       modelrepo.Task
	decoding   modelrepo.Decoding
	output     string // output tensor name; "" takes the first
	labels     []string
	numClasses int // 0: take it from the output shape
	defaults   modelrepo.DefaultOptions
	scratch    sync.Pool // *yoloScratch
}

// NewPostprocessor builds the Postprocessor of a validated model.
func NewPostprocessor(m *modelrepo.Model) (*Postprocessor, error) {
	switch {
	case m.Task == modelrepo.TaskDetect && m.Config.Output.Decoding == modelrepo.DecodeYOLOv8:
	case m.Task == modelrepo.TaskClassify && (m.Config.Output.Decoding == modelrepo.DecodeLogits || m.Config.Output.Decoding == modelrepo.DecodeProbabilities):
	default:
		return nil, fmt.Errorf("model %q: output decoding %q does not fit task %q", m.Name, m.Config.Output.Decoding, m.Task)
	}
	pp := &Postprocessor{
		name: m.Name, task: m.Task, decoding: m.Config.Output.Decoding, output: m.Config.Output.Name,
		labels: m.LabelNames, numClasses: m.NumClasses, defaults: m.Defaults,
	}
	pp.scratch.New = func() any { return new(yoloScratch) }
	return pp, nil
}

// Resolve fills the zero fields of opts with the model defaults and checks
// the ranges: TopK 1..1000, Confidence 0..1, IoU (0,1], MaxDetections
// 1..10000. An option out of range gives ErrBadOptions.
func (pp *Postprocessor) Resolve(opts Options) (Options, error) {
	d := pp.defaults
	if opts.TopK == 0 {
		opts.TopK = d.TopK
	}
	if opts.Confidence == 0 {
		opts.Confidence = d.Confidence
	}
	if opts.IoU == 0 {
		opts.IoU = d.IoU
	}
	if opts.MaxDetections == 0 {
		opts.MaxDetections = d.MaxDetections
	}
	switch {
	case opts.TopK < 1 || opts.TopK > modelrepo.MaxTopKAny:
		return opts, fmt.Errorf("top_k %d out of range 1..%d: %w", opts.TopK, modelrepo.MaxTopKAny, ErrBadOptions)
	case !(opts.Confidence >= 0 && opts.Confidence <= 1):
		return opts, fmt.Errorf("confidence %v out of range 0..1: %w", opts.Confidence, ErrBadOptions)
	case !(opts.IoU > 0 && opts.IoU <= 1):
		return opts, fmt.Errorf("iou %v out of range (0,1]: %w", opts.IoU, ErrBadOptions)
	case opts.MaxDetections < 1 || opts.MaxDetections > modelrepo.MaxDetectionsAny:
		return opts, fmt.Errorf("max_detections %d out of range 1..%d: %w", opts.MaxDetections, modelrepo.MaxDetectionsAny, ErrBadOptions)
	}
	return opts, nil
}

// Decode gives the Result of image i of a batch from the engine outputs.
// p is the image's Prepared (for the original size and the transform; its
// Mat may already be closed). Output shapes are checked against the model:
// [N, classes] for classifiers, [N, 4+classes, anchors] for YOLOv8; a
// mismatch, i out of range or non-finite scores give an error, never a
// panic.
func (pp *Postprocessor) Decode(outputs []engine.Tensor, i int, p *Prepared, opts Options) (Result, error) {
	start := time.Now()
	opts, err := pp.Resolve(opts)
	if err != nil {
		return Result{}, err
	}
	t, err := pp.pick(outputs)
	if err != nil {
		return Result{}, err
	}
	res := Result{Width: p.Width, Height: p.Height}
	res.Timings.Decode, res.Timings.Preprocess = p.Decode, p.Preprocess
	switch pp.decoding {
	case modelrepo.DecodeYOLOv8:
		res.Detections, err = pp.decodeYOLO(t, i, p, opts)
	default:
		res.Classes, err = pp.decodeClasses(t, i, opts)
	}
	if err != nil {
		return Result{}, fmt.Errorf("model %q output %q: %w", pp.name, t.Name, err)
	}
	res.Timings.Postprocess = time.Since(start)
	return res, nil
}

// pick finds the output tensor the model's config names, or the first.
func (pp *Postprocessor) pick(outputs []engine.Tensor) (*engine.Tensor, error) {
	if len(outputs) == 0 {
		return nil, fmt.Errorf("model %q: engine returned no outputs", pp.name)
	}
	if pp.output == "" || len(outputs) == 1 && outputs[0].Name == "" {
		return &outputs[0], nil
	}
	for k := range outputs {
		if outputs[k].Name == pp.output {
			return &outputs[k], nil
		}
	}
	return nil, fmt.Errorf("model %q: engine returned no output named %q", pp.name, pp.output)
}

// checkShape verifies that t is [N, dims...] (trailing 1s allowed), that
// the data fits the shape and that image i is in range; it returns the
// floats of image i.
func checkShape(t *engine.Tensor, i int, dims ...int) ([]float32, error) {
	shape := t.Shape
	for len(shape) > len(dims)+1 && shape[len(shape)-1] == 1 {
		shape = shape[:len(shape)-1]
	}
	want := fmt.Sprint(append([]any{"N"}, toAny(dims)...))
	if len(shape) != len(dims)+1 {
		return nil, fmt.Errorf("shape %v, want %s", t.Shape, want)
	}
	per := int64(1)
	for k, d := range dims {
		if d >= 0 && shape[k+1] != int64(d) || shape[k+1] <= 0 {
			return nil, fmt.Errorf("shape %v, want %s", t.Shape, want)
		}
		per *= shape[k+1]
	}
	n := shape[0]
	if n <= 0 || per > math.MaxInt32 || n*per != int64(len(t.Data)) {
		return nil, fmt.Errorf("shape %v does not match its %d values", t.Shape, len(t.Data))
	}
	if i < 0 || int64(i) >= n {
		return nil, fmt.Errorf("image %d out of range of a batch of %d", i, n)
	}
	return t.Data[int64(i)*per : int64(i+1)*per], nil
}

func toAny(d []int) []any {
	out := make([]any, len(d))
	for k, v := range d {
		if v < 0 {
			out[k] = "?"
		} else {
			out[k] = v
		}
	}
	return out
}

// decodeClasses returns the top-k classes of image i. Top-k is taken on
// the logits (softmax keeps the order), so only k exponentials beyond the
// sum are needed and nothing of the size of the class count is allocated.
func (pp *Postprocessor) decodeClasses(t *engine.Tensor, i int, opts Options) ([]Class, error) {
	nc := pp.numClasses
	if nc == 0 {
		nc = -1
	}
	row, err := checkShape(t, i, nc)
	if err != nil {
		return nil, err
	}
	top := topK(row, opts.TopK)
	if top == nil {
		return nil, fmt.Errorf("image %d: non-finite score", i)
	}
	if pp.decoding == modelrepo.DecodeLogits {
		// Stable softmax: exp(x - max) / Σ exp(x - max).
		mx := row[top[0].Index]
		var sum float64
		for _, v := range row {
			sum += math.Exp(float64(v - mx))
		}
		for k := range top {
			top[k].Score = float32(math.Exp(float64(top[k].Score-mx)) / sum)
		}
	}
	for k := range top {
		top[k].Label = pp.label(top[k].Index)
	}
	return top, nil
}

// topK returns the k largest values of row, largest first, ties by index.
// It returns nil if row holds a NaN or an infinity.
func topK(row []float32, k int) []Class {
	k = min(k, len(row))
	out := make([]Class, 0, k+1)
	for j, v := range row {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil
		}
		if len(out) == k && v <= out[k-1].Score {
			continue
		}
		// Insert keeping out sorted, dropping the smallest when full.
		pos := len(out)
		for pos > 0 && out[pos-1].Score < v {
			pos--
		}
		out = slices.Insert(out, pos, Class{Index: j, Score: v})
		if len(out) > k {
			out = out[:k]
		}
	}
	return out
}

func (pp *Postprocessor) label(i int) string {
	if i >= 0 && i < len(pp.labels) {
		return pp.labels[i]
	}
	return fmt.Sprintf("class_%d", i)
}

// yoloScratch holds the per-call buffers of decodeYOLO, pooled so that a
// steady stream of images allocates only its results.
type yoloScratch struct {
	best    []float32
	cls     []int32
	cands   []candidate
	kept    []candidate
	byClass [][]int32 // per class, indices into kept
}

type candidate struct {
	x1, y1, x2, y2 float32 // model-input pixels
	score          float32
	cls            int32
}

// decodeYOLO decodes an Ultralytics YOLOv8 head [N, 4+nc, A]: per anchor
// the box cx, cy, w, h (input pixels) and nc class scores. Anchors whose
// best class scores at least opts.Confidence go through class-aware NMS;
// the best opts.MaxDetections survive, mapped to the original image and
// clipped to it.
func (pp *Postprocessor) decodeYOLO(t *engine.Tensor, i int, p *Prepared, opts Options) ([]Detection, error) {
	rows := -1
	if pp.numClasses > 0 {
		rows = 4 + pp.numClasses
	}
	data, err := checkShape(t, i, rows, -1)
	if err != nil {
		return nil, err
	}
	shape := t.Shape
	nr, na := int(shape[1]), int(shape[2])
	nc := nr - 4
	if nc < 1 {
		return nil, fmt.Errorf("shape %v has no class rows (want [N,4+classes,anchors])", shape)
	}
	s := pp.scratch.Get().(*yoloScratch)
	defer pp.scratch.Put(s)
	if cap(s.best) < na {
		s.best, s.cls = make([]float32, na), make([]int32, na)
	}
	best, cls := s.best[:na], s.cls[:na]
	// Best class per anchor, walking the class rows: each row is
	// contiguous, so this streams through memory once.
	copy(best, data[4*na:5*na])
	clear(cls)
	for c := 1; c < nc; c++ {
		row := data[(4+c)*na : (5+c)*na]
		for a, v := range row {
			if v > best[a] {
				best[a], cls[a] = v, int32(c)
			}
		}
	}
	cx, cy, bw, bh := data[:na], data[na:2*na], data[2*na:3*na], data[3*na:4*na]
	cands := s.cands[:0]
	for a, v := range best {
		// NaN scores fail the comparison and are dropped.
		if !(v >= opts.Confidence) || v > 1e30 {
			continue
		}
		x, y, w, h := cx[a], cy[a], bw[a], bh[a]
		if !finite(x) || !finite(y) || !finite(w) || !finite(h) || w <= 0 || h <= 0 {
			continue
		}
		cands = append(cands, candidate{x1: x - w/2, y1: y - h/2, x2: x + w/2, y2: y + h/2, score: v, cls: cls[a]})
	}
	s.cands = cands
	slices.SortFunc(cands, func(a, b candidate) int {
		return cmp.Or(cmp.Compare(b.score, a.score), cmp.Compare(a.cls, b.cls))
	})
	if len(s.byClass) < nc {
		s.byClass = make([][]int32, nc)
	}
	byClass := s.byClass[:nc]
	for c := range byClass {
		byClass[c] = byClass[c][:0]
	}
	kept := nms(cands, opts.IoU, opts.MaxDetections, s.kept[:0], byClass)
	s.kept = kept
	dets := make([]Detection, 0, len(kept))
	for _, c := range kept {
		x1, y1 := p.Transform.Apply(c.x1, c.y1)
		x2, y2 := p.Transform.Apply(c.x2, c.y2)
		b := Box{
			X1: clampF(x1, 0, float32(p.Width)), Y1: clampF(y1, 0, float32(p.Height)),
			X2: clampF(x2, 0, float32(p.Width)), Y2: clampF(y2, 0, float32(p.Height)),
		}
		if b.X2 <= b.X1 || b.Y2 <= b.Y1 {
			continue // entirely in the letterbox padding
		}
		dets = append(dets, Detection{Index: int(c.cls), Label: pp.label(int(c.cls)), Score: c.score, Box: b})
	}
	return dets, nil
}

// nms is greedy class-aware non-maximum suppression over cands sorted by
// score, best first: a box is dropped when it overlaps a kept box of the
// same class by more than iou. Each candidate is compared only with the
// kept boxes of its own class (byClass[c] lists their indices in kept).
// Because classes do not interact, walking the global order and stopping
// at maxDet gives the best maxDet boxes of the full per-class result.
// Kept boxes are appended to kept.
func nms(cands []candidate, iou float32, maxDet int, kept []candidate, byClass [][]int32) []candidate {
	for _, c := range cands {
		if len(kept) >= maxDet {
			break
		}
		area := (c.x2 - c.x1) * (c.y2 - c.y1)
		ok := true
		for _, ki := range byClass[c.cls] {
			k := &kept[ki]
			iw := min(c.x2, k.x2) - max(c.x1, k.x1)
			ih := min(c.y2, k.y2) - max(c.y1, k.y1)
			if iw <= 0 || ih <= 0 {
				continue
			}
			inter := iw * ih
			union := area + (k.x2-k.x1)*(k.y2-k.y1) - inter
			if inter > iou*union {
				ok = false
				break
			}
		}
		if ok {
			byClass[c.cls] = append(byClass[c.cls], int32(len(kept)))
			kept = append(kept, c)
		}
	}
	return kept
}

func finite(v float32) bool { return !math.IsNaN(float64(v)) && !math.IsInf(float64(v), 0) }

func clampF(v, lo, hi float32) float32 { return min(max(v, lo), hi) }
