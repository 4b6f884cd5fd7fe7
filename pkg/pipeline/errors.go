package pipeline

import "errors"

// Typed refusals of bad input. Each is returned wrapped with detail
// (fmt.Errorf("...: %w", ErrX)); test with errors.Is. All of them mean the
// caller sent something unusable, so the server maps them to
// codes.InvalidArgument.
var (
	// ErrEmptyImage: the request carried no image bytes.
	ErrEmptyImage = errors.New("empty image")
	// ErrUnknownFormat: the bytes are not JPEG, PNG, WebP or BMP.
	ErrUnknownFormat = errors.New("unknown image format (want JPEG, PNG, WebP or BMP)")
	// ErrTooManyPixels: the header claims more pixels than the limit.
	ErrTooManyPixels = errors.New("image has too many pixels")
	// ErrZeroSize: the header claims a zero width or height.
	ErrZeroSize = errors.New("image has a zero side")
	// ErrCorrupt: the header or the image data cannot be read.
	ErrCorrupt = errors.New("corrupt image")
	// ErrUnsupportedImage: a well-formed image of a kind the decoder does
	// not handle (an animated WebP, say).
	ErrUnsupportedImage = errors.New("unsupported image")
	// ErrBadTensor: a raw input tensor of the wrong size or with
	// non-finite values.
	ErrBadTensor = errors.New("bad input tensor")
	// ErrBadOptions: a request option out of range.
	ErrBadOptions = errors.New("bad request options")
)

// IsInputError reports whether err is one of the refusals of bad input
// above, as opposed to an engine or internal failure.
func IsInputError(err error) bool {
	for _, e := range []error{ErrEmptyImage, ErrUnknownFormat, ErrTooManyPixels, ErrZeroSize, ErrCorrupt, ErrUnsupportedImage, ErrBadTensor, ErrBadOptions} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
