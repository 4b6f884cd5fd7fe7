package pipeline

import (
	"errors"
	"fmt"
	"image"
	"image/color"
	"math"
	"testing"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// TestRoundTrip draws a rectangle on a synthetic image, prepares it for
// each resize mode and checks, pixel by pixel in the filled batch slot,
// that every model-input pixel shows what the Transform says it maps to:
// the rectangle colour, the background, or the letterbox padding. It then
// finds the rectangle in the slot and maps it back to the original pixels.
func TestRoundTrip(t *testing.T) {
	bg := color.NRGBA{20, 90, 160, 255}
	fg := color.NRGBA{230, 40, 10, 255}
	sizes := []struct {
		name string
		w, h int
		r    image.Rectangle
	}{
		{"landscape", 1280, 720, image.Rect(300, 200, 700, 500)},
		{"portrait", 480, 800, image.Rect(100, 300, 380, 650)},
		{"square exact", 640, 640, image.Rect(10, 20, 300, 400)},
		{"small upscale", 50, 30, image.Rect(10, 5, 30, 20)},
		{"1x1", 1, 1, image.Rect(0, 0, 1, 1)},
		{"3x700", 3, 700, image.Rect(0, 100, 3, 400)},
		{"700x3", 700, 3, image.Rect(200, 0, 500, 3)},
	}
	modes := []struct {
		mode modelrepo.ResizeMode
		w, h int
	}{
		{modelrepo.ResizeLetterbox, 640, 640},
		{modelrepo.ResizeLetterbox, 320, 192},
		{modelrepo.ResizeShorterCrop, 224, 224},
		{modelrepo.ResizeStretch, 160, 96},
	}
	for _, md := range modes {
		m := testModel(modelrepo.TaskDetect, md.mode, md.w, md.h, 80)
		m.Input.ResizeShorter = 256
		pre, err := NewPreprocessor(m, PreprocessOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, sz := range sizes {
			t.Run(fmt.Sprintf("%s_%dx%d/%s", md.mode, md.w, md.h, sz.name), func(t *testing.T) {
				checkMats(t)
				data := encodePNG(t, rectImage(sz.w, sz.h, sz.r, bg, fg))
				p, err := pre.Prepare(data)
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				if p.Width != sz.w || p.Height != sz.h {
					t.Fatalf("Prepared size %dx%d, want %dx%d", p.Width, p.Height, sz.w, sz.h)
				}
				slot := make([]float32, 3*md.w*md.h)
				if err := p.Fill(slot); err != nil {
					t.Fatal(err)
				}
				checkSlot(t, slot, md.w, md.h, p.Transform, sz.w, sz.h, sz.r, bg, fg, md.mode == modelrepo.ResizeLetterbox)
			})
		}
	}
}

// checkSlot checks every pixel of a filled RGB slot (scale 1/255, no mean)
// against the original image it was made from.
func checkSlot(t *testing.T, slot []float32, w, h int, tr Transform, ow, oh int, r image.Rectangle, bg, fg color.NRGBA, letterbox bool) {
	t.Helper()
	n := w * h
	at := func(x, y int) [3]float32 {
		i := y*w + x
		return [3]float32{slot[i] * 255, slot[n+i] * 255, slot[2*n+i] * 255}
	}
	is := func(v [3]float32, c color.NRGBA) bool {
		return math.Abs(float64(v[0])-float64(c.R)) <= 1.5 && math.Abs(float64(v[1])-float64(c.G)) <= 1.5 && math.Abs(float64(v[2])-float64(c.B)) <= 1.5
	}
	pad := color.NRGBA{114, 114, 114, 255}
	var pure, found image.Rectangle
	counts := map[string]int{}
	for y := range h {
		for x := range w {
			v := at(x, y)
			// The original interval this pixel draws from, widened by
			// the reach of the interpolation and clipped to the image
			// (OpenCV replicates the border).
			x0, y0 := tr.Apply(float32(x), float32(y))
			x1, y1 := tr.Apply(float32(x+1), float32(y+1))
			cx, cy := (x0+x1)/2, (y0+y1)/2
			if cx < 0 || cy < 0 || cx >= float32(ow) || cy >= float32(oh) {
				if !letterbox {
					t.Fatalf("pixel (%d,%d) maps outside the image to (%v,%v)", x, y, cx, cy)
				}
				if !is(v, pad) {
					t.Fatalf("padding pixel (%d,%d) = %v, want 114", x, y, v)
				}
				counts["pad"]++
				continue
			}
			if is(v, fg) {
				if found.Empty() {
					found = image.Rect(x, y, x+1, y+1)
				} else {
					found = found.Union(image.Rect(x, y, x+1, y+1))
				}
			}
			lo := [2]float32{max(x0-1.5, 0), max(y0-1.5, 0)}
			hi := [2]float32{min(x1+1.5, float32(ow)), min(y1+1.5, float32(oh))}
			inside := lo[0] >= float32(r.Min.X) && hi[0] <= float32(r.Max.X) && lo[1] >= float32(r.Min.Y) && hi[1] <= float32(r.Max.Y)
			outside := hi[0] <= float32(r.Min.X) || lo[0] >= float32(r.Max.X) || hi[1] <= float32(r.Min.Y) || lo[1] >= float32(r.Max.Y)
			switch {
			case inside:
				if !is(v, fg) {
					t.Fatalf("pixel (%d,%d) maps into the rectangle but is %v", x, y, v)
				}
				counts["fg"]++
				pure = pure.Union(image.Rect(x, y, x+1, y+1))
			case outside:
				if !is(v, bg) {
					t.Fatalf("pixel (%d,%d) maps to the background but is %v", x, y, v)
				}
				counts["bg"]++
			}
		}
	}
	if counts["fg"] == 0 {
		t.Fatalf("no model-input pixel lies wholly in the rectangle (counts %v)", counts)
	}
	if r != image.Rect(0, 0, ow, oh) && counts["bg"] == 0 && !(ow < 4 || oh < 4) {
		t.Fatalf("no pixel checked against the background (counts %v)", counts)
	}
	// The rectangle found in the model input maps back to where it was
	// drawn, within one input pixel's extent.
	bx0, by0 := tr.Apply(float32(found.Min.X), float32(found.Min.Y))
	bx1, by1 := tr.Apply(float32(found.Max.X), float32(found.Max.Y))
	tolX, tolY := float32(tr.ScaleX)+1, float32(tr.ScaleY)+1
	got := [4]float32{max(bx0, 0), max(by0, 0), min(bx1, float32(ow)), min(by1, float32(oh))}
	// A centre crop shows only part of the image: expect the part of the
	// rectangle inside it.
	vx0, vy0 := tr.Apply(0, 0)
	vx1, vy1 := tr.Apply(float32(w), float32(h))
	want := [4]float32{
		max(float32(r.Min.X), vx0), max(float32(r.Min.Y), vy0),
		min(float32(r.Max.X), vx1), min(float32(r.Max.Y), vy1),
	}
	for k, tol := range []float32{tolX, tolY, tolX, tolY} {
		if d := got[k] - want[k]; d > tol || d < -tol {
			t.Errorf("rectangle maps back to %v, drawn at %v (tolerance %v,%v)", got, want, tolX, tolY)
			break
		}
	}
}

// TestFillNormalises checks channel order and (v*scale-mean)/std for RGB
// and BGR models, and that the HWC entry point gives the same slot.
func TestFillNormalises(t *testing.T) {
	checkMats(t)
	c := color.NRGBA{200, 100, 50, 255}
	img := rectImage(8, 8, image.Rectangle{}, c, c)
	for _, order := range []string{"RGB", "BGR"} {
		m := testModel(modelrepo.TaskClassify, modelrepo.ResizeStretch, 4, 4, 10)
		m.Input.Color = order
		pre, err := NewPreprocessor(m, PreprocessOptions{})
		if err != nil {
			t.Fatal(err)
		}
		p, err := pre.Prepare(encodePNG(t, img))
		if err != nil {
			t.Fatal(err)
		}
		slot := make([]float32, 3*16)
		if err := p.Fill(slot); err != nil {
			t.Fatal(err)
		}
		p.Close()
		vals := [3]float32{200, 100, 50}
		if order == "BGR" {
			vals = [3]float32{50, 100, 200}
		}
		for ch := range 3 {
			want := (vals[ch]/255 - m.Input.Mean[ch]) / m.Input.Std[ch]
			for i := range 16 {
				if got := slot[ch*16+i]; math.Abs(float64(got-want)) > 1e-5 {
					t.Fatalf("%s channel %d: %v, want %v", order, ch, got, want)
				}
			}
		}
		// The same pixels as an RGB and as a BGR HWC tensor.
		for _, rgb := range []bool{true, false} {
			pix := make([]byte, 8*8*3)
			for i := 0; i < len(pix); i += 3 {
				pix[i], pix[i+1], pix[i+2] = 200, 100, 50
				if !rgb {
					pix[i], pix[i+2] = 50, 200
				}
			}
			p, err := pre.PrepareHWC(pix, 8, 8, rgb)
			if err != nil {
				t.Fatal(err)
			}
			got := make([]float32, 3*16)
			if err := p.Fill(got); err != nil {
				t.Fatal(err)
			}
			p.Close()
			for i := range got {
				if got[i] != slot[i] {
					t.Fatalf("%s HWC rgb=%v differs from decoded at %d: %v vs %v", order, rgb, i, got[i], slot[i])
				}
			}
		}
	}
}

func TestPrepareRawInputs(t *testing.T) {
	checkMats(t)
	pre, err := NewPreprocessor(testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 4, 2, 10), PreprocessOptions{MaxPixels: 100})
	if err != nil {
		t.Fatal(err)
	}
	tensor := make([]float32, 3*4*2)
	for i := range tensor {
		tensor[i] = float32(i) - 3
	}
	p, err := pre.PrepareTensor(tensor)
	if err != nil {
		t.Fatal(err)
	}
	slot := make([]float32, len(tensor))
	if err := p.Fill(slot); err != nil {
		t.Fatal(err)
	}
	for i := range slot {
		if slot[i] != tensor[i] {
			t.Fatalf("tensor slot[%d] = %v, want %v", i, slot[i], tensor[i])
		}
	}
	if err := p.Fill(slot[:5]); err == nil {
		t.Error("Fill into a short slot: no error")
	}
	p.Close()
	if err := p.Fill(slot); err == nil {
		t.Error("Fill after Close: no error")
	}
	p.Close() // twice is fine

	nan := append([]float32{}, tensor...)
	nan[3] = float32(math.NaN())
	tests := []struct {
		name string
		call func() (*Prepared, error)
		want error
	}{
		{"tensor too short", func() (*Prepared, error) { return pre.PrepareTensor(tensor[:23]) }, ErrBadTensor},
		{"tensor empty", func() (*Prepared, error) { return pre.PrepareTensor(nil) }, ErrBadTensor},
		{"tensor NaN", func() (*Prepared, error) { return pre.PrepareTensor(nan) }, ErrBadTensor},
		{"hwc wrong length", func() (*Prepared, error) { return pre.PrepareHWC(make([]byte, 10), 2, 2, true) }, ErrBadTensor},
		{"hwc zero side", func() (*Prepared, error) { return pre.PrepareHWC(nil, 0, 5, true) }, ErrZeroSize},
		{"hwc negative side", func() (*Prepared, error) { return pre.PrepareHWC(nil, -1, 5, true) }, ErrZeroSize},
		{"hwc over the limit", func() (*Prepared, error) { return pre.PrepareHWC(make([]byte, 3*101), 101, 1, true) }, ErrTooManyPixels},
		{"hwc huge claimed", func() (*Prepared, error) { return pre.PrepareHWC(nil, 1<<40, 1<<40, true) }, ErrTooManyPixels},
	}
	for _, tt := range tests {
		p, err := tt.call()
		if !errors.Is(err, tt.want) {
			t.Errorf("%s: error %v, want %v", tt.name, err, tt.want)
		}
		if p != nil {
			p.Close()
		}
	}
	// A good thin HWC image goes through the crop.
	p, err = pre.PrepareHWC(make([]byte, 3*50), 1, 50, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Fill(slot); err != nil {
		t.Fatal(err)
	}
	p.Close()
}

func TestNewPreprocessorRejects(t *testing.T) {
	tests := []struct {
		name string
		edit func(*modelrepo.Model)
	}{
		{"zero width", func(m *modelrepo.Model) { m.Input.Width = 0 }},
		{"colour", func(m *modelrepo.Model) { m.Input.Color = "YUV" }},
		{"resize mode", func(m *modelrepo.Model) { m.Input.Resize = "fisheye" }},
		{"resize_shorter too small", func(m *modelrepo.Model) { m.Input.Resize = modelrepo.ResizeShorterCrop; m.Input.ResizeShorter = 10 }},
		{"zero std", func(m *modelrepo.Model) { m.Input.Std[1] = 0 }},
	}
	for _, tt := range tests {
		m := detector()
		tt.edit(m)
		if _, err := NewPreprocessor(m, PreprocessOptions{}); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}
