package pipeline

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Format is an encoded image format the pipeline accepts.
type Format string

// Accepted formats. Anything else (TIFF, GIF, PPM, ...) is refused with
// ErrUnknownFormat before it reaches OpenCV, which keeps OpenCV's less used
// decoders away from outside input.
const (
	FormatJPEG Format = "jpeg"
	FormatPNG  Format = "png"
	FormatWebP Format = "webp"
	FormatBMP  Format = "bmp"
)

// DefaultMaxPixels is the default limit on width×height of an input image
// (40 megapixels): a decoded 40 MP image takes 120 MB as BGR.
const DefaultMaxPixels = 40_000_000

// Header is what ReadHeader learns from the first bytes of an image.
type Header struct {
	Format        Format
	Width, Height int // as stored, before any EXIF orientation
}

// ReadHeader reads the format and the stored size of an encoded image from
// its header alone, in pure Go. It never allocates in proportion to the
// size the header claims and it reads only inside data, so it is safe on
// any input. A zero side gives ErrZeroSize, bytes of no accepted format
// ErrUnknownFormat, a header cut short or inconsistent ErrCorrupt.
func ReadHeader(data []byte) (Header, error) {
	var (
		h   Header
		err error
	)
	switch {
	case len(data) == 0:
		return Header{}, ErrEmptyImage
	case len(data) >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF:
		h, err = jpegHeader(data)
	case bytes.HasPrefix(data, pngSignature):
		h, err = pngHeader(data)
	case len(data) >= 12 && string(data[:4]) == "RIFF" && string(data[8:12]) == "WEBP":
		h, err = webpHeader(data)
	case len(data) >= 2 && data[0] == 'B' && data[1] == 'M':
		h, err = bmpHeader(data)
	default:
		return Header{}, ErrUnknownFormat
	}
	if err != nil {
		return Header{}, err
	}
	if h.Width == 0 || h.Height == 0 {
		return Header{}, fmt.Errorf("%s header says %dx%d: %w", h.Format, h.Width, h.Height, ErrZeroSize)
	}
	return h, nil
}

// CheckHeader is ReadHeader plus the pixel limit: an image of more than
// maxPixels pixels (DefaultMaxPixels when maxPixels <= 0) is refused with
// ErrTooManyPixels.
func CheckHeader(data []byte, maxPixels int) (Header, error) {
	if maxPixels <= 0 {
		maxPixels = DefaultMaxPixels
	}
	h, err := ReadHeader(data)
	if err != nil {
		return Header{}, err
	}
	// Sides are below 2^32 each, so the product fits in 64 bits.
	if uint64(h.Width)*uint64(h.Height) > uint64(maxPixels) {
		return Header{}, fmt.Errorf("%s of %dx%d is over the limit of %d pixels: %w", h.Format, h.Width, h.Height, maxPixels, ErrTooManyPixels)
	}
	return h, nil
}

func corrupt(f Format, what string) error {
	return fmt.Errorf("%s: %s: %w", f, what, ErrCorrupt)
}

// jpegHeader walks the marker segments up to the first SOFn frame header,
// the one libjpeg uses too.
func jpegHeader(data []byte) (Header, error) {
	pos := 2
	for {
		// Markers may be preceded by any number of 0xFF fill bytes.
		if pos >= len(data) || data[pos] != 0xFF {
			return Header{}, corrupt(FormatJPEG, "no frame header before the data ends")
		}
		for pos < len(data) && data[pos] == 0xFF {
			pos++
		}
		if pos >= len(data) {
			return Header{}, corrupt(FormatJPEG, "truncated marker")
		}
		m := data[pos]
		pos++
		switch {
		case m == 0x01 || (m >= 0xD0 && m <= 0xD8):
			continue // standalone markers carry no length
		case m == 0xD9 || m == 0xDA:
			return Header{}, corrupt(FormatJPEG, "no frame header before the image data")
		}
		if pos+2 > len(data) {
			return Header{}, corrupt(FormatJPEG, "truncated segment length")
		}
		n := int(binary.BigEndian.Uint16(data[pos:]))
		if n < 2 {
			return Header{}, corrupt(FormatJPEG, "segment length below 2")
		}
		if m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC {
			// SOFn: length, precision, height, width, components.
			if n < 8 || pos+8 > len(data) {
				return Header{}, corrupt(FormatJPEG, "truncated frame header")
			}
			return Header{
				Format: FormatJPEG,
				Height: int(binary.BigEndian.Uint16(data[pos+3:])),
				Width:  int(binary.BigEndian.Uint16(data[pos+5:])),
			}, nil
		}
		pos += n
	}
}

var pngSignature = []byte("\x89PNG\r\n\x1a\n")

func pngHeader(data []byte) (Header, error) {
	// Signature, chunk length, "IHDR", width, height, depth, colour type.
	if len(data) < 8+8+13 {
		return Header{}, corrupt(FormatPNG, "truncated IHDR")
	}
	if string(data[12:16]) != "IHDR" || binary.BigEndian.Uint32(data[8:]) != 13 {
		return Header{}, corrupt(FormatPNG, "first chunk is not IHDR")
	}
	w := binary.BigEndian.Uint32(data[16:])
	h := binary.BigEndian.Uint32(data[20:])
	// The PNG spec limits both sides to 2^31-1.
	if w > 1<<31-1 || h > 1<<31-1 {
		return Header{}, corrupt(FormatPNG, "side over 2^31-1")
	}
	return Header{Format: FormatPNG, Width: int(w), Height: int(h)}, nil
}

