package modelgen

import (
	"math"
	"math/rand/v2"
)

// calibBatch returns n synthetic RGB images of size×size with values in
// [0, 1], cycling through four kinds of content (smooth waves, flat
// rectangles with edges, white noise, soft blobs) so the batch statistics
// the weights are fitted to cover both smooth and busy inputs.
func calibBatch(r *rand.Rand, n, size int) *tensor {
	t := newTensor(n, 3, size, size)
	fs := float64(size)
	for i := 0; i < n; i++ {
		switch i % 4 {
		case 0: // sum of low-frequency waves per channel
			for c := 0; c < 3; c++ {
				type wave struct{ fx, fy, ph, amp float64 }
				ws := make([]wave, 4)
				for j := range ws {
					ws[j] = wave{uniform(r, -4, 4), uniform(r, -4, 4), uniform(r, 0, 2*math.Pi), uniform(r, 0.05, 0.2)}
				}
				p := t.plane(i, c)
				for y := 0; y < size; y++ {
					for x := 0; x < size; x++ {
						v := 0.5
						for _, w := range ws {
							v += w.amp * math.Sin(2*math.Pi*(w.fx*float64(x)+w.fy*float64(y))/fs+w.ph)
						}
						p[y*size+x] = float32(min(max(v, 0), 1))
					}
				}
			}
		case 1: // gradient background with flat rectangles and mild noise
			var bg0, bg1 [3]float64
			for c := range bg0 {
				bg0[c], bg1[c] = uniform(r, 0, 1), uniform(r, 0, 1)
			}
			for y := 0; y < size; y++ {
				for x := 0; x < size; x++ {
					a := float64(x+y) / (2 * fs)
					for c := 0; c < 3; c++ {
						t.plane(i, c)[y*size+x] = float32(bg0[c]*(1-a) + bg1[c]*a)
					}
				}
			}
			for k := 0; k < 6; k++ {
				x0, y0 := int(uniform(r, 0, fs)), int(uniform(r, 0, fs))
				w, h := int(uniform(r, fs/10, fs/2)), int(uniform(r, fs/10, fs/2))
				var col [3]float64
				for c := range col {
					col[c] = uniform(r, 0, 1)
				}
				for y := y0; y < min(y0+h, size); y++ {
					for x := x0; x < min(x0+w, size); x++ {
						for c := 0; c < 3; c++ {
							t.plane(i, c)[y*size+x] = float32(col[c])
						}
					}
				}
			}
			for j := range 3 {
				p := t.plane(i, j)
				for k := range p {
					p[k] = float32(min(max(float64(p[k])+uniform(r, -0.03, 0.03), 0), 1))
				}
			}
		case 2: // white noise
			for c := 0; c < 3; c++ {
				p := t.plane(i, c)
				for k := range p {
					p[k] = float32(uniform(r, 0, 1))
				}
			}
		case 3: // soft coloured blobs on a dark background
			type blob struct{ x, y, s float64 }
			bs := make([]blob, 5)
			cols := make([][3]float64, len(bs))
			for j := range bs {
				bs[j] = blob{uniform(r, 0, fs), uniform(r, 0, fs), uniform(r, fs/12, fs/4)}
				for c := range cols[j] {
					cols[j][c] = uniform(r, 0.2, 1)
				}
			}
			for y := 0; y < size; y++ {
				for x := 0; x < size; x++ {
					var v [3]float64
					for j, bl := range bs {
						dx, dy := float64(x)-bl.x, float64(y)-bl.y
						g := math.Exp(-(dx*dx + dy*dy) / (2 * bl.s * bl.s))
						for c := range v {
							v[c] += g * cols[j][c]
						}
					}
					for c := 0; c < 3; c++ {
						t.plane(i, c)[y*size+x] = float32(min(0.05+v[c], 1))
					}
				}
			}
		}
	}
	return t
}

// imageNetNormalize applies torchvision's input normalisation in place:
// the classifiers expect (x - mean) / std per channel.
func imageNetNormalize(t *tensor) {
	mean := [3]float32{0.485, 0.456, 0.406}
	std := [3]float32{0.229, 0.224, 0.225}
	for n := 0; n < t.n; n++ {
		for c := 0; c < 3; c++ {
			p := t.plane(n, c)
			for i, v := range p {
				p[i] = (v - mean[c]) / std[c]
			}
		}
	}
}
