package pipeline

import (
	"bytes"
	"compress/zlib"
	"encoding/binary"
	"hash/crc32"
	"image"
	"image/color"
	"image/jpeg"
	"image/png"
	"testing"

	"gocv.io/x/gocv"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// checkMats fails the test if it leaves more gocv Mats open than it found
// (only with -tags matprofile, which makes gocv count them).
func checkMats(t testing.TB) {
	t.Helper()
	before := matCount()
	t.Cleanup(func() {
		if after := matCount(); after != before {
			t.Errorf("leaked %d gocv Mats:\n%s", after-before, matProfile())
		}
	})
}

// testModel builds a validated-looking model without an ONNX file.
func testModel(task modelrepo.Task, resize modelrepo.ResizeMode, w, h, classes int) *modelrepo.Model {
	cfg := modelrepo.Config{
		Name: "test", Task: task, Labels: "labels.txt",
		Input: modelrepo.InputConfig{
			Name: "images", Width: w, Height: h, Layout: "NCHW", Color: "RGB",
			Scale: 1.0 / 255, Std: [3]float32{1, 1, 1}, Resize: resize, PadValue: 114,
		},
		Output:   modelrepo.OutputConfig{Name: "output0", Decoding: modelrepo.DecodeYOLOv8},
		Defaults: modelrepo.DefaultOptions{TopK: 5, Confidence: 0.25, IoU: 0.45, MaxDetections: 300},
		Batching: modelrepo.BatchingConfig{MaxBatchSize: 4, QueueSize: 16, Instances: 1},
	}
	if task == modelrepo.TaskClassify {
		cfg.Output = modelrepo.OutputConfig{Name: "logits", Decoding: modelrepo.DecodeLogits}
		cfg.Input.ResizeShorter = max(w, h) * 8 / 7
		cfg.Input.Mean = [3]float32{0.485, 0.456, 0.406}
		cfg.Input.Std = [3]float32{0.229, 0.224, 0.225}
	}
	labels := make([]string, classes)
	for i := range labels {
		labels[i] = "c" + string(rune('a'+i%26)) + string(rune('a'+i/26%26))
	}
	return &modelrepo.Model{Config: cfg, LabelNames: labels, NumClasses: classes}
}

func detector() *modelrepo.Model {
	return testModel(modelrepo.TaskDetect, modelrepo.ResizeLetterbox, 640, 640, 80)
}

func classifier() *modelrepo.Model {
	m := testModel(modelrepo.TaskClassify, modelrepo.ResizeShorterCrop, 224, 224, 1000)
	m.Input.ResizeShorter = 256
	return m
}

// rectImage is a w×h image of colour bg with the rectangle r in colour fg.
func rectImage(w, h int, r image.Rectangle, bg, fg color.NRGBA) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			c := bg
			if image.Pt(x, y).In(r) {
				c = fg
			}
			img.SetNRGBA(x, y, c)
		}
	}
	return img
}

// quadrants is a w×h image whose four quadrants have distinct colours,
// so that any flip or rotation of it is told apart.
var quadColours = [4]color.NRGBA{
	{255, 0, 0, 255},     // top left: red
	{0, 255, 0, 255},     // top right: green
	{0, 0, 255, 255},     // bottom left: blue
	{255, 255, 255, 255}, // bottom right: white
}

func quadrants(w, h int) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			q := 0
			if x >= w/2 {
				q++
			}
			if y >= h/2 {
				q += 2
			}
			img.SetNRGBA(x, y, quadColours[q])
		}
	}
	return img
}

func encodePNG(t testing.TB, img image.Image) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func encodeJPEG(t testing.TB, img image.Image, quality int) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := jpeg.Encode(&b, img, &jpeg.Options{Quality: quality}); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// encodeCV encodes img with OpenCV (WebP and BMP, which Go cannot write).
func encodeCV(t testing.TB, img image.Image, ext gocv.FileExt, params ...int) []byte {
	t.Helper()
	m, err := gocv.ImageToMatRGB(img)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var buf *gocv.NativeByteBuffer
	if len(params) == 0 {
		buf, err = gocv.IMEncode(ext, m)
	} else {
		buf, err = gocv.IMEncodeWithParams(ext, m, params)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Close()
	return bytes.Clone(buf.GetBytes())
}

// rawPNG writes a PNG whose IHDR says w×h, depth and colour type and whose
// IDAT holds scanlines (filter bytes included), with valid CRCs. It can
// claim a size the data does not have.
func rawPNG(w, h uint32, depth, colourType byte, scanlines []byte) []byte {
	var out bytes.Buffer
	out.WriteString("\x89PNG\r\n\x1a\n")
	chunk := func(typ string, data []byte) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(data)))
		out.Write(n[:])
		crc := crc32.NewIEEE()
		crc.Write([]byte(typ))
		crc.Write(data)
		out.WriteString(typ)
		out.Write(data)
		binary.BigEndian.PutUint32(n[:], crc.Sum32())
		out.Write(n[:])
	}
	ihdr := make([]byte, 13)
	binary.BigEndian.PutUint32(ihdr, w)
	binary.BigEndian.PutUint32(ihdr[4:], h)
	ihdr[8], ihdr[9] = depth, colourType
	chunk("IHDR", ihdr)
	var z bytes.Buffer
	zw := zlib.NewWriter(&z)
	zw.Write(scanlines)
	zw.Close()
	chunk("IDAT", z.Bytes())
	chunk("IEND", nil)
	return out.Bytes()
}

