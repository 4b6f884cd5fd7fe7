package pipeline

import (
	"fmt"

	"gocv.io/x/gocv"
)

// decodeFlags make OpenCV return 8-bit 3-channel BGR whatever the input:
// grey is replicated, alpha is dropped (as PIL's convert("RGB") does),
// 16-bit samples keep their high byte, CMYK JPEGs are converted by
// libjpeg/OpenCV. EXIF orientation is applied here in Go rather than by
// OpenCV so that it is the same on every OpenCV build.
const decodeFlags = gocv.IMReadColor | gocv.IMReadIgnoreOrientation

// Decode turns encoded image bytes into an upright 8-bit BGR Mat that the
// caller owns and must Close. Before decoding it checks the header with
// CheckHeader (format JPEG, PNG, WebP or BMP; no zero side; at most
// maxPixels pixels, DefaultMaxPixels when maxPixels <= 0), so a small file
// that claims a huge image is refused without allocating it. JPEG EXIF
// orientations 1..8 are applied. Failures are typed errors (see errors.go);
// OpenCV failures never end the process because imdecode catches them.
func Decode(data []byte, maxPixels int) (gocv.Mat, error) {
	img, _, _, _, err := decode(data, maxPixels, nil, nil)
	return img, err
}

// decode is Decode that may let libjpeg scale a JPEG down while decoding
// (DCT scaling: a smaller inverse DCT per block and fewer pixels to
// convert and store), much cheaper than decoding in full and resizing.
// reduce, when not nil, gets the upright size of a JPEG and returns the
// denominator r: 1, 2, 4 or 8. The Mat is then ceil(w/r)×ceil(h/r), what
// libjpeg's jpeg_calc_output_dimensions gives; other formats are always
// decoded in full. w and h are the upright size of the original image.
//
// With a budget, the decoded size is reserved before decoding; held is
// what the caller must release once the Mat is closed (0 on error).
func decode(data []byte, maxPixels int, reduce func(w, h int) int, budget *DecodeBudget) (img gocv.Mat, w, h int, held int64, err error) {
	hd, err := CheckHeader(data, maxPixels)
	if err != nil {
		return gocv.Mat{}, 0, 0, 0, err
	}
	orientation := 1
	if hd.Format == FormatJPEG {
		if err := checkJPEGData(data); err != nil {
			return gocv.Mat{}, 0, 0, 0, err
		}
		orientation = JPEGOrientation(data)
	}
	w, h = hd.Width, hd.Height
	if orientation >= 5 { // stored transposed
		w, h = h, w
	}
	r := 1
	if reduce != nil && hd.Format == FormatJPEG {
		r = reduce(w, h)
	}
	flags := decodeFlags
	switch r {
	case 1:
	case 2:
		flags |= gocv.IMReadReducedColor2
	case 4:
		flags |= gocv.IMReadReducedColor4
	case 8:
		flags |= gocv.IMReadReducedColor8
	default:
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("decode: reduction 1/%d not one of 1, 1/2, 1/4, 1/8", r)
	}
	// The decoded Mat, and its turned copy when EXIF asks for one.
	need := int64(ceilDiv(hd.Width, r)) * int64(ceilDiv(hd.Height, r)) * 3
	if orientation != 1 {
		need *= 2
	}
	if err := budget.reserve(need); err != nil {
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("%s of %dx%d: %w", hd.Format, hd.Width, hd.Height, err)
	}
	held = need
	defer func() {
		if err != nil {
			budget.release(held)
			held = 0
		}
	}()
	img, err = gocv.IMDecode(data, flags)
	if err != nil {
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("%s: %v: %w", hd.Format, err, ErrCorrupt)
	}
	if img.Empty() {
		img.Close()
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("%s of %dx%d: decoder could not read the image data: %w", hd.Format, hd.Width, hd.Height, ErrCorrupt)
	}
	// The decoder reads the same header; a different size means the file
	// holds something other than what was checked.
	if wantW, wantH := ceilDiv(hd.Width, r), ceilDiv(hd.Height, r); img.Cols() != wantW || img.Rows() != wantH {
		img.Close()
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("%s header says %dx%d (%dx%d at 1/%d) but decodes to %dx%d: %w", hd.Format, hd.Width, hd.Height, wantW, wantH, r, img.Cols(), img.Rows(), ErrCorrupt)
	}
	if img.Type() != gocv.MatTypeCV8UC3 {
		// Not expected with IMReadColor; refuse rather than misread.
		t := img.Type()
		img.Close()
		return gocv.Mat{}, 0, 0, 0, fmt.Errorf("%s decoded to Mat type %v, want 8-bit BGR: %w", hd.Format, t, ErrUnsupportedImage)
	}
	if orientation != 1 {
		oriented := gocv.NewMat()
		orient(img, &oriented, orientation)
		img.Close()
		img = oriented
	}
	return img, w, h, held, nil
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// orient writes src turned upright for EXIF orientation o into dst, the
// same operations OpenCV's own ApplyExifOrientation uses.
func orient(src gocv.Mat, dst *gocv.Mat, o int) {
	switch o {
	case 2: // mirrored horizontally
		gocv.Flip(src, dst, 1)
	case 3: // rotated 180°
		gocv.Flip(src, dst, -1)
	case 4: // mirrored vertically
		gocv.Flip(src, dst, 0)
	case 5: // mirrored along the main diagonal
		gocv.Transpose(src, dst)
	case 6: // rotated 90° counter-clockwise as stored: turn clockwise
		gocv.Rotate(src, dst, gocv.Rotate90Clockwise)
	case 7: // mirrored along the anti-diagonal
		gocv.Transpose(src, dst)
		gocv.Flip(*dst, dst, -1)
	case 8: // rotated 90° clockwise as stored: turn counter-clockwise
		gocv.Rotate(src, dst, gocv.Rotate90CounterClockwise)
	default:
		src.CopyTo(dst)
	}
}