func webpHeader(data []byte) (Header, error) {
	// RIFF header (12 bytes), then the first chunk's FourCC and size.
	if len(data) < 20 {
		return Header{}, corrupt(FormatWebP, "truncated chunk header")
	}
	chunk := data[20:]
	switch string(data[12:16]) {
	case "VP8 ":
		// Frame tag (3 bytes), start code 9d 01 2a, 14-bit width, height.
		if len(chunk) < 10 {
			return Header{}, corrupt(FormatWebP, "truncated VP8 frame header")
		}
		if chunk[3] != 0x9d || chunk[4] != 0x01 || chunk[5] != 0x2a {
			return Header{}, corrupt(FormatWebP, "bad VP8 start code")
		}
		return Header{
			Format: FormatWebP,
			Width:  int(binary.LittleEndian.Uint16(chunk[6:]) & 0x3fff),
			Height: int(binary.LittleEndian.Uint16(chunk[8:]) & 0x3fff),
		}, nil
	case "VP8L":
		// Signature 0x2f, then 14 bits width-1 and 14 bits height-1.
		if len(chunk) < 5 {
			return Header{}, corrupt(FormatWebP, "truncated VP8L header")
		}
		if chunk[0] != 0x2f {
			return Header{}, corrupt(FormatWebP, "bad VP8L signature")
		}
		bits := binary.LittleEndian.Uint32(chunk[1:])
		return Header{
			Format: FormatWebP,
			Width:  int(bits&0x3fff) + 1,
			Height: int(bits>>14&0x3fff) + 1,
		}, nil
	case "VP8X":
		// Flags (1), reserved (3), 24-bit canvas width-1 and height-1.
		if len(chunk) < 10 {
			return Header{}, corrupt(FormatWebP, "truncated VP8X header")
		}
		if chunk[0]&0x02 != 0 {
			return Header{}, fmt.Errorf("webp: animated WebP: %w", ErrUnsupportedImage)
		}
		u24 := func(b []byte) int { return int(b[0]) | int(b[1])<<8 | int(b[2])<<16 }
		return Header{Format: FormatWebP, Width: u24(chunk[4:]) + 1, Height: u24(chunk[7:]) + 1}, nil
	default:
		return Header{}, corrupt(FormatWebP, fmt.Sprintf("unknown first chunk %q", data[12:16]))
	}
}

func bmpHeader(data []byte) (Header, error) {
	// File header (14 bytes), then the DIB header whose size tells its kind.
	if len(data) < 26 {
		return Header{}, corrupt(FormatBMP, "truncated header")
	}
	switch dib := binary.LittleEndian.Uint32(data[14:]); {
	case dib == 12: // OS/2 BITMAPCOREHEADER: unsigned 16-bit sides.
		return Header{
			Format: FormatBMP,
			Width:  int(binary.LittleEndian.Uint16(data[18:])),
			Height: int(binary.LittleEndian.Uint16(data[20:])),
		}, nil
	case dib >= 40 && dib <= 1024:
		w := int64(int32(binary.LittleEndian.Uint32(data[18:])))
		h := int64(int32(binary.LittleEndian.Uint32(data[22:])))
		if w < 0 {
			return Header{}, corrupt(FormatBMP, "negative width")
		}
		if h < 0 { // top-down bitmap
			h = -h
		}
		return Header{Format: FormatBMP, Width: int(w), Height: int(h)}, nil
	default:
		return Header{}, corrupt(FormatBMP, fmt.Sprintf("unknown DIB header size %d", dib))
	}
}

// checkJPEGData walks a JPEG past its headers into the entropy-coded
// image data and refuses what libjpeg would only warn about and decode
// as grey: data cut short before the end-of-image marker (a truncated
// upload), and bytes that cannot be in image data (0xFF followed by a
// reserved or misplaced marker, as random garbage soon gives). In image
// data 0xFF is followed by 0x00 (a stuffed byte), a restart marker, the
// segments progressive JPEGs put between scans, or the end of image. It
// reads each byte once and allocates nothing.
func checkJPEGData(data []byte) error {
	pos := 2
	inScan := false
	for pos < len(data) {
		if inScan {
			i := bytes.IndexByte(data[pos:], 0xFF)
			if i < 0 {
				break
			}
			pos += i
		}
		if data[pos] != 0xFF {
			return corrupt(FormatJPEG, fmt.Sprintf("no marker at byte %d", pos))
		}
		for pos < len(data) && data[pos] == 0xFF {
			pos++
		}
		if pos >= len(data) {
			break
		}
		m := data[pos]
		pos++
		switch {
		case m == 0xD9:
			return nil // end of image
		case inScan && (m == 0x00 || (m >= 0xD0 && m <= 0xD7)):
			continue // stuffed byte or restart marker
		case m == 0x01 || (m >= 0xD0 && m <= 0xD7):
			continue // standalone markers outside a scan
		case m == 0xD8 || m < 0xC0 || (m >= 0xF0 && m <= 0xFD):
			return corrupt(FormatJPEG, fmt.Sprintf("invalid marker 0xFF%02X at byte %d of the image data", m, pos-2))
		}
		// A segment with a length: headers, tables between scans, SOS.
		if pos+2 > len(data) {
			break
		}
		n := int(binary.BigEndian.Uint16(data[pos:]))
		if n < 2 {
			return corrupt(FormatJPEG, "segment length below 2")
		}
		pos += n
		if m == 0xDA {
			inScan = true // entropy-coded data follows the scan header
		}
	}
	return corrupt(FormatJPEG, "truncated: the data ends before the end-of-image marker")
}
