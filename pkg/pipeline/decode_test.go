package pipeline

import (
	"bytes"
	"errors"
	"image"
	"image/color"
	"image/jpeg"
	"testing"

	"gocv.io/x/gocv"
)

// TestDecodeInputs feeds each kind of good and bad input through Decode:
// every bad one gives its typed error, every good one the right pixels.
func TestDecodeInputs(t *testing.T) {
	red := color.NRGBA{200, 30, 60, 255}
	flat := rectImage(40, 30, image.Rectangle{}, red, red)
	jpg := encodeJPEG(t, flat, 95)
	pngBytes := encodePNG(t, flat)

	// 16-bit grey PNG, every sample 0xABCD: 8-bit is round(0xABCD/257).
	g16 := image.NewGray16(image.Rect(0, 0, 8, 4))
	for i := range g16.Pix {
		g16.Pix[i] = []byte{0xAB, 0xCD}[i%2]
	}
	// 16-bit RGBA PNG.
	rgba16 := image.NewNRGBA64(image.Rect(0, 0, 8, 4))
	for y := range 4 {
		for x := range 8 {
			rgba16.SetNRGBA64(x, y, color.NRGBA64{R: 0xFFFF, G: 0x8080, B: 0x0000, A: 0x8000})
		}
	}
	grey := image.NewGray(image.Rect(0, 0, 9, 5))
	for i := range grey.Pix {
		grey.Pix[i] = 77
	}
	// Grey+alpha (colour type 4), which Go's encoder never writes.
	var ga []byte
	for range 3 {
		ga = append(ga, 0) // filter: none
		for range 5 {
			ga = append(ga, 150, 40)
		}
	}
	translucent := rectImage(12, 6, image.Rectangle{}, color.NRGBA{10, 220, 30, 100}, color.NRGBA{10, 220, 30, 100})
	// A 50 KB-class PNG claiming 30000x30000: a few valid rows only.
	bomb := rawPNG(30000, 30000, 8, 2, make([]byte, 3*(1+3*30000)))
	// CMYK: stored inverted CMYK (255,0,255,255) is pure magenta... as
	// inverted CMYK, stored c'=255 means C=0: R=c'·k'/255.
	cmyk := cmykJPEG(3, 1, func(bx, _ int) [4]byte {
		if bx == 1 {
			return [4]byte{255, 0, 0, 255} // red
		}
		return [4]byte{0, 0, 255, 128} // dark blue
	})

	tests := []struct {
		name    string
		data    []byte
		max     int
		wantErr error
		w, h    int
		want    color.NRGBA // colour at the centre
		tol     uint8
	}{
		{name: "empty", data: nil, wantErr: ErrEmptyImage},
		{name: "unknown format", data: []byte("GIF89a not accepted here"), wantErr: ErrUnknownFormat},
		{name: "text", data: []byte("hello"), wantErr: ErrUnknownFormat},
		{name: "truncated jpeg header", data: jpg[:20], wantErr: ErrCorrupt},
		{name: "truncated jpeg data", data: jpg[:len(jpg)/2], wantErr: ErrCorrupt},
		{name: "jpeg cut after header", data: jpg[:bytes.Index(jpg, []byte{0xFF, 0xDA})+4], wantErr: ErrCorrupt},
		{name: "corrupt png data", data: corruptPNG(pngBytes), wantErr: ErrCorrupt},
		{name: "png header bomb", data: bomb, wantErr: ErrTooManyPixels},
		{name: "png zero width", data: rawPNG(0, 10, 8, 2, nil), wantErr: ErrZeroSize},
		{name: "over a custom limit", data: pngBytes, max: 40*30 - 1, wantErr: ErrTooManyPixels},
		{name: "jpeg", data: jpg, w: 40, h: 30, want: red, tol: 4},
		{name: "png", data: pngBytes, w: 40, h: 30, want: red},
		{name: "webp lossless", data: encodeCV(t, flat, ".webp", gocv.IMWriteWebpQuality, 101), w: 40, h: 30, want: red},
		{name: "webp lossy", data: encodeCV(t, flat, ".webp", gocv.IMWriteWebpQuality, 90), w: 40, h: 30, want: red, tol: 8},
		{name: "bmp", data: encodeCV(t, flat, ".bmp"), w: 40, h: 30, want: red},
		{name: "1x1", data: encodePNG(t, rectImage(1, 1, image.Rectangle{}, red, red)), w: 1, h: 1, want: red},
		{name: "16-bit grey png", data: encodePNG(t, g16), w: 8, h: 4, want: color.NRGBA{171, 171, 171, 255}},
		{name: "16-bit rgba png", data: encodePNG(t, rgba16), w: 8, h: 4, want: color.NRGBA{255, 128, 0, 255}, tol: 1},
		{name: "grey png", data: encodePNG(t, grey), w: 9, h: 5, want: color.NRGBA{77, 77, 77, 255}},
		{name: "grey jpeg", data: encodeJPEG(t, grey, 95), w: 9, h: 5, want: color.NRGBA{77, 77, 77, 255}, tol: 2},
		{name: "grey+alpha png", data: rawPNG(5, 3, 8, 4, ga), w: 5, h: 3, want: color.NRGBA{150, 150, 150, 255}},
		{name: "rgba png drops alpha", data: encodePNG(t, translucent), w: 12, h: 6, want: color.NRGBA{10, 220, 30, 255}},
		{name: "cmyk jpeg", data: cmyk, w: 24, h: 8, want: color.NRGBA{255, 0, 0, 255}, tol: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkMats(t)
			img, err := Decode(tt.data, tt.max)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("Decode error = %v, want %v", err, tt.wantErr)
				}
				if !IsInputError(err) {
					t.Errorf("IsInputError(%v) = false", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			defer img.Close()
			if img.Cols() != tt.w || img.Rows() != tt.h || img.Type() != gocv.MatTypeCV8UC3 {
				t.Fatalf("decoded %dx%d %v, want %dx%d CV8UC3", img.Cols(), img.Rows(), img.Type(), tt.w, tt.h)
			}
			if got := matPixel(img, tt.w/2, tt.h/2); !nearBGR(got, tt.want, tt.tol) {
				t.Errorf("centre pixel BGR %v, want RGB %v ±%d", got, tt.want, tt.tol)
			}
		})
	}
}

