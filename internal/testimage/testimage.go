// Package testimage makes synthetic images that cost a decoder what a
// photo costs, for benchmarks and load generation where no real photo is
// at hand. It depends on the standard library only.
package testimage

import (
	"bytes"
	"image"
	"image/color"
	"image/jpeg"
	"math/rand/v2"
)

// PhotoLike is a w×h image with gradients and noise, closer to a photo's
// entropy than a flat image, so encoders and decoders do real work. The
// same size always gives the same pixels.
func PhotoLike(w, h int) *image.NRGBA {
	rng := rand.New(rand.NewPCG(1, 2))
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			n := uint8(rng.IntN(24))
			img.SetNRGBA(x, y, color.NRGBA{uint8(x*255/w) + n, uint8(y*255/h) + n, uint8((x+y)*127/(w+h)) + n, 255})
		}
	}
	return img
}

// JPEG is PhotoLike(w, h) encoded as a quality-90 JPEG.
func JPEG(w, h int) []byte {
	var buf bytes.Buffer
	// Encoding an in-memory NRGBA into a bytes.Buffer cannot fail.
	_ = jpeg.Encode(&buf, PhotoLike(w, h), &jpeg.Options{Quality: 90})
	return buf.Bytes()
}