// withEXIF inserts an APP1 EXIF segment carrying orientation o right after
// the SOI marker of a JPEG.
func withEXIF(jpg []byte, o int, bigEndian bool) []byte {
	var bo binary.AppendByteOrder = binary.LittleEndian
	tiff := []byte("II*\x00")
	if bigEndian {
		bo, tiff = binary.BigEndian, []byte("MM\x00*")
	}
	tiff = bo.AppendUint32(tiff, 8)
	tiff = bo.AppendUint16(tiff, 2) // two entries: another tag first
	tiff = bo.AppendUint16(tiff, 0x010F)
	tiff = bo.AppendUint16(tiff, 2)
	tiff = bo.AppendUint32(tiff, 4)
	tiff = append(tiff, "ACME"...)
	tiff = bo.AppendUint16(tiff, 0x0112)
	tiff = bo.AppendUint16(tiff, 3)
	tiff = bo.AppendUint32(tiff, 1)
	tiff = bo.AppendUint16(tiff, uint16(o))
	tiff = bo.AppendUint16(tiff, 0)
	tiff = bo.AppendUint32(tiff, 0)
	seg := append([]byte("Exif\x00\x00"), tiff...)
	out := append([]byte{}, jpg[:2]...)
	out = append(out, 0xFF, 0xE1)
	out = binary.BigEndian.AppendUint16(out, uint16(len(seg)+2))
	out = append(out, seg...)
	return append(out, jpg[2:]...)
}

// cmykJPEG hand-encodes a baseline JPEG with four components (Adobe APP14,
// transform 0: inverted CMYK as Photoshop writes it) and no subsampling,
// since neither Go nor OpenCV writes CMYK. Each 8×8 block is flat: the
// colour of block (bx, by) is block(bx, by), four stored sample values.
// Flat blocks need only DC coefficients, so the Huffman tables are tiny:
// DC categories 0..11 as 4-bit codes, AC only end-of-block as "0".
func cmykJPEG(wBlocks, hBlocks int, block func(bx, by int) [4]byte) []byte {
	var out bytes.Buffer
	seg := func(marker byte, payload []byte) {
		out.Write([]byte{0xFF, marker})
		binary.Write(&out, binary.BigEndian, uint16(len(payload)+2))
		out.Write(payload)
	}
	out.Write([]byte{0xFF, 0xD8})
	seg(0xEE, []byte{'A', 'd', 'o', 'b', 'e', 0, 100, 0, 0, 0, 0, 0})
	dqt := make([]byte, 65)
	for i := 1; i < 65; i++ {
		dqt[i] = 1
	}
	seg(0xDB, dqt)
	w, h := wBlocks*8, hBlocks*8
	sof := []byte{8, byte(h >> 8), byte(h), byte(w >> 8), byte(w), 4}
	for c := byte(1); c <= 4; c++ {
		sof = append(sof, c, 0x11, 0)
	}
	seg(0xC0, sof)
	dc := make([]byte, 1+16+12)
	dc[0], dc[1+3] = 0x00, 12
	for s := range 12 {
		dc[17+s] = byte(s)
	}
	seg(0xC4, dc)
	ac := make([]byte, 1+16+1)
	ac[0], ac[1] = 0x10, 1 // one code of length 1: EOB
	seg(0xC4, ac)
	sos := []byte{4}
	for c := byte(1); c <= 4; c++ {
		sos = append(sos, c, 0x00)
	}
	seg(0xDA, append(sos, 0, 63, 0))

	var bits uint32
	var nbits uint
	put := func(v uint32, n uint) {
		for i := int(n) - 1; i >= 0; i-- {
			bits = bits<<1 | (v>>uint(i))&1
			nbits++
			if nbits == 8 {
				out.WriteByte(byte(bits))
				if byte(bits) == 0xFF {
					out.WriteByte(0) // byte stuffing
				}
				bits, nbits = 0, 0
			}
		}
	}
	var pred [4]int
	for by := range hBlocks {
		for bx := range wBlocks {
			v := block(bx, by)
			for c := range 4 {
				// A flat block of value s has DC = 8*(s-128) with unit
				// quantisation.
				dcv := 8 * (int(v[c]) - 128)
				d := dcv - pred[c]
				pred[c] = dcv
				cat, mag := 0, d
				if mag < 0 {
					mag = -mag
				}
				for mag>>cat != 0 {
					cat++
				}
				put(uint32(cat), 4)
				if cat > 0 {
					if d < 0 {
						d += 1<<cat - 1
					}
					put(uint32(d), uint(cat))
				}
				put(0, 1) // EOB
			}
		}
	}
	for nbits != 0 {
		put(1, 1) // pad with ones
	}
	out.Write([]byte{0xFF, 0xD9})
	return out.Bytes()
}

// matPixel reads the BGR pixel (x, y) of an 8UC3 Mat.
func matPixel(m gocv.Mat, x, y int) [3]uint8 {
	v := m.GetVecbAt(y, x)
	return [3]uint8{v[0], v[1], v[2]}
}

func near(a, b, tol uint8) bool {
	if a > b {
		return a-b <= tol
	}
	return b-a <= tol
}

func nearBGR(got [3]uint8, c color.NRGBA, tol uint8) bool {
	return near(got[0], c.B, tol) && near(got[1], c.G, tol) && near(got[2], c.R, tol)
}

// mustMat copies BGR pixels into a new Mat the caller closes.
func mustMat(t testing.TB, pix []byte, h, w int) gocv.Mat {
	t.Helper()
	m := gocv.NewMatWithSize(h, w, gocv.MatTypeCV8UC3)
	dst, err := m.DataPtrUint8()
	if err != nil {
		t.Fatal(err)
	}
	copy(dst, pix)
	return m
}