// corruptPNG garbles the compressed data of a PNG (and fixes nothing, so
// the CRC fails too).
func corruptPNG(p []byte) []byte {
	out := bytes.Clone(p)
	i := bytes.Index(out, []byte("IDAT"))
	for k := i + 6; k < i+20 && k < len(out)-12; k++ {
		out[k] ^= 0x5A
	}
	return out
}

// TestCMYKJPEG checks the hand-made CMYK JPEG against Go's decoder, which
// knows Adobe CMYK, so both the test encoder and OpenCV's conversion are
// checked against an independent reading.
func TestCMYKJPEG(t *testing.T) {
	checkMats(t)
	data := cmykJPEG(3, 2, func(bx, by int) [4]byte {
		return [4]byte{byte(40 + 80*bx), byte(200 - 60*by), byte(30 * bx * by), byte(255 - 50*bx)}
	})
	ref, err := jpeg.Decode(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Go cannot read the test CMYK JPEG: %v", err)
	}
	if _, ok := ref.(*image.CMYK); !ok {
		t.Fatalf("Go decodes it as %T, want *image.CMYK", ref)
	}
	img, err := Decode(data, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for by := range 2 {
		for bx := range 3 {
			x, y := bx*8+4, by*8+4
			r, g, b, _ := ref.At(x, y).RGBA()
			want := color.NRGBA{uint8(r >> 8), uint8(g >> 8), uint8(b >> 8), 255}
			if got := matPixel(img, x, y); !nearBGR(got, want, 3) {
				t.Errorf("block (%d,%d): OpenCV BGR %v, Go RGB %v", bx, by, got, want)
			}
		}
	}
}

// TestEXIFOrientation stores an upright quadrant image as each of the 8
// EXIF orientations would and checks it decodes upright again.
func TestEXIFOrientation(t *testing.T) {
	const uw, uh = 48, 32
	upright := quadrants(uw, uh)
	for o := 1; o <= 8; o++ {
		for _, big := range []bool{false, true} {
			checkMats(t)
			stored := storedAs(upright, o)
			data := withEXIF(encodeJPEG(t, stored, 95), o, big)
			if got := JPEGOrientation(data); got != o {
				t.Fatalf("orientation %d: JPEGOrientation = %d", o, got)
			}
			img, err := Decode(data, 0)
			if err != nil {
				t.Fatalf("orientation %d: %v", o, err)
			}
			if img.Cols() != uw || img.Rows() != uh {
				t.Errorf("orientation %d: decoded %dx%d, want %dx%d", o, img.Cols(), img.Rows(), uw, uh)
			} else {
				for q, c := range quadColours {
					x, y := uw/4+(q%2)*uw/2, uh/4+(q/2)*uh/2
					if got := matPixel(img, x, y); !nearBGR(got, c, 40) {
						t.Errorf("orientation %d (big endian %v): quadrant %d is BGR %v, want RGB %v", o, big, q, got, c)
					}
				}
			}
			img.Close()
		}
	}
}

// storedAs returns the image a camera stores for upright u with EXIF
// orientation o, written from the EXIF definitions, independently of the
// code under test.
func storedAs(u *image.NRGBA, o int) *image.NRGBA {
	uw, uh := u.Bounds().Dx(), u.Bounds().Dy()
	sw, sh := uw, uh
	if o >= 5 {
		sw, sh = uh, uw
	}
	s := image.NewNRGBA(image.Rect(0, 0, sw, sh))
	for y := range sh {
		for x := range sw {
			var ux, uy int
			switch o {
			case 1:
				ux, uy = x, y
			case 2:
				ux, uy = uw-1-x, y
			case 3:
				ux, uy = uw-1-x, uh-1-y
			case 4:
				ux, uy = x, uh-1-y
			case 5:
				ux, uy = y, x
			case 6:
				ux, uy = uw-1-y, x
			case 7:
				ux, uy = uw-1-y, uh-1-x
			case 8:
				ux, uy = y, uh-1-x
			}
			s.SetNRGBA(x, y, u.NRGBAAt(ux, uy))
		}
	}
	return s
}
