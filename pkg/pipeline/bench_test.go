package pipeline

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/visionserve/visionserve/internal/testimage"
	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// latencies records per-iteration times and reports images/s, p50 and p99.
type latencies struct {
	b      *testing.B
	d      []time.Duration
	start  time.Time
	images int
}

func newLatencies(b *testing.B, imagesPerOp int) *latencies {
	b.ReportAllocs()
	return &latencies{b: b, d: make([]time.Duration, 0, b.N), images: imagesPerOp}
}

func (l *latencies) begin() { l.start = time.Now() }
func (l *latencies) end()   { l.d = append(l.d, time.Since(l.start)) }

func (l *latencies) report() {
	if len(l.d) == 0 {
		return
	}
	var total time.Duration
	for _, d := range l.d {
		total += d
	}
	slices.Sort(l.d)
	pct := func(p float64) float64 {
		return float64(l.d[min(len(l.d)-1, int(p*float64(len(l.d))))].Microseconds()) / 1000
	}
	l.b.ReportMetric(float64(len(l.d)*l.images)/total.Seconds(), "images/s")
	l.b.ReportMetric(pct(0.50), "p50-ms")
	l.b.ReportMetric(pct(0.99), "p99-ms")
}

func BenchmarkDecode(b *testing.B) {
	img := testimage.PhotoLike(1280, 720)
	jpg := encodeJPEG(b, img, 90)
	for _, tc := range []struct {
		name string
		data []byte
		r    int // libjpeg DCT scaling denominator
	}{
		{"jpeg_1280x720", jpg, 1},
		{"jpeg_1280x720_reduced2", jpg, 2},
		{"jpeg_1280x720_reduced4", jpg, 4},
		{"png_1280x720", encodePNG(b, img), 1},
	} {
		b.Run(tc.name, func(b *testing.B) {
			b.SetBytes(int64(len(tc.data)))
			reduce := func(int, int) int { return tc.r }
			l := newLatencies(b, 1)
			for b.Loop() {
				l.begin()
				m, _, _, _, err := decode(tc.data, 0, reduce, nil)
				if err != nil {
					b.Fatal(err)
				}
				m.Close()
				l.end()
			}
			l.report()
		})
	}
}

// BenchmarkPrepare measures Prepare, decode and fit, on photo-sized JPEGs
// with the reduced JPEG decode on (the default) and off.
func BenchmarkPrepare(b *testing.B) {
	for _, tc := range []struct {
		name string
		m    *modelrepo.Model
		w, h int
	}{
		{"crop_224_from_1280x720", classifier(), 1280, 720},
		{"letterbox_640_from_1920x1080", detector(), 1920, 1080},
	} {
		data := testimage.JPEG(tc.w, tc.h)
		for _, full := range []bool{false, true} {
			pre, err := NewPreprocessor(tc.m, PreprocessOptions{FullDecode: full})
			if err != nil {
				b.Fatal(err)
			}
			name := tc.name + "/reduced"
			if full {
				name = tc.name + "/full"
			}
			b.Run(name, func(b *testing.B) {
				b.SetBytes(int64(len(data)))
				l := newLatencies(b, 1)
				for b.Loop() {
					l.begin()
					p, err := pre.Prepare(data)
					if err != nil {
						b.Fatal(err)
					}
					p.Close()
					l.end()
				}
				l.report()
			})
		}
	}
}

