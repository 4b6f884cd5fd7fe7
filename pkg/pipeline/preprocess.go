package pipeline

import (
	"errors"
	"fmt"
	"image"
	"math"
	"time"
	"unsafe"

	"gocv.io/x/gocv"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// PreprocessOptions configure a Preprocessor.
type PreprocessOptions struct {
	// MaxPixels limits width×height of an input image, encoded or raw;
	// DefaultMaxPixels when zero.
	MaxPixels int
	// FullDecode turns off decoding large JPEGs at 1/2, 1/4 or 1/8 size
	// (libjpeg DCT scaling), which Prepare does by default whenever the
	// reduced image is still at least as large as what it is resized to.
	FullDecode bool
	// Budget, when set, bounds the memory of images being decoded at
	// once, shared by every Preprocessor given it (see DecodeBudget).
	Budget *DecodeBudget
}

// Transform maps model-input pixel coordinates back to the original
// (upright) image: orig = in*Scale + Offset per axis. Coordinates are
// continuous, pixel edges at integers, which is the convention of OpenCV's
// resize, so a box edge maps exactly.
type Transform struct {
	ScaleX, ScaleY   float64
	OffsetX, OffsetY float64
}

// Apply maps the point (x, y) of the model input to the original image.
func (t Transform) Apply(x, y float32) (float32, float32) {
	return float32(float64(x)*t.ScaleX + t.OffsetX), float32(float64(y)*t.ScaleY + t.OffsetY)
}

// Preprocessor turns images into model inputs for one model. It is safe for
// concurrent use: it holds only read-only tables.
type Preprocessor struct {
	w, h      int
	mode      modelrepo.ResizeMode
	shorter   int
	pad       uint8
	rgb       bool // model wants RGB; decoded Mats are BGR
	maxPixels int
	reduce    bool          // decode JPEGs at reduced size where fit allows it
	budget    *DecodeBudget // nil: no bound
	// lut[c][v] is the normalised value of 8-bit sample v in model
	// channel c: (v*scale - mean[c]) / std[c]. A lookup is exact and
	// cheaper than converting and multiplying per sample.
	lut [3][256]float32
}

// NewPreprocessor builds the Preprocessor of a validated model.
func NewPreprocessor(m *modelrepo.Model, opts PreprocessOptions) (*Preprocessor, error) {
	in := m.Config.Input
	if in.Width <= 0 || in.Height <= 0 || in.Width > modelrepo.MaxInputSide || in.Height > modelrepo.MaxInputSide {
		return nil, fmt.Errorf("model %q: input size %dx%d out of range", m.Name, in.Width, in.Height)
	}
	p := &Preprocessor{w: in.Width, h: in.Height, mode: in.Resize, shorter: in.ResizeShorter, pad: in.PadValue, maxPixels: opts.MaxPixels, reduce: !opts.FullDecode, budget: opts.Budget}
	if p.maxPixels <= 0 {
		p.maxPixels = DefaultMaxPixels
	}
	switch in.Color {
	case "RGB":
		p.rgb = true
	case "BGR":
	default:
		return nil, fmt.Errorf("model %q: input colour %q not supported (want RGB or BGR)", m.Name, in.Color)
	}
	switch in.Resize {
	case modelrepo.ResizeLetterbox, modelrepo.ResizeStretch:
	case modelrepo.ResizeShorterCrop:
		if in.ResizeShorter < max(in.Width, in.Height) {
			return nil, fmt.Errorf("model %q: resize_shorter %d below the input size", m.Name, in.ResizeShorter)
		}
	default:
		return nil, fmt.Errorf("model %q: unknown resize mode %q", m.Name, in.Resize)
	}
	for c := range 3 {
		if !(in.Std[c] > 0) || !(in.Scale > 0) {
			return nil, fmt.Errorf("model %q: input scale and std must be positive", m.Name)
		}
		for v := range 256 {
			p.lut[c][v] = (float32(v)*in.Scale - in.Mean[c]) / in.Std[c]
		}
	}
	return p, nil
}

// InputShape is the C, H, W of one model input.
func (p *Preprocessor) InputShape() (c, h, w int) { return 3, p.h, p.w }

// MaxPixels is the pixel limit in force.
func (p *Preprocessor) MaxPixels() int { return p.maxPixels }

// Prepared is one image ready for a batch slot: the model-input sized 8-bit
// BGR image (or a raw tensor) and the transform back to the original. It
// owns a native Mat: whoever holds it calls Close exactly once.
type Prepared struct {
	// Width and Height of the original image after EXIF orientation.
	Width, Height int
	// Transform maps model-input coordinates to the original image.
	Transform Transform
	// Decode and Preprocess are the time spent decoding and resizing.
	Decode, Preprocess time.Duration

	pre    *Preprocessor
	mat    gocv.Mat  // model-input sized BGR; owned
	tensor []float32 // raw CHW tensor instead of mat (PrepareTensor)
	closed bool
}

// Prepare decodes an encoded image (JPEG, PNG, WebP or BMP; see Decode for
// the limits and typed errors) and fits it to the model input by the
// model's resize mode. Unless PreprocessOptions.FullDecode is set, a large
// JPEG is decoded at a reduced size (see reduction); Width, Height and the
// Transform still refer to the original image.
func (p *Preprocessor) Prepare(data []byte) (*Prepared, error) {
	start := time.Now()
	var reduce func(w, h int) int
	if p.reduce {
		reduce = p.reduction
	}
	img, w, h, held, err := decode(data, p.maxPixels, reduce, p.budget)
	if err != nil {
		return nil, err
	}
	defer p.budget.release(held) // runs after img.Close
	defer img.Close()
	decoded := time.Now()
	pr, err := p.fit(img, w, h)
	if err != nil {
		return nil, err
	}
	pr.Decode = decoded.Sub(start)
	pr.Preprocess = time.Since(decoded)
	return pr, nil
}

// PrepareHWC takes an already decoded 8-bit image tensor [h, w, 3] (RGB
// when rgb, else BGR) and fits it to the model input like a decoded image.
// The pixels are copied; pix may be reused once it returns.
func (p *Preprocessor) PrepareHWC(pix []byte, h, w int, rgb bool) (*Prepared, error) {
	start := time.Now()
	if h <= 0 || w <= 0 {
		return nil, fmt.Errorf("image tensor of %dx%d: %w", w, h, ErrZeroSize)
	}
	// Divide rather than multiply: h*w of hostile sides overflows.
	if w > p.maxPixels/h {
		return nil, fmt.Errorf("image tensor of %dx%d is over the limit of %d pixels: %w", w, h, p.maxPixels, ErrTooManyPixels)
	}
	if len(pix) != h*w*3 {
		return nil, fmt.Errorf("image tensor [%d,%d,3] needs %d bytes, got %d: %w", h, w, h*w*3, len(pix), ErrBadTensor)
	}
	img := gocv.NewMatWithSize(h, w, gocv.MatTypeCV8UC3)
	defer img.Close()
	dst, err := img.DataPtrUint8()
	if err != nil {
		return nil, fmt.Errorf("image tensor: %w", err)
	}
	if rgb {
		// Swap to BGR while copying; no second Mat needed.
		for i := 0; i+2 < len(pix); i += 3 {
			dst[i], dst[i+1], dst[i+2] = pix[i+2], pix[i+1], pix[i]
		}
	} else {
		copy(dst, pix)
	}
	pr, err := p.fit(img, w, h)
	if err != nil {
		return nil, err
	}
	pr.Preprocess = time.Since(start)
	return pr, nil
}

// PrepareTensor takes an already preprocessed model input [3, H, W] as
// float32 in the model's channel order and normalisation. Fill copies it
// as is; chw must stay unchanged until then. Non-finite values are refused.
func (p *Preprocessor) PrepareTensor(chw []float32) (*Prepared, error) {
	if want := 3 * p.h * p.w; len(chw) != want {
		return nil, fmt.Errorf("input tensor [3,%d,%d] needs %d floats, got %d: %w", p.h, p.w, want, len(chw), ErrBadTensor)
	}
	for i, v := range chw {
		if math.IsNaN(float64(v)) || math.IsInf(float64(v), 0) {
			return nil, fmt.Errorf("input tensor value %d is %v: %w", i, v, ErrBadTensor)
		}
	}
	return &Prepared{Width: p.w, Height: p.h, Transform: Transform{ScaleX: 1, ScaleY: 1}, pre: p, tensor: chw}, nil
}

// fit resizes the upright BGR image img (not consumed) to the model input.
// img shows the whole original image of w×h pixels: at that size, or
// smaller when the decoder reduced it. The Transform maps to original
// pixels either way, through the exact ratio of the two sizes per axis.
func (p *Preprocessor) fit(img gocv.Mat, w, h int) (*Prepared, error) {
	iw, ih := img.Cols(), img.Rows()
	if iw <= 0 || ih <= 0 || img.Type() != gocv.MatTypeCV8UC3 {
		// OpenCV aborts the process on an empty resize: never reach it.
		return nil, fmt.Errorf("image of %dx%d type %v: %w", iw, ih, img.Type(), ErrZeroSize)
	}
	if w < iw || h < ih {
		return nil, fmt.Errorf("preprocess: image of %dx%d larger than its original %dx%d", iw, ih, w, h)
	}
	// Original pixels per pixel of img.
	rx, ry := float64(w)/float64(iw), float64(h)/float64(ih)
	pr := &Prepared{Width: w, Height: h, pre: p}
	switch p.mode {
	case modelrepo.ResizeLetterbox:
		// Ultralytics LetterBox: centred, the odd pixel of padding going
		// to the bottom/right. The layout comes from the original size,
		// so a reduced decode gives the same padding and Transform.
		nw, nh := p.letterboxSize(w, h)
		left := int(math.Round(float64(p.w-nw)/2 - 0.1))
		top := int(math.Round(float64(p.h-nh)/2 - 0.1))
		left, top = max(left, 0), max(top, 0)
		v := float64(p.pad)
		pr.mat = gocv.NewMatWithSizeFromScalar(gocv.NewScalar(v, v, v, 0), p.h, p.w, gocv.MatTypeCV8UC3)
		// Resize straight into the centre of the padded canvas: the
		// region shares the canvas memory and has the exact target
		// size, so OpenCV writes in place.
		roi := pr.mat.Region(image.Rect(left, top, left+nw, top+nh))
		resizeInto(img, &roi, nw, nh)
		roi.Close()
		sx, sy := float64(w)/float64(nw), float64(h)/float64(nh)
		pr.Transform = Transform{ScaleX: sx, ScaleY: sy, OffsetX: -float64(left) * sx, OffsetY: -float64(top) * sy}
	case modelrepo.ResizeShorterCrop:
		// Scaling the shorter side to p.shorter and cutting the centre
		// p.w×p.h is the same as cutting the matching centre region of the
		// original and scaling that: no huge intermediate for a thin
		// image, one resize. The region is whole pixels of img.
		s := float64(p.shorter) / float64(min(iw, ih))
		cw := clamp(int(math.Round(float64(p.w)/s)), 1, iw)
		ch := clamp(int(math.Round(float64(p.h)/s)), 1, ih)
		x0, y0 := (iw-cw)/2, (ih-ch)/2
		region := img.Region(image.Rect(x0, y0, x0+cw, y0+ch))
		pr.mat = gocv.NewMatWithSize(p.h, p.w, gocv.MatTypeCV8UC3)
		resizeInto(region, &pr.mat, p.w, p.h)
		region.Close()
		pr.Transform = Transform{
			ScaleX: float64(cw) / float64(p.w) * rx, ScaleY: float64(ch) / float64(p.h) * ry,
			OffsetX: float64(x0) * rx, OffsetY: float64(y0) * ry,
		}
	case modelrepo.ResizeStretch:
		pr.mat = gocv.NewMatWithSize(p.h, p.w, gocv.MatTypeCV8UC3)
		resizeInto(img, &pr.mat, p.w, p.h)
		pr.Transform = Transform{ScaleX: float64(w) / float64(p.w), ScaleY: float64(h) / float64(p.h)}
	default:
		return nil, fmt.Errorf("unknown resize mode %q", p.mode)
	}
	if pr.mat.Rows() != p.h || pr.mat.Cols() != p.w || !pr.mat.IsContinuous() {
		pr.Close()
		return nil, errors.New("preprocess: resize gave an unexpected image layout")
	}
	return pr, nil
}

// letterboxSize is the size a w×h image is resized to inside the
// letterbox: Ultralytics LetterBox, one ratio for both axes.
func (p *Preprocessor) letterboxSize(w, h int) (nw, nh int) {
	r := math.Min(float64(p.w)/float64(w), float64(p.h)/float64(h))
	nw = clamp(int(math.Round(float64(w)*r)), 1, p.w)
	nh = clamp(int(math.Round(float64(h)*r)), 1, p.h)
	return nw, nh
}

// resizeInto scales src to w×h into dst, which already has that size.
// INTER_AREA for downscales of 2× or more avoids aliasing; INTER_LINEAR
// otherwise (what Ultralytics and most exporters use).
func resizeInto(src gocv.Mat, dst *gocv.Mat, w, h int) {
	if src.Cols() == w && src.Rows() == h {
		src.CopyTo(dst)
		return
	}
	interp := gocv.InterpolationLinear
	if src.Cols() >= 2*w && src.Rows() >= 2*h {
		interp = gocv.InterpolationArea
	}
	gocv.Resize(src, dst, image.Pt(w, h), 0, 0, interp)
}

func clamp(v, lo, hi int) int { return min(max(v, lo), hi) }

// Fill writes the image into slot, one batch slot of 3×H×W floats, as CHW
// in the model's channel order with the model's normalisation. It
// allocates nothing. It may be called more than once, not after Close.
func (pr *Prepared) Fill(slot []float32) error {
	p := pr.pre
	n := p.w * p.h
	if len(slot) != 3*n {
		return fmt.Errorf("fill: slot holds %d floats, the model input needs %d", len(slot), 3*n)
	}
	if pr.closed {
		return errors.New("fill: prepared image already closed")
	}
	if pr.tensor != nil {
		copy(slot, pr.tensor)
		return nil
	}
	pix, err := pr.mat.DataPtrUint8()
	if err != nil {
		return fmt.Errorf("fill: %w", err)
	}
	if len(pix) != 3*n {
		return fmt.Errorf("fill: image holds %d bytes, want %d", len(pix), 3*n)
	}
	// View the interleaved bytes as n [3]uint8 pixels (same memory, byte
	// alignment) and give every slice the same length, so the compiler
	// drops all bounds checks from the loops; the source is BGR.
	px := unsafe.Slice((*[3]uint8)(unsafe.Pointer(unsafe.SliceData(pix))), n)
	c0, c1, c2 := slot[:n:n], slot[n:2*n:2*n], slot[2*n:3*n:3*n]
	c0, c1, c2 = c0[:len(px)], c1[:len(px)], c2[:len(px)]
	l0, l1, l2 := &p.lut[0], &p.lut[1], &p.lut[2]
	if p.rgb {
		for i, v := range px {
			c0[i] = l0[v[2]]
			c1[i] = l1[v[1]]
			c2[i] = l2[v[0]]
		}
	} else {
		for i, v := range px {
			c0[i] = l0[v[0]]
			c1[i] = l1[v[1]]
			c2[i] = l2[v[2]]
		}
	}
	return nil
}

// Close frees the image. It is safe to call more than once.
func (pr *Prepared) Close() {
	if pr.closed {
		return
	}
	pr.closed = true
	if pr.tensor == nil {
		pr.mat.Close()
	}
	pr.tensor = nil
}
