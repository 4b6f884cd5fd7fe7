package pipeline

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/color"
	"math"
	"os"
	"path/filepath"
	"testing"

	"gocv.io/x/gocv"

	"github.com/visionserve/visionserve/internal/testimage"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// TestReducedJPEGDecode decodes JPEGs at 1/1, 1/2, 1/4 and 1/8 and checks
// the size libjpeg gives, ceil(side/r), after EXIF orientation, that the
// reduced image still shows the upright picture, and that other formats
// never reduce.
func TestReducedJPEGDecode(t *testing.T) {
	encodings := []struct {
		name   string
		encode func(img image.Image) []byte
	}{
		{"baseline", func(img image.Image) []byte { return encodeJPEG(t, img, 95) }},
		{"progressive", func(img image.Image) []byte {
			return encodeCV(t, img, ".jpg", gocv.IMWriteJpegQuality, 95, gocv.IMWriteJpegProgressive, 1)
		}},
	}
	for _, sz := range []struct{ w, h int }{{256, 128}, {203, 131}, {9, 5}, {1, 1}} {
		upright := quadrants(sz.w, sz.h)
		for _, o := range []int{1, 6, 7} {
			for _, enc := range encodings {
				data := withEXIF(enc.encode(storedAs(upright, o)), o, false)
				for _, r := range []int{1, 2, 4, 8} {
					t.Run(fmt.Sprintf("%dx%d/exif%d/%s/r%d", sz.w, sz.h, o, enc.name, r), func(t *testing.T) {
						checkMats(t)
						var asked [2]int
						img, w, h, _, err := decode(data, 0, func(w, h int) int { asked = [2]int{w, h}; return r }, nil)
						if err != nil {
							t.Fatal(err)
						}
						defer img.Close()
						if asked != [2]int{sz.w, sz.h} || w != sz.w || h != sz.h {
							t.Errorf("reduce asked with %v, decode says %dx%d; want the upright %dx%d", asked, w, h, sz.w, sz.h)
						}
						dw, dh := (sz.w+r-1)/r, (sz.h+r-1)/r
						if img.Cols() != dw || img.Rows() != dh {
							t.Fatalf("decoded %dx%d, want %dx%d", img.Cols(), img.Rows(), dw, dh)
						}
						if dw < 8 || dh < 8 {
							return // too few pixels to tell the quadrants apart
						}
						for q, c := range quadColours {
							x, y := dw/4+(q%2)*dw/2, dh/4+(q/2)*dh/2
							if got := matPixel(img, x, y); !nearBGR(got, c, 40) {
								t.Errorf("quadrant %d is BGR %v, want RGB %v", q, got, c)
							}
						}
					})
				}
			}
		}
	}
	t.Run("grey jpeg", func(t *testing.T) {
		checkMats(t)
		grey := image.NewGray(image.Rect(0, 0, 99, 41))
		for i := range grey.Pix {
			grey.Pix[i] = 77
		}
		img, _, _, _, err := decode(encodeJPEG(t, grey, 95), 0, func(int, int) int { return 4 }, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if img.Cols() != 25 || img.Rows() != 11 || img.Type() != gocv.MatTypeCV8UC3 {
			t.Fatalf("decoded %dx%d %v, want 25x11 CV8UC3", img.Cols(), img.Rows(), img.Type())
		}
		if got := matPixel(img, 12, 5); !nearBGR(got, color.NRGBA{77, 77, 77, 255}, 2) {
			t.Errorf("centre pixel BGR %v, want 77", got)
		}
	})
	t.Run("png never reduces", func(t *testing.T) {
		checkMats(t)
		img, w, h, _, err := decode(encodePNG(t, quadrants(64, 32)), 0, func(int, int) int {
			t.Error("reduce called for a PNG")
			return 2
		}, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		if img.Cols() != 64 || img.Rows() != 32 || w != 64 || h != 32 {
			t.Errorf("decoded %dx%d of %dx%d, want 64x32", img.Cols(), img.Rows(), w, h)
		}
	})
	t.Run("bad reduction is an error", func(t *testing.T) {
		checkMats(t)
		if _, _, _, _, err := decode(encodeJPEG(t, quadrants(64, 32), 90), 0, func(int, int) int { return 3 }, nil); err == nil {
			t.Error("reduction 3: no error")
		}
	})
	t.Run("jpeg cut after header", func(t *testing.T) {
		checkMats(t)
		jpg := encodeJPEG(t, quadrants(640, 320), 90)
		cut := jpg[:bytes.Index(jpg, []byte{0xFF, 0xDA})+4]
		for _, r := range []int{2, 4, 8} {
			if _, _, _, _, err := decode(cut, 0, func(int, int) int { return r }, nil); !errors.Is(err, ErrCorrupt) {
				t.Errorf("r=%d: error %v, want ErrCorrupt", r, err)
			}
		}
	})
}

// TestReduction checks the reduction chosen for each resize mode against
// values worked out by hand, thresholds included: the largest r whose
// ceil(side/r) image is still no smaller than what fit resizes it to.
func TestReduction(t *testing.T) {
	letterbox := detector() // 640x640
	wide := testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 320, 192, 80)
	crop := classifier() // shorter side 256, crop 224
	stretch := testModel(modelrepo.TaskDetect, modelrepo.ResizeStretch, 160, 96, 80)
	tests := []struct {
		name string
		m    *modelrepo.Model
		w, h int
		want int
	}{
		{"letterbox 1920x1080: 960x540 holds 640x360", letterbox, 1920, 1080, 2},
		{"letterbox 1080x1920", letterbox, 1080, 1920, 2},
		{"letterbox 1280x720: exactly 640x360", letterbox, 1280, 720, 2},
		{"letterbox 1279x720: ceil keeps 640 wide", letterbox, 1279, 720, 2},
		{"letterbox 1277x720: 639 wide is too small", letterbox, 1277, 720, 1},
		{"letterbox 810x1080: 540 high is too small", letterbox, 810, 1080, 1},
		{"letterbox 4032x3024", letterbox, 4032, 3024, 4},
		{"letterbox 5120x5120", letterbox, 5120, 5120, 8},
		{"letterbox smaller than the input", letterbox, 320, 200, 1},
		{"letterbox 320x192 of 1920x1080: 320x180", wide, 1920, 1080, 4},
		{"letterbox 320x192 of 1080x1920: 108x192", wide, 1080, 1920, 8},
		{"crop 1280x720: 360 high", crop, 1280, 720, 2},
		{"crop 720x1280", crop, 720, 1280, 2},
		{"crop 810x1080: 203 wide at 1/4 is too small", crop, 810, 1080, 2},
		{"crop 4032x3024: 378 high at 1/8", crop, 4032, 3024, 8},
		{"crop 2048x2047: ceil gives 256", crop, 2048, 2047, 8},
		{"crop 2048x2040: 255 is too small", crop, 2048, 2040, 4},
		{"crop 512x512: exactly 256", crop, 512, 512, 2},
		{"crop 300x200", crop, 300, 200, 1},
		{"stretch 1280x768: exactly 160x96", stretch, 1280, 768, 8},
		{"stretch 1280x720: 90 high at 1/8 is too small", stretch, 1280, 720, 4},
		{"stretch 100x50", stretch, 100, 50, 1},
	}
	for _, tt := range tests {
		pre, err := NewPreprocessor(tt.m, PreprocessOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := pre.reduction(tt.w, tt.h); got != tt.want {
			t.Errorf("%s: reduction %d, want %d", tt.name, got, tt.want)
		}
	}
}

// TestReducedTransform prepares JPEGs that decode at a reduced size, with
// sides that r does not divide and with EXIF rotations, finds a drawn
// rectangle in the model input and maps it back through the Transform: it
// must land where it was drawn in the original, to within one model-input
// pixel's extent plus one reduced pixel.
func TestReducedTransform(t *testing.T) {
	black, white := color.NRGBA{0, 0, 0, 255}, color.NRGBA{255, 255, 255, 255}
	images := []struct {
		name string
		w, h int
		o    int // EXIF orientation the file is stored with
		r    image.Rectangle
	}{
		{"1923x1083", 1923, 1083, 1, image.Rect(701, 303, 1500, 900)},
		{"1083x1923 exif6", 1083, 1923, 6, image.Rect(101, 1003, 900, 1700)},
		{"2050x1537 exif8", 2050, 1537, 8, image.Rect(800, 600, 1200, 1000)},
	}
	modes := []*modelrepo.Model{
		detector(),
		testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 320, 192, 80),
		classifier(),
		testModel(modelrepo.TaskDetect, modelrepo.ResizeStretch, 160, 96, 80),
	}
	for _, im := range images {
		data := withEXIF(encodeJPEG(t, storedAs(rectImage(im.w, im.h, im.r, black, white), im.o), 95), im.o, false)
		for _, m := range modes {
			m.Input.Mean, m.Input.Std = [3]float32{}, [3]float32{1, 1, 1}
			pre, err := NewPreprocessor(m, PreprocessOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Run(fmt.Sprintf("%s/%s_%dx%d", im.name, m.Input.Resize, m.Input.Width, m.Input.Height), func(t *testing.T) {
				checkMats(t)
				r := pre.reduction(im.w, im.h)
				if r == 1 {
					t.Fatalf("test image %dx%d not reduced for this model", im.w, im.h)
				}
				p, err := pre.Prepare(data)
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				if p.Width != im.w || p.Height != im.h {
					t.Fatalf("Prepared size %dx%d, want %dx%d", p.Width, p.Height, im.w, im.h)
				}
				w, h := m.Input.Width, m.Input.Height
				slot := make([]float32, 3*w*h)
				if err := p.Fill(slot); err != nil {
					t.Fatal(err)
				}
				// The rectangle is where the model input is brighter than
				// mid grey (the letterbox padding, 114, is darker).
				var found image.Rectangle
				for y := range h {
					for x := range w {
						if slot[w*h+y*w+x] > 0.5 {
							found = found.Union(image.Rect(x, y, x+1, y+1))
						}
					}
				}
				tr := p.Transform
				bx0, by0 := tr.Apply(float32(found.Min.X), float32(found.Min.Y))
				bx1, by1 := tr.Apply(float32(found.Max.X), float32(found.Max.Y))
				got := [4]float32{max(bx0, 0), max(by0, 0), min(bx1, float32(im.w)), min(by1, float32(im.h))}
				vx0, vy0 := tr.Apply(0, 0)
				vx1, vy1 := tr.Apply(float32(w), float32(h))
				want := [4]float32{
					max(float32(im.r.Min.X), vx0), max(float32(im.r.Min.Y), vy0),
					min(float32(im.r.Max.X), vx1), min(float32(im.r.Max.Y), vy1),
				}
				tolX, tolY := float32(tr.ScaleX)+float32(r), float32(tr.ScaleY)+float32(r)
				var worst float32
				for k, tol := range []float32{tolX, tolY, tolX, tolY} {
					d := float32(math.Abs(float64(got[k] - want[k])))
					worst = max(worst, d)
					if d > tol {
						t.Errorf("rectangle maps back to %v, drawn at %v (tolerance %v,%v)", got, want, tolX, tolY)
						break
					}
				}
				t.Logf("r=%d: rectangle maps back to %v, drawn at %v: worst edge %.2f px, scale %.2f", r, got, want, worst, tr.ScaleX)
			})
		}
	}
}

const sharedImages = "../../../shared/testdata/images"

// TestReducedMatchesFull prepares real photos (and a synthetic one) with
// the reduced and the full decode and compares what the model sees.
//
// The letterbox layout and Transform come from the original size, so they
// must be identical; a centre crop is cut in whole reduced pixels, so it
// may move by up to one reduced pixel (r original pixels). The model
// inputs differ by (measured, 8-bit levels of mean |diff|): letterbox 0.2
// to 1.5, crop 3.0 to 5.4. The crop's larger share is the crop moving by
// one original pixel: moving the full decode's crop of bus.jpg by one
// pixel alone gives 5.6 levels, and decoding at 1/2 through an exact 2×2
// box filter instead of libjpeg's 5.3. The bounds, 2 levels (2/255 in
// model units) and 8 levels (~3%), hold those with a margin and still
// catch a wrong channel, a flipped or misplaced image (tens of levels).
func TestReducedMatchesFull(t *testing.T) {
	plain := func(m *modelrepo.Model) *modelrepo.Model {
		// Values in [0, 1]: a difference of 1/255 is one 8-bit level.
		m.Input.Mean, m.Input.Std = [3]float32{}, [3]float32{1, 1, 1}
		return m
	}
	letterbox, crop := plain(detector()), plain(classifier())
	const letterboxLevels, cropLevels = 2, 8
	tests := []struct {
		image string // under sharedImages, or "" for the synthetic one
		m     *modelrepo.Model
		r     int // the reduction worked out by hand
	}{
		{"", letterbox, 2},        // 1920x1080: 960x540 holds 640x360
		{"", crop, 4},             // 1080/4 = 270 >= 256
		{"bus.jpg", letterbox, 1}, // 810x1080: 540 < 640
		{"bus.jpg", crop, 2},
		{"zidane.jpg", letterbox, 2},
		{"zidane.jpg", crop, 2},
		{"dog.jpg", letterbox, 2}, // 1546x1213: 773x607 holds 640x502
		{"dog.jpg", crop, 4},      // 1213/4 -> 304 >= 256
	}
	synthetic := testimage.JPEG(1920, 1080)
	for _, tt := range tests {
		name := tt.image
		if name == "" {
			name = "photolike_1920x1080.jpg"
		}
		t.Run(fmt.Sprintf("%s/%s", name, tt.m.Input.Resize), func(t *testing.T) {
			data := synthetic
			if tt.image != "" {
				var err error
				if data, err = os.ReadFile(filepath.Join(sharedImages, tt.image)); err != nil {
					t.Skipf("real test image missing: ../shared/testdata/images/%s", tt.image)
				}
			}
			checkMats(t)
			var (
				prepared [2]*Prepared
				slots    [2][]float32
			)
			for k, full := range []bool{false, true} {
				pre, err := NewPreprocessor(tt.m, PreprocessOptions{FullDecode: full})
				if err != nil {
					t.Fatal(err)
				}
				p, err := pre.Prepare(data)
				if err != nil {
					t.Fatal(err)
				}
				defer p.Close()
				if !full {
					if r := pre.reduction(p.Width, p.Height); r != tt.r {
						t.Fatalf("reduction %d, want %d", r, tt.r)
					}
				}
				c, h, w := pre.InputShape()
				slots[k] = make([]float32, c*h*w)
				if err := p.Fill(slots[k]); err != nil {
					t.Fatal(err)
				}
				prepared[k] = p
			}
			red, full := prepared[0], prepared[1]
			if red.Width != full.Width || red.Height != full.Height {
				t.Fatalf("reduced decode says %dx%d, full %dx%d", red.Width, red.Height, full.Width, full.Height)
			}
			var sum, worst float64
			for i := range slots[0] {
				d := math.Abs(float64(slots[0][i] - slots[1][i]))
				sum += d
				worst = max(worst, d)
			}
			mean := sum / float64(len(slots[0])) * 255
			// How far apart the two Transforms put model-input points, in
			// original pixels.
			var apart float64
			w, h := float32(tt.m.Input.Width), float32(tt.m.Input.Height)
			for _, pt := range [][2]float32{{0, 0}, {w, h}, {w / 2, h / 2}, {w / 3, h}} {
				x0, y0 := red.Transform.Apply(pt[0], pt[1])
				x1, y1 := full.Transform.Apply(pt[0], pt[1])
				apart = max(apart, math.Abs(float64(x0-x1)), math.Abs(float64(y0-y1)))
			}
			t.Logf("r=%d: mean |diff| %.2f levels (max %.0f), Transforms %.2f px apart", tt.r, mean, worst*255, apart)
			switch {
			case tt.r == 1:
				if worst != 0 || red.Transform != full.Transform {
					t.Errorf("no reduction, yet the paths differ: max %.0f levels, Transforms %+v and %+v", worst*255, red.Transform, full.Transform)
				}
			case tt.m.Input.Resize == modelrepo.ResizeLetterbox:
				if red.Transform != full.Transform {
					t.Errorf("letterbox Transform %+v, full decode %+v", red.Transform, full.Transform)
				}
				if mean > letterboxLevels {
					t.Errorf("mean |diff| %.2f levels over %d", mean, letterboxLevels)
				}
			default:
				if apart > float64(tt.r) {
					t.Errorf("crop Transforms %.2f px apart, over one reduced pixel (%d)", apart, tt.r)
				}
				if mean > cropLevels {
					t.Errorf("mean |diff| %.2f levels over %d", mean, cropLevels)
				}
			}
		})
	}
}

// reducedSeeds are fuzz seeds for FuzzPrepare (a 64x48 letterbox) large
// enough to be decoded at 1/4, so the fuzzer starts inside the reduced
// decode: baseline, progressive, and stored sideways under EXIF 6.
func reducedSeeds(t testing.TB) map[string][]byte {
	img := quadrants(256, 192)
	return map[string][]byte{
		"jpeg_reduced":             encodeJPEG(t, img, 75),
		"jpeg_reduced_progressive": encodeCV(t, img, ".jpg", gocv.IMWriteJpegQuality, 75, gocv.IMWriteJpegProgressive, 1),
		"jpeg_reduced_exif6":       withEXIF(encodeJPEG(t, storedAs(img, 6), 75), 6, false),
	}
}

// TestWriteReducedFuzzCorpus writes reducedSeeds under
// testdata/fuzz/FuzzPrepare with -update-corpus; without it, it checks that
// they exist and are reduced by FuzzPrepare's model.
func TestWriteReducedFuzzCorpus(t *testing.T) {
	pre, err := NewPreprocessor(testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 64, 48, 80), PreprocessOptions{})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join("testdata", "fuzz", "FuzzPrepare")
	for name, data := range reducedSeeds(t) {
		h, err := ReadHeader(data)
		if err != nil {
			t.Fatal(err)
		}
		w, ht := h.Width, h.Height
		if JPEGOrientation(data) >= 5 {
			w, ht = ht, w
		}
		if r := pre.reduction(w, ht); r < 2 {
			t.Errorf("seed %s of %dx%d is not reduced", name, w, ht)
		}
		path := filepath.Join(dir, "seed_"+name)
		if *updateCorpus {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
			if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		} else if _, err := os.Stat(path); err != nil {
			t.Errorf("fuzz seed missing (go test -run TestWriteReducedFuzzCorpus -update-corpus): %v", err)
		}
	}
}