// BenchmarkPreprocess measures fitting a decoded 1280x720 image to the
// model input (resize/letterbox/crop, a native uint8 Mat) and filling a
// slot of a pooled batch, separately: Fill must allocate nothing.
func BenchmarkPreprocess(b *testing.B) {
	src := testimage.PhotoLike(1280, 720)
	pix := make([]byte, 0, 1280*720*3)
	for i := 0; i < len(src.Pix); i += 4 {
		pix = append(pix, src.Pix[i+2], src.Pix[i+1], src.Pix[i])
	}
	for _, tc := range []struct {
		name string
		m    *modelrepo.Model
	}{
		{"letterbox_640", detector()},
		{"crop_224", classifier()},
	} {
		pre, err := NewPreprocessor(tc.m, PreprocessOptions{})
		if err != nil {
			b.Fatal(err)
		}
		decoded, err := pre.PrepareHWC(pix, 720, 1280, false) // for the Mat only
		if err != nil {
			b.Fatal(err)
		}
		decoded.Close()
		c, h, w := pre.InputShape()
		pool, err := engine.NewBatchPool(8, c, h, w, 1, nil)
		if err != nil {
			b.Fatal(err)
		}
		img := mustMat(b, pix, 720, 1280)
		b.Run(tc.name+"/fit", func(b *testing.B) {
			l := newLatencies(b, 1)
			for b.Loop() {
				l.begin()
				p, err := pre.fit(img, 1280, 720)
				if err != nil {
					b.Fatal(err)
				}
				p.Close()
				l.end()
			}
			l.report()
		})
		b.Run(tc.name+"/fill", func(b *testing.B) {
			p, err := pre.fit(img, 1280, 720)
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			warm, err := pool.Get() // the buffer is allocated once, not per op
			if err != nil {
				b.Fatal(err)
			}
			pool.Put(warm)
			l := newLatencies(b, 1)
			k := 0
			for b.Loop() {
				batch, err := pool.Get()
				if err != nil {
					b.Fatal(err)
				}
				l.begin()
				if err := p.Fill(batch.Slot(k % batch.Cap)); err != nil {
					b.Fatal(err)
				}
				l.end()
				pool.Put(batch)
				k++
			}
			l.report()
		})
		img.Close()
		pool.Close()
	}
}

func BenchmarkPostprocessYOLO(b *testing.B) {
	const nc, anchors = 80, 8400
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]float32, (4+nc)*anchors)
	for a := range anchors {
		data[a] = rng.Float32() * 640
		data[anchors+a] = rng.Float32() * 640
		data[2*anchors+a] = 10 + rng.Float32()*200
		data[3*anchors+a] = 10 + rng.Float32()*200
		for c := range nc {
			// Mostly background, as a real head: ~1% of anchors score
			// above 0.25 in some class.
			v := rng.Float32() * 0.1
			if rng.IntN(100) == 0 {
				v = 0.25 + rng.Float32()*0.75
			}
			data[(4+c)*anchors+a] = v
		}
	}
	out := []engine.Tensor{{Name: "output0", Shape: []int64{1, 4 + nc, anchors}, Data: data}}
	pp, err := NewPostprocessor(detector())
	if err != nil {
		b.Fatal(err)
	}
	p := &Prepared{Width: 1280, Height: 720, Transform: Transform{ScaleX: 2, ScaleY: 2, OffsetY: -280}}
	l := newLatencies(b, 1)
	n := 0
	for b.Loop() {
		l.begin()
		res, err := pp.Decode(out, 0, p, Options{})
		if err != nil {
			b.Fatal(err)
		}
		l.end()
		n = len(res.Detections)
	}
	l.report()
	b.ReportMetric(float64(n), "boxes")
}

func BenchmarkPostprocessClassify(b *testing.B) {
	rng := rand.New(rand.NewPCG(5, 6))
	data := make([]float32, 8*1000)
	for i := range data {
		data[i] = rng.Float32()*20 - 10
	}
	out := []engine.Tensor{{Name: "logits", Shape: []int64{8, 1000}, Data: data}}
	pp, err := NewPostprocessor(classifier())
	if err != nil {
		b.Fatal(err)
	}
	p := &Prepared{Width: 224, Height: 224}
	l := newLatencies(b, 1)
	k := 0
	for b.Loop() {
		l.begin()
		if _, err := pp.Decode(out, k%8, p, Options{TopK: 5}); err != nil {
			b.Fatal(err)
		}
		l.end()
		k++
	}
	l.report()
}
