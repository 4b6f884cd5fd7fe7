package pipeline

import (
	"errors"
	"image"
	"image/color"
	"testing"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// TestDecodeBudget: an image is decoded only when its decoded size fits
// in what the budget has left, the reservation is returned afterwards,
// and an image bigger than the whole budget is refused as too large.
func TestDecodeBudget(t *testing.T) {
	checkMats(t)
	budget, err := NewDecodeBudget(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPreprocessor(testModel(modelrepo.TaskClassify, modelrepo.ResizeStretch, 32, 32, 10), PreprocessOptions{Budget: budget})
	if err != nil {
		t.Fatal(err)
	}
	c := color.NRGBA{10, 20, 30, 255}
	img := encodePNG(t, rectImage(1000, 1000, image.Rectangle{}, c, c)) // 3 MB decoded, a few KB encoded
	// Another request is decoding 2 MiB: 3 MB more does not fit.
	if err := budget.reserve(2 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Prepare(img); !errors.Is(err, ErrDecodeBudget) || IsInputError(err) {
		t.Fatalf("over the budget: %v, want ErrDecodeBudget (not an input error)", err)
	}
	budget.release(2 << 20)
	pr, err := p.Prepare(img)
	if err != nil {
		t.Fatal(err)
	}
	pr.Close()
	if n := budget.InUse(); n != 0 {
		t.Errorf("%d bytes still reserved after the decode", n)
	}
	huge := encodePNG(t, rectImage(2000, 1000, image.Rectangle{}, c, c)) // 6 MB decoded
	if _, err := p.Prepare(huge); !errors.Is(err, ErrTooManyPixels) {
		t.Errorf("bigger than the whole budget: %v, want ErrTooManyPixels", err)
	}
	if n := budget.InUse(); n != 0 {
		t.Errorf("%d bytes reserved after refusals", n)
	}
	if _, err := NewDecodeBudget(0); err == nil {
		t.Error("a zero budget was accepted")
	}
}
