package pipeline

import (
	"errors"
	"flag"
	"fmt"
	"image"
	"image/color"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"gocv.io/x/gocv"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

var updateCorpus = flag.Bool("update-corpus", false, "rewrite the fuzz seed corpus under testdata/fuzz")

// seedImages are small real encodings of every accepted format, whole and
// cut short, used as fuzz seeds both in code and in testdata/fuzz.
func seedImages(t testing.TB) map[string][]byte {
	img := quadrants(12, 8)
	jpg := encodeJPEG(t, img, 80)
	png := encodePNG(t, img)
	webp := encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 80)
	webpL := encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 101)
	bmp := encodeCV(t, img, ".bmp")
	grey := image.NewGray(image.Rect(0, 0, 5, 3))
	return map[string][]byte{
		"jpeg":           jpg,
		"jpeg_exif6":     withEXIF(jpg, 6, false),
		"jpeg_exif7_be":  withEXIF(jpg, 7, true),
		"jpeg_cmyk":      cmykJPEG(2, 1, func(bx, _ int) [4]byte { return [4]byte{byte(bx * 200), 30, 60, 200} }),
		"jpeg_truncated": jpg[:len(jpg)/2],
		"png":            png,
		"png_grey":       encodePNG(t, grey),
		"png_rgba":       encodePNG(t, rectImage(4, 4, image.Rectangle{}, color.NRGBA{1, 2, 3, 4}, color.NRGBA{})),
		"png_bomb":       rawPNG(30000, 30000, 8, 2, make([]byte, 64)),
		"png_truncated":  png[:len(png)-20],
		"webp":           webp,
		"webp_lossless":  webpL,
		"webp_truncated": webp[:len(webp)/2],
		"bmp":            bmp,
		"bmp_truncated":  bmp[:60],
	}
}

// TestWriteFuzzCorpus writes the seed files with -update-corpus; without
// it, it checks that they exist so that `go test -fuzz` starts from them.
func TestWriteFuzzCorpus(t *testing.T) {
	seeds := seedImages(t)
	for _, fuzzer := range []string{"FuzzPrepare", "FuzzHeader", "FuzzEXIF"} {
		dir := filepath.Join("testdata", "fuzz", fuzzer)
		for name, data := range seeds {
			if fuzzer == "FuzzEXIF" && !strings.HasPrefix(name, "jpeg") {
				continue
			}
			path := filepath.Join(dir, "seed_"+name)
			if *updateCorpus {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", data)
				if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
					t.Fatal(err)
				}
			} else if _, err := os.Stat(path); err != nil {
				t.Errorf("fuzz seed missing (go test -run TestWriteFuzzCorpus -update-corpus): %v", err)
			}
		}
	}
}

func addSeeds(f *testing.F) {
	for _, data := range seedImages(f) {
		f.Add(data)
	}
}

// FuzzHeader: the pure-Go header reader never panics, and what it accepts
// has positive sides that the pixel limit then bounds.
func FuzzHeader(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadHeader(data)
		if err != nil {
			if !IsInputError(err) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if h.Width <= 0 || h.Height <= 0 || h.Format == "" {
			t.Fatalf("accepted header %+v", h)
		}
		if _, err := CheckHeader(data, 1000); err == nil && h.Width*h.Height > 1000 {
			t.Fatalf("limit not enforced for %+v", h)
		}
	})
}

// FuzzEXIF: orientation parsing never panics and stays in 1..8.
func FuzzEXIF(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if o := JPEGOrientation(data); o < 1 || o > 8 {
			t.Fatalf("orientation %d", o)
		}
	})
}

// FuzzPrepare: arbitrary bytes through header check, decode, orientation,
// letterbox and Fill never crash, hang or leak a Mat, and every refusal is
// a typed input error. The pixel limit is small so that the fuzzer spends
// its time on parsing rather than on huge valid images.
func FuzzPrepare(f *testing.F) {
	addSeeds(f)
	m := testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 64, 48, 80)
	pre, err := NewPreprocessor(m, PreprocessOptions{MaxPixels: 1 << 18})
	if err != nil {
		f.Fatal(err)
	}
	slot := make([]float32, 3*64*48)
	f.Fuzz(func(t *testing.T, data []byte) {
		before := matCount()
		p, err := pre.Prepare(data)
		if err != nil {
			if !IsInputError(err) {
				t.Fatalf("untyped error %v", err)
			}
		} else {
			if p.Width <= 0 || p.Height <= 0 {
				t.Fatalf("prepared %dx%d", p.Width, p.Height)
			}
			if err := p.Fill(slot); err != nil {
				t.Fatal(err)
			}
			p.Close()
		}
		if after := matCount(); after != before {
			t.Fatalf("leaked %d Mats:\n%s", after-before, matProfile())
		}
	})
}

// FuzzJPEGData: the structural check of JPEG image data never panics,
// reads nothing past the data, and refuses only with ErrCorrupt.
func FuzzJPEGData(f *testing.F) {
	addSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < 2 {
			return
		}
		if err := checkJPEGData(data); err != nil && !errors.Is(err, ErrCorrupt) {
			t.Fatalf("untyped error %v", err)
		}
	})
}
