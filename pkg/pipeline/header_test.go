package pipeline

import (
	"bytes"
	"encoding/binary"
	"errors"
	"image"
	"image/color"
	"math/rand/v2"
	"testing"

	"gocv.io/x/gocv"
)

func TestReadHeader(t *testing.T) {
	img := rectImage(37, 21, image.Rectangle{}, color.NRGBA{1, 2, 3, 255}, color.NRGBA{})
	jpg := encodeJPEG(t, img, 90)
	bmp := encodeCV(t, img, ".bmp")
	topDown := append([]byte{}, bmp...)
	binary.LittleEndian.PutUint32(topDown[22:], uint32(-21&0xFFFFFFFF))
	os2 := append([]byte("BM"), make([]byte, 24)...)
	binary.LittleEndian.PutUint32(os2[14:], 12)
	binary.LittleEndian.PutUint16(os2[18:], 300)
	binary.LittleEndian.PutUint16(os2[20:], 200)
	vp8x := []byte("RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x00\x00\x00\x00")
	vp8x = append(vp8x, 0x9F, 0x0F, 0x00, 0xDF, 0x07, 0x00) // 4000x2016
	animated := append([]byte{}, vp8x...)
	animated[20] = 0x02

	tests := []struct {
		name    string
		data    []byte
		want    Header
		wantErr error
	}{
		{"jpeg", jpg, Header{FormatJPEG, 37, 21}, nil},
		{"jpeg with exif", withEXIF(jpg, 6, false), Header{FormatJPEG, 37, 21}, nil},
		{"png", encodePNG(t, img), Header{FormatPNG, 37, 21}, nil},
		{"webp lossy vp8", encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 80), Header{FormatWebP, 37, 21}, nil},
		{"webp lossless vp8l", encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 101), Header{FormatWebP, 37, 21}, nil},
		{"webp extended vp8x", vp8x, Header{FormatWebP, 4000, 2016}, nil},
		{"webp animated", animated, Header{}, ErrUnsupportedImage},
		{"bmp", bmp, Header{FormatBMP, 37, 21}, nil},
		{"bmp top-down", topDown, Header{FormatBMP, 37, 21}, nil},
		{"bmp os/2", os2, Header{FormatBMP, 300, 200}, nil},
		{"empty", nil, Header{}, ErrEmptyImage},
		{"gif", []byte("GIF89a\x01\x00\x01\x00"), Header{}, ErrUnknownFormat},
		{"jpeg soi only", []byte{0xFF, 0xD8, 0xFF}, Header{}, ErrCorrupt},
		{"jpeg sos before sof", []byte{0xFF, 0xD8, 0xFF, 0xDA, 0, 2}, Header{}, ErrCorrupt},
		{"jpeg zero height", []byte{0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0, 0, 0, 10, 1, 1, 0x11, 0}, Header{}, ErrZeroSize},
		{"jpeg short segment length", []byte{0xFF, 0xD8, 0xFF, 0xE0, 0, 1}, Header{}, ErrCorrupt},
		{"png short", []byte("\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR"), Header{}, ErrCorrupt},
		{"png bomb header", rawPNG(30000, 30000, 8, 2, nil), Header{FormatPNG, 30000, 30000}, nil},
		{"png side over 2^31", rawPNG(1<<31, 1, 8, 2, nil), Header{}, ErrCorrupt},
		{"webp short", []byte("RIFF\x00\x00\x00\x00WEBPVP8 "), Header{}, ErrCorrupt},
		{"bmp short", []byte("BM\x00\x00"), Header{}, ErrCorrupt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ReadHeader(tt.data)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
				t.Fatalf("ReadHeader error = %v, want %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("ReadHeader = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestCheckHeaderLimit(t *testing.T) {
	data := rawPNG(8000, 5000, 8, 2, nil) // exactly 40 MP
	if _, err := CheckHeader(data, 0); err != nil {
		t.Errorf("40 MP at the default limit: %v", err)
	}
	if _, err := CheckHeader(rawPNG(8000, 5001, 8, 2, nil), 0); !errors.Is(err, ErrTooManyPixels) {
		t.Errorf("over 40 MP: error %v, want ErrTooManyPixels", err)
	}
	if _, err := CheckHeader(data, 1000); !errors.Is(err, ErrTooManyPixels) {
		t.Errorf("custom limit: error %v, want ErrTooManyPixels", err)
	}
}

// TestHeaderMatchesOpenCV checks the pure-Go sizes against what OpenCV
// decodes for real encodings of odd sizes.
func TestHeaderMatchesOpenCV(t *testing.T) {
	for _, size := range []image.Point{{1, 1}, {3, 700}, {700, 3}, {129, 65}} {
		img := quadrants(size.X, size.Y)
		for _, data := range [][]byte{
			encodeJPEG(t, img, 80), encodePNG(t, img), encodeCV(t, img, ".bmp"),
			encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 80), encodeCV(t, img, ".webp", gocv.IMWriteWebpQuality, 101),
		} {
			checkMats(t)
			h, err := ReadHeader(data)
			if err != nil || h.Width != size.X || h.Height != size.Y {
				t.Errorf("%v: ReadHeader = %+v, %v", size, h, err)
				continue
			}
			m, err := Decode(data, 0)
			if err != nil {
				t.Errorf("%v %s: %v", size, h.Format, err)
				continue
			}
			m.Close()
		}
	}
}

func TestJPEGOrientation(t *testing.T) {
	jpg := encodeJPEG(t, quadrants(16, 16), 80)
	exif := withEXIF(jpg, 6, false)
	i := 4 + 2 + 6 // APP1 marker, length, "Exif\0\0": the TIFF header
	badTag := append([]byte{}, exif...)
	badTag[i+8+2+12+8] = 9 // orientation value 9
	wrongType := append([]byte{}, exif...)
	wrongType[i+8+2+12+2] = 4 // LONG instead of SHORT
	hugeCount := append([]byte{}, exif...)
	hugeCount[i+8], hugeCount[i+9] = 0xFF, 0xFF
	hugeNoTag := append([]byte{}, hugeCount...)
	hugeNoTag[i+8+2+12] = 0x13 // tag 0x0113, not orientation
	badOffset := append([]byte{}, exif...)
	binary.LittleEndian.PutUint32(badOffset[i+4:], 0xFFFFFFF0)
	tests := []struct {
		name string
		data []byte
		want int
	}{
		{"no exif", jpg, 1},
		{"little endian", exif, 6},
		{"big endian", withEXIF(jpg, 8, true), 8},
		{"value out of range", badTag, 1},
		{"wrong type", wrongType, 1},
		{"entry count beyond data, tag before the end", hugeCount, 6},
		{"entry count beyond data, no tag", hugeNoTag, 1},
		{"ifd offset beyond data", badOffset, 1},
		{"truncated exif", exif[:i+10], 1},
		{"not a jpeg", []byte("\x89PNG"), 1},
		{"empty", nil, 1},
	}
	for _, tt := range tests {
		if got := JPEGOrientation(tt.data); got != tt.want {
			t.Errorf("%s: JPEGOrientation = %d, want %d", tt.name, got, tt.want)
		}
	}
}

// TestCorruptJPEGData: a JPEG cut short, or with garbage in its image
// data, is refused as corrupt; libjpeg would decode it with a warning
// and grey where the data is missing. Bytes after the end-of-image
// marker, restart markers and progressive scans are fine.
func TestCorruptJPEGData(t *testing.T) {
	checkMats(t)
	photo := encodeJPEG(t, quadrants(320, 240), 90)
	progressive := encodeCV(t, quadrants(320, 240), gocv.JPEGFileExt, int(gocv.IMWriteJpegProgressive), 1)
	restarts := encodeCV(t, quadrants(320, 240), gocv.JPEGFileExt, int(gocv.IMWriteJpegRstInterval), 4)
	scan := bytes.Index(photo, []byte{0xFF, 0xDA})
	garbage := bytes.Clone(photo)
	rnd := rand.New(rand.NewPCG(1, 2))
	for i := scan + 40; i < len(garbage)-2 && i < scan+1040; i++ {
		garbage[i] = byte(rnd.UintN(256))
	}
	for _, c := range []struct {
		name string
		data []byte
		ok   bool
	}{
		{"whole", photo, true},
		{"progressive", progressive, true},
		{"restart markers", restarts, true},
		{"bytes after the end", append(bytes.Clone(photo), "trailer"...), true},
		{"cut in the image data", photo[:len(photo)*2/3], false},
		{"cut before the last byte", photo[:len(photo)-1], false},
		{"progressive cut", progressive[:len(progressive)/2], false},
		{"garbage in the image data", garbage, false},
	} {
		img, err := Decode(c.data, 0)
		if c.ok {
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
			} else {
				img.Close()
			}
			continue
		}
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", c.name, err)
		}
		if err == nil {
			img.Close()
		}
	}
}
