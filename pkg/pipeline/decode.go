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
	h, err := CheckHeader(data, maxPixels)
	if err != nil {
		return gocv.Mat{}, err
	}
	img, err := gocv.IMDecode(data, decodeFlags)
	if err != nil {
		return gocv.Mat{}, fmt.Errorf("%s: %v: %w", h.Format, err, ErrCorrupt)
	}
	if img.Empty() {
		img.Close()
		return gocv.Mat{}, fmt.Errorf("%s of %dx%d: decoder could not read the image data: %w", h.Format, h.Width, h.Height, ErrCorrupt)
	}
	// The decoder reads the same header; a different size means the file
	// holds something other than what was checked.
	if img.Cols() != h.Width || img.Rows() != h.Height {
		img.Close()
		return gocv.Mat{}, fmt.Errorf("%s header says %dx%d but decodes to %dx%d: %w", h.Format, h.Width, h.Height, img.Cols(), img.Rows(), ErrCorrupt)
	}
	if img.Type() != gocv.MatTypeCV8UC3 {
		// Not expected with IMReadColor; refuse rather than misread.
		t := img.Type()
		img.Close()
		return gocv.Mat{}, fmt.Errorf("%s decoded to Mat type %v, want 8-bit BGR: %w", h.Format, t, ErrUnsupportedImage)
	}
	if h.Format == FormatJPEG {
		if o := JPEGOrientation(data); o != 1 {
			oriented := gocv.NewMat()
			orient(img, &oriented, o)
			img.Close()
			img = oriented
		}
	}
	return img, nil
}

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
